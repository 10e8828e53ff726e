"""distil_jax: DistilBERT-style knowledge distillation in JAX/Flax.

The names below are imported when first used, so that a process that needs only a light module
(a data-preparing process: no JAX, no models) starts fast.
"""

import importlib

_EXPORTS = {"load_bert": "distil_jax.hf", "export_hf": "distil_jax.hf",
            "export_distilbert": "distil_jax.hf", "every_other_layer": "distil_jax.student",
            "student_from_teacher": "distil_jax.student"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'distil_jax' has no attribute {name!r}")
