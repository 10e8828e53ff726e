"""The teacher's WordPiece tokenizer, loaded as HuggingFace saves it, without padding or
truncation."""

import json
import os
from typing import NamedTuple

import tokenizers
from etils import epath

from distil_jax import errors

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class SpecialIds(NamedTuple):
  pad: int
  unk: int
  cls: int
  sep: int
  mask: int


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
