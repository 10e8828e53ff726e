"""Small random HuggingFace checkpoints built locally, for tests and parity checks (needs torch)."""

import pathlib

from distil_jax import hf, resources

# Parameters that BERT's init leaves at zero or tiny; drawn larger so that checks see them.
_ENLARGED = ("token_type_embeddings", "predictions.bias", "vocab_projector.bias", "pooler.",
             "classifier.")


def save_random_bert(out_dir: str | pathlib.Path, seed: int = 0, with_tokenizer: bool = True,
                     architecture: str = "BertForMaskedLM", **overrides) -> pathlib.Path:
  """Writes a random transformers `architecture` (MiniLM's vocabulary, tiny shape) with
  save_pretrained: a BERT ("Bert...", e.g. "BertForSequenceClassification") or a DistilBERT
  ("DistilBert..."). Token-type embeddings, the MLM bias and the classification heads are drawn
  larger than BERT's init. `overrides` change `BertConfig` / `DistilBertConfig` fields.
  """
  import torch
  import transformers

  if architecture.startswith("DistilBert"):
    config = transformers.DistilBertConfig(**{
        **dict(vocab_size=30522, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
               max_position_embeddings=128), **overrides})
  else:
    config = transformers.BertConfig(**{
        **dict(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=128, type_vocab_size=2),
        **overrides})
  torch.manual_seed(seed)
  model = getattr(transformers, architecture)(config).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if any(part in name for part in _ENLARGED):
        parameter.normal_(0, 0.5)
  model.save_pretrained(out_dir)
  if with_tokenizer:
    hf.copy_tokenizer(resources.minilm_dir(), pathlib.Path(out_dir))
  return pathlib.Path(out_dir)
