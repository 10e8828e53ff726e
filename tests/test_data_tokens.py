"""The teacher's tokenizer."""

import json
import shutil

import pytest

from distil_jax import resources
from distil_jax.data import load_tokenizer

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
