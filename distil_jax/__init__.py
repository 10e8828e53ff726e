"""distil_jax: DistilBERT-style knowledge distillation in JAX/Flax."""

from distil_jax.hf import export_distilbert, export_hf, load_bert
from distil_jax.student import every_other_layer, student_from_teacher

__all__ = ["every_other_layer", "export_distilbert", "export_hf", "load_bert",
           "student_from_teacher"]
