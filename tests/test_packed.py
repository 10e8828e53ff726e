"""A packed row is its documents run apart: per-token logits and hidden states of teacher and
student, and the distillation step's losses and update, equal those of the documents one per row
(float32, 1e-5)."""

import jax
import numpy as np
import optax
import pytest
from helpers import setup

from distil_jax import distill_step, losses, models
from distil_jax.data import segment_ids

CLS, SEP, MASK = 1, 2, 3
LENGTH = 24
DOCUMENTS = [[7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [17, 18]]  # Without [CLS] and [SEP].


def _rows():
  """(one packed row, the documents one per row), as ids [rows, LENGTH] with 0 padding."""
  pieces = [[CLS, *d, SEP] for d in DOCUMENTS]
  packed = np.zeros((1, LENGTH), np.int32)
  flat = [t for p in pieces for t in p]
  packed[0, :len(flat)] = flat
  apart = np.zeros((len(pieces), LENGTH), np.int32)
  for row, piece in zip(apart, pieces, strict=True):
    row[:len(piece)] = piece
  return packed, apart


def _positions(rows) -> list[tuple[int, int]]:
  """(row, column) of every real token, document by document."""
  return [(r, c) for r in range(rows.shape[0]) for c in range(rows.shape[1]) if rows[r, c]]


@pytest.mark.parametrize("model", ["teacher", "student"])
def test_a_packed_row_gives_each_document_its_own_outputs(model):
  run = setup()
  config = run["config"].teacher if model == "teacher" else run["config"].student
  params = (run["teacher_params"] if model == "teacher"
            else jax.tree.map(np.asarray, run["state"]["params"]["student"]))
  packed, apart = _rows()
  apply = jax.jit(models.Encoder(config).apply)
  out_packed = apply({"params": params}, packed, segment_ids(packed, CLS, 0))
  out_apart = apply({"params": params}, apart, (apart != 0).astype(np.int32))
  here, there = (tuple(zip(*_positions(rows), strict=True)) for rows in (packed, apart))
  for a, b in zip(out_packed.hidden_states, out_apart.hidden_states, strict=True):
    np.testing.assert_allclose(np.asarray(a)[here], np.asarray(b)[there], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out_packed.logits)[here],
                             np.asarray(out_apart.logits)[there], atol=1e-5, rtol=1e-5)
  # Not by chance: the same row read as one document gives other outputs.
  whole = apply({"params": params}, packed, (packed != 0).astype(np.int32))
  assert np.abs(np.asarray(whole.hidden_states[-1])[here]
                - np.asarray(out_packed.hidden_states[-1])[here]).max() > 1e-2


@pytest.mark.parametrize("restrict_ce_to_mask", [False, True])
def test_the_step_on_a_packed_row_equals_the_step_on_its_documents(restrict_ce_to_mask):
  """Losses (L_ce, L_mlm, L_cos, L_mse) and the SGD update, the teacher's forward included."""
  packed, apart = _rows()
  batches = []
  for rows, segments in ((packed, segment_ids(packed, CLS, 0)),
                         (apart, (apart != 0).astype(np.int32))):
    chosen = np.isin(rows, [8, 12, 15, 18])  # The same tokens masked either way.
    batches.append({"input_ids": np.where(chosen, MASK, rows).astype(np.int32),
                    "attention_mask": segments,
                    "labels": np.where(chosen, rows, losses.IGNORE_INDEX).astype(np.int32)})
  run = setup(sgd=True, lr=1.0, restrict_ce_to_mask=restrict_ce_to_mask)
  results = []
  for batch in batches:
    state = jax.tree.map(np.copy, jax.tree.map(np.asarray, run["state"]))
    step = jax.jit(lambda s, b: distill_step.train_step(
        s, run["teacher"], b, distill_step.Hyper(), config=run["config"], tx=optax.sgd(1.0)))
    new_state, metrics = step(state, batch)
    results.append((jax.tree.map(np.asarray, new_state["params"]), jax.device_get(metrics)))
  (params_packed, m_packed), (params_apart, m_apart) = results
  for key in ("loss", "loss_ce", "loss_mlm", "loss_cos", "loss_mse", "tokens"):
    np.testing.assert_allclose(m_packed[key], m_apart[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               params_packed, params_apart)
