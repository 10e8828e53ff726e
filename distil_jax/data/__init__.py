"""Input pipeline: text sources -> prepared rows of token ids (every core, once) -> masked,
sharded batches; GLUE tasks (`glue.py`).

The names below are imported when first used: a data-preparing process imports only what it runs.
"""

import importlib

_EXPORTS = {
    "default_data_config": "config",
    "IGNORED_LABEL": "masking", "label_log_prior": "masking", "mask_tokens": "masking",
    "smoothed_token_weights": "masking",
    "Datasets": "pipeline", "global_batch": "pipeline", "make_datasets": "pipeline",
    "make_eval_batches": "pipeline",
    "Packer": "packing", "pack_documents": "packing", "segment_ids": "packing",
    "Prepared": "prepared",
    "SpecialIds": "tokens", "load_tokenizer": "tokens", "special_ids": "tokens",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    module = importlib.import_module(f"distil_jax.data.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module 'distil_jax.data' has no attribute {name!r}")
