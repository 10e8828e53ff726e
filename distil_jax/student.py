"""A DistilBERT student initialised from its BERT teacher, the paper's way."""

import dataclasses
from collections.abc import Sequence

import numpy as np

from distil_jax import errors, models


def every_other_layer(num_teacher_layers: int, num_student_layers: int) -> list[int]:
  """Teacher layers spread evenly, first and last included: 12 -> 6 gives 0, 2, 4, 7, 9, 11."""
  return [int(i) for i in np.round(np.linspace(0, num_teacher_layers - 1, num_student_layers))]


def student_shape(teacher: models.ModelConfig, num_layers: int) -> models.ModelConfig:
  """A student's config: the teacher's, `num_layers` deep, without token-type embeddings."""
  return dataclasses.replace(teacher, num_layers=num_layers, type_vocab_size=0)


def student_from_teacher(config: models.ModelConfig, params: dict, layers: Sequence[int],
                         fold_token_type: bool = True, copy_head_transform: bool = True,
                         seed: int = 0) -> tuple[models.ModelConfig, dict]:
  """Builds a student (no token-type embeddings) from teacher `layers`, in order.

  Word and position embeddings, the embedding LayerNorm and the MLM head's bias are copied (its
  decoder is tied to the word embeddings). With `copy_head_transform`, so are the head's dense
  transform and LayerNorm; without, they start as BERT initialises them (seeded), as the
  original does unless told `--vocab_transform`. With `fold_token_type`, the teacher's
  token-type-0 vector is added to the position table, so the student's embedding output equals
  the teacher's (on token-type-0 inputs) at init; the original drops it.
  """
  layers = list(layers)
  bad = [i for i in layers if not 0 <= i < config.num_layers]
  if not layers or bad:
    raise errors.ConfigError(
        f"student layers {layers} must name teacher layers 0..{config.num_layers - 1}"
        f" (the teacher has {config.num_layers}): fix distill.student_layers")
  student_config = student_shape(config, len(layers))
  embeddings = {k: v for k, v in params["embeddings"].items() if k != "token_type_embeddings"}
  if fold_token_type and not config.is_distilbert:
    token_type_0 = np.asarray(params["embeddings"]["token_type_embeddings"]["embedding"][0])
    positions = np.asarray(embeddings["position_embeddings"]["embedding"])
    embeddings["position_embeddings"] = {"embedding": positions + token_type_0}
  head = dict(params["mlm_head"])
  if not copy_head_transform:
    rng = np.random.default_rng(seed)
    size = config.hidden_size
    head["transform"] = {"kernel": rng.normal(0, 0.02, (size, size)).astype(np.float32),
                         "bias": np.zeros(size, np.float32)}
    head["norm"] = {"scale": np.ones(size, np.float32), "bias": np.zeros(size, np.float32)}
  student = {"embeddings": embeddings, "mlm_head": head}
  for i, teacher_layer in enumerate(layers):
    student[f"layer_{i}"] = params[f"layer_{teacher_layer}"]
  return student_config, student
