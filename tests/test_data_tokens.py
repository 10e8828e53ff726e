"""The teacher's tokenizer and the token-id cache."""

import itertools
import json
import shutil

import numpy as np
import pytest

from distil_jax import resources
from distil_jax.data import load_tokenizer, open_documents, tokenize

TEXTS = [extract["extract"] for extract in
         list(json.loads(resources.wiki_offline_json().read_text()).values())[:20]]


def test_tokenizer_has_no_padding_or_truncation():
  tokenizer = load_tokenizer(resources.minilm_dir(), vocab_size=30522)
  assert tokenizer.encode("Hello world").ids == [101, 7592, 2088, 102]
  assert len(tokenizer.encode(" ".join(TEXTS)).ids) > 512


def test_vocab_txt_builds_the_same_tokenizer(tmp_path):
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(resources.minilm_dir() / name, tmp_path)
  from_vocab = load_tokenizer(tmp_path, vocab_size=30522)
  from_json = load_tokenizer(resources.minilm_dir())
  assert ([e.ids for e in from_vocab.encode_batch(TEXTS)]
          == [e.ids for e in from_json.encode_batch(TEXTS)])


def test_tokenizer_errors_name_the_file_and_the_fix(tmp_path):
  with pytest.raises(ValueError, match=r"tokenizer\.json has 30522 tokens .* teacher's own") as e:
    load_tokenizer(resources.minilm_dir(), vocab_size=28996)
  assert "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match=f"no tokenizer.json or vocab.txt in {tmp_path}"):
    load_tokenizer(tmp_path)


class _NoTokenizing:
  """A tokenizer that fails if asked to tokenize: the cache must answer."""

  def __init__(self, tokenizer):
    self.to_str, self.get_vocab_size = tokenizer.to_str, tokenizer.get_vocab_size

  def encode_batch_fast(self, *args, **kwargs):
    raise AssertionError("tokenized again")


def test_token_ids_are_cached(tmp_path):
  (tmp_path / "corpus.txt").write_text("\n".join(TEXTS))
  documents = open_documents(f"text:{tmp_path}/corpus.txt", tmp_path / "data", None)
  tokenizer = load_tokenizer(resources.minilm_dir())
  ids = tokenize([(documents, 2, 9), (documents, 12, 15)], tokenizer, tmp_path / "cache")
  texts = documents.texts(2, 9) + documents.texts(12, 15)
  expected = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
  assert [ids.tokens[a:b].tolist() for a, b in itertools.pairwise(ids.offsets)] == expected
  np.testing.assert_array_equal(
      ids.counts, np.bincount([t for e in expected for t in e], minlength=30522))
  cached = tokenize([(documents, 2, 9), (documents, 12, 15)], _NoTokenizing(tokenizer),
                    tmp_path / "cache")
  np.testing.assert_array_equal(cached.tokens, ids.tokens)
  np.testing.assert_array_equal(cached.offsets, ids.offsets)
