"""Small random HuggingFace checkpoints built locally, for tests and parity checks (needs torch)."""

import pathlib

from distil_jax import hf, resources


def save_random_bert(out_dir: str | pathlib.Path, seed: int = 0, with_tokenizer: bool = True,
                     **overrides) -> pathlib.Path:
  """Writes a random `BertForMaskedLM` (MiniLM's vocabulary, tiny shape) with save_pretrained.

  The token-type embeddings and the MLM bias are drawn larger than BERT's init, so that checks
  see them. `overrides` change `transformers.BertConfig` fields.
  """
  import torch
  import transformers

  shape = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=128, type_vocab_size=2)
  torch.manual_seed(seed)
  model = transformers.BertForMaskedLM(transformers.BertConfig(**{**shape, **overrides})).eval()
  with torch.no_grad():
    model.bert.embeddings.token_type_embeddings.weight.normal_(0, 0.5)
    model.cls.predictions.bias.normal_(0, 0.5)
  model.save_pretrained(out_dir)
  if with_tokenizer:
    hf.copy_tokenizer(resources.minilm_dir(), pathlib.Path(out_dir))
  return pathlib.Path(out_dir)
