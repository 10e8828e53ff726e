"""Tiny random teachers, students and batches for step-level tests."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from distil_jax import distill_step, losses, models, optim, sharding, stacked, student

VOCAB, SEQ = 64, 12
TEACHER = models.ModelConfig(vocab_size=VOCAB, hidden_size=16, num_layers=4, num_heads=2,
                             intermediate_size=32, max_positions=32, hidden_dropout=0.0,
                             attention_dropout=0.0)


def random_batch(batch_size: int, seed: int = 0, mask_every: int = 4) -> dict:
  """Random tokens, some rows padded; every `mask_every`-th real token is an MLM target."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, VOCAB, (batch_size, SEQ)).astype(np.int32)
  lengths = rng.randint(SEQ // 2, SEQ + 1, batch_size)
  attention = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
  ids = ids * attention
  targets = (attention == 1) & ((np.arange(SEQ)[None] + rng.randint(0, mask_every, (
      batch_size, 1))) % mask_every == 0)
  labels = np.where(targets, ids, losses.IGNORE_INDEX).astype(np.int32)
  return {"input_ids": np.where(targets, 3, ids).astype(np.int32), "attention_mask": attention,
          "labels": labels}


@functools.cache
def setup(teacher_config=TEACHER, student_layers=(0, 3), *, with_teacher=True, project=False,
          frozen=(), lr=1e-2, sgd=False, accum_steps=1, restrict_ce_to_mask=False,
          gather_logits=True, weight_decay=0.0, mesh=None, seed=0, num_runs=0, dropout=0.0,
          mse=True, logit_chunk=0):
  """Teacher, student, optimizer (AdamW, or SGD with `sgd`), sharded state and compiled steps on
  `mesh` (one device by default); with `num_runs`, that many copies of the student stacked.
  `dropout` is the hidden and attention dropout of both models (the step must keep the teacher
  deterministic). Cached: take the state with `fresh_state`, since the train step donates it."""
  teacher_config = dataclasses.replace(teacher_config, hidden_dropout=dropout,
                                       attention_dropout=dropout)
  # BERT's init (std 0.02) makes near-identity layers and flat logits; larger weights matter.
  teacher_params = traverse_util.path_aware_map(
      lambda path, x: x * 25 if path[-1] in ("kernel", "embedding") else x,
      models.init_params(teacher_config, seed))
  student_config, student_params = student.student_from_teacher(
      teacher_config, teacher_params, student_layers)
  if project:
    student_config = dataclasses.replace(student_config, hidden_size=8, intermediate_size=16)
    student_params = models.init_params(student_config, seed + 1)
  mesh = mesh or sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  config = distill_step.StepConfig(student=student_config,
                                   teacher=teacher_config if with_teacher else None,
                                   restrict_ce_to_mask=restrict_ce_to_mask,
                                   gather_logits=gather_logits, max_predictions=6,
                                   accum_steps=accum_steps, num_runs=num_runs, mse=mse,
                                   logit_chunk=logit_chunk)
  tx = optax.sgd(lr) if sgd else optim.make_optimizer(
      total_steps=200, lr_peak=lr, warmup_steps=0, frozen=frozen, weight_decay=weight_decay)[0]
  params = {"student": student_params}
  if project:
    params["projection"] = distill_step.init_projection(8, teacher_config.hidden_size)
    # A non-zero bias (it starts at zero), so that a step that leaves it out differs.
    params["projection"]["bias"] = jax.random.normal(jax.random.key(seed + 2),
                                                     (teacher_config.hidden_size,))
  if num_runs:
    params = stacked.stack([params] * num_runs)
  state, teacher, train, evaluate = distill_step.prepare(
      config, params, teacher_params if with_teacher else None, tx, mesh)
  return dict(state=state, teacher=teacher, train=train, evaluate=evaluate, config=config,
              teacher_params=teacher_params, mesh=mesh, tx=tx)


def fresh_state(run: dict) -> dict:
  """A copy of the run's initial state, for a train step to consume."""
  return jax.tree.map(jnp.copy, run["state"])
