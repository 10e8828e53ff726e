"""The teacher's WordPiece tokenizer, and token ids cached on disk per corpus and tokenizer."""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tokenizers
from absl import logging
from etils import epath

from distil_jax import errors
from distil_jax.data import files
from distil_jax.data.sources import Documents

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_DOCUMENTS_PER_BLOCK = 4096


class SpecialIds(NamedTuple):
  pad: int
  unk: int
  cls: int
  sep: int
  mask: int


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """Token ids of documents, no special tokens: document d is tokens[offsets[d]:offsets[d+1]]."""

  tokens: np.ndarray  # memory-mapped, uint16 or int32
  offsets: np.ndarray  # int64, one more than there are documents
  counts: np.ndarray  # int64, how often each vocabulary id occurs in `tokens`


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> tokenizers.Tokenizer:
  """The BERT WordPiece tokenizer in HF directory `path`, without padding or truncation.

  Reads `tokenizer.json`, or builds the tokenizer from `vocab.txt` (lowercasing unless
  `tokenizer_config.json` says `do_lower_case: false`). With `vocab_size` (the teacher's), checks
  that the vocabulary has that size.
  """
  directory = epath.Path(path)
  file = directory / "tokenizer.json"
  if file.exists():
    tokenizer = tokenizers.Tokenizer.from_str(file.read_text())
  elif (directory / "vocab.txt").exists():
    file = directory / "vocab.txt"
    tokenizer = _wordpiece_tokenizer(file, _lowercase(directory))
  else:
    raise errors.MissingInput(f"no tokenizer.json or vocab.txt in {directory}: point tokenizer_dir "
                              "at the teacher's HuggingFace directory")
  tokenizer.no_padding()
  tokenizer.no_truncation()
  if vocab_size is not None and tokenizer.get_vocab_size() != vocab_size:
    raise errors.ConfigError(
        f"{file} has {tokenizer.get_vocab_size()} tokens but the teacher's vocab_size "
        f"is {vocab_size}: use the teacher's own tokenizer")
  missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
  if missing:
    raise errors.ConfigError(
        f"{file} lacks the BERT special tokens {missing}: use the teacher's own "
        "BERT WordPiece tokenizer")
  return tokenizer


def special_ids(tokenizer: tokenizers.Tokenizer) -> SpecialIds:
  """Ids of [PAD], [UNK], [CLS], [SEP] and [MASK] (checked present by `load_tokenizer`)."""
  return SpecialIds(*(tokenizer.token_to_id(token) for token in SPECIAL_TOKENS))


def tokenize(parts: Sequence[tuple[Documents, int, int]], tokenizer: tokenizers.Tokenizer,
             cache_dir: pathlib.Path) -> TokenIds:
  """Token ids of documents [start, stop) of each part, in order, tokenized once and cached.

  The cache is keyed by the parts (source fingerprints and ranges) and the tokenizer; the ids do
  not depend on max_len, packing or masking.
  """
  tokenizer_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
  ranges = [(documents.fingerprint, start, stop) for documents, start, stop in parts]
  identity = json.dumps([tokenizer_hash, ranges])
  directory = cache_dir / hashlib.sha256(identity.encode()).hexdigest()[:24]
  with files.exclusive_lock(directory.with_suffix(".lock")):
    if not directory.exists():
      _write(parts, tokenizer, directory)
  return _read(directory)


def _write(parts: Sequence[tuple[Documents, int, int]], tokenizer: tokenizers.Tokenizer,
           directory: pathlib.Path) -> None:
  """Writes tokens.bin, offsets.npy and counts.npy to a temporary directory, then renames it."""
  begin = time.perf_counter()
  vocab_size = tokenizer.get_vocab_size()
  temporary = directory.with_suffix(".incomplete")
  shutil.rmtree(temporary, ignore_errors=True)
  temporary.mkdir(parents=True)
  lengths, counts = [], np.zeros(vocab_size, np.int64)
  with open(temporary / "tokens.bin", "wb") as tokens_file:
    for documents, start, stop in parts:
      for block in range(start, stop, _DOCUMENTS_PER_BLOCK):
        texts = documents.texts(block, min(block + _DOCUMENTS_PER_BLOCK, stop))
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        lengths += map(len, ids)
        block_tokens = np.fromiter((i for doc in ids for i in doc), _dtype(vocab_size))
        counts += np.bincount(block_tokens, minlength=vocab_size)
        block_tokens.tofile(tokens_file)
  np.save(temporary / "offsets.npy", np.cumsum([0, *lengths], dtype=np.int64))
  np.save(temporary / "counts.npy", counts)
  temporary.rename(directory)
  logging.info("Tokenized %d documents (%d tokens) in %.1f s into %s", len(lengths), counts.sum(),
               time.perf_counter() - begin, directory)


def _read(directory: pathlib.Path) -> TokenIds:
  offsets = np.load(directory / "offsets.npy")
  counts = np.load(directory / "counts.npy")
  dtype = _dtype(len(counts))
  tokens = (np.memmap(directory / "tokens.bin", dtype, mode="r") if offsets[-1]
            else np.zeros(0, dtype))  # An empty file cannot be memory-mapped.
  return TokenIds(tokens, offsets, counts)


def _dtype(vocab_size: int) -> type[np.integer]:
  return np.uint16 if vocab_size <= 2**16 else np.int32


def _lowercase(directory: epath.Path) -> bool:
  config = directory / "tokenizer_config.json"
  return json.loads(config.read_text()).get("do_lower_case", True) if config.exists() else True


def _wordpiece_tokenizer(vocab_file: epath.Path, lowercase: bool) -> tokenizers.Tokenizer:
  """A BERT tokenizer built from a vocabulary (line i is token i), as HF `BertTokenizerFast`
  builds it."""
  vocab = {token: i for i, token in enumerate(vocab_file.read_text().splitlines())}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
  tokenizer.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=lowercase)
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = tokenizers.decoders.WordPiece()
  ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
  tokenizer.add_special_tokens([token for token, i in ids.items() if i is not None])
  if ids["[CLS]"] is not None and ids["[SEP]"] is not None:
    tokenizer.post_processor = tokenizers.processors.BertProcessing(
        ("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
  return tokenizer
