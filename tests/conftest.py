"""Shared fixtures: small random HuggingFace BERT checkpoints built locally (no downloads)."""

import pathlib

import pytest

from distil_jax import resources


def save_random_bert(out_dir: pathlib.Path, seed: int = 0, with_tokenizer: bool = True,
                     **overrides) -> pathlib.Path:
  """Writes a random `BertForMaskedLM` (MiniLM's vocabulary, tiny shape) with save_pretrained."""
  import torch
  import transformers

  shape = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=128, type_vocab_size=2)
  shape.update(overrides)
  torch.manual_seed(seed)
  model = transformers.BertForMaskedLM(transformers.BertConfig(**shape)).eval()
  with torch.no_grad():  # Make the token-type and MLM biases non-trivial so tests see them.
    model.bert.embeddings.token_type_embeddings.weight.normal_(0, 0.5)
    model.cls.predictions.bias.normal_(0, 0.5)
  model.save_pretrained(out_dir)
  if with_tokenizer:
    from distil_jax import hf
    hf.copy_tokenizer(resources.minilm_dir(), pathlib.Path(out_dir))
  return pathlib.Path(out_dir)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> pathlib.Path:
  """A random 4-layer BERT with MiniLM's tokenizer files."""
  return save_random_bert(tmp_path_factory.mktemp("bert"))
