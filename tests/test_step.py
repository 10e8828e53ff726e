"""The train step: teacher frozen, exact gradient accumulation, optimizer options, overfitting."""

import jax
import numpy as np
import pytest
from helpers import fresh_state, random_batch, setup

from distil_jax import losses, models, step

WEIGHTS = step.Hyper()


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                    strict=True))


def test_teacher_is_bit_identical_and_only_the_student_changes():
  run = setup()
  before = jax.tree.map(np.asarray, run["state"]["params"])
  teacher_before = jax.tree.map(np.asarray, run["teacher"])
  state, metrics = run["train"](fresh_state(run), run["teacher"], random_batch(8), WEIGHTS)
  assert _leaves_equal(jax.tree.map(np.asarray, run["teacher"]), teacher_before)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, state["params"])
  assert all(jax.tree.leaves(changed))
  assert int(state["step"]) == 1
  assert set(metrics) >= {"loss", "loss_ce", "loss_mlm", "loss_cos", "loss_mse",
                          "student_accuracy", "teacher_accuracy", "grad_norm", "tokens"}


def test_metrics_parts_make_the_total():
  run = setup()
  _, m = run["train"](fresh_state(run), run["teacher"], random_batch(8), WEIGHTS)
  np.testing.assert_allclose(m["loss"], 5 * m["loss_ce"] + 2 * m["loss_mlm"] + m["loss_cos"],
                             rtol=1e-5)


def _gradient(batch, **kwargs):
  """The first step's gradient (SGD with lr 1: the update is minus the gradient), and metrics."""
  run = setup(sgd=True, lr=1.0, **kwargs)
  before = jax.tree.map(np.asarray, run["state"]["params"])
  state, metrics = run["train"](fresh_state(run), run["teacher"], batch, WEIGHTS)
  return jax.tree.map(lambda a, b: a - np.asarray(b), before, state["params"]), metrics


def _assert_same_step(a, b, keys):
  (grads_a, metrics_a), (grads_b, metrics_b) = a, b
  for key in keys:
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=1e-4, err_msg=key)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads_b))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-4 * scale), grads_a, grads_b)


@pytest.mark.parametrize("restrict", [False, True])
def test_gradient_accumulation_equals_one_big_batch(restrict):
  batch = random_batch(8, seed=3)  # Rows of unequal lengths and masked counts.
  _assert_same_step(_gradient(batch, accum_steps=4, restrict_ce_to_mask=restrict),
                    _gradient(batch, accum_steps=1, restrict_ce_to_mask=restrict),
                    ("loss", "loss_ce", "loss_mlm", "loss_cos", "student_accuracy"))


def test_masked_position_gather_gives_the_same_losses():
  batch = random_batch(8, seed=5)
  _assert_same_step(_gradient(batch, restrict_ce_to_mask=True),
                    _gradient(batch, restrict_ce_to_mask=True, gather_logits=False),
                    ("loss", "loss_ce", "loss_mlm", "student_accuracy", "teacher_accuracy"))


def test_frozen_position_embeddings_and_weight_decay_mask():
  run = setup(frozen=("position_embeddings",), weight_decay=0.5)
  before = jax.tree.map(np.asarray, run["state"]["params"]["student"])
  state, _ = run["train"](fresh_state(run), run["teacher"], random_batch(8), WEIGHTS)
  after = jax.tree.map(np.asarray, state["params"]["student"])
  np.testing.assert_array_equal(after["embeddings"]["position_embeddings"]["embedding"],
                                before["embeddings"]["position_embeddings"]["embedding"])
  assert not np.array_equal(after["embeddings"]["word_embeddings"]["embedding"],
                            before["embeddings"]["word_embeddings"]["embedding"])
  # With zero gradients Adam's step is 0, so the update is the decay alone: -lr * wd * param on
  # kernels and embeddings, nothing on biases and LayerNorm.
  # A multiplied group decays (and steps) `factor` times faster; a frozen one does not move.
  tx, _ = step.make_optimizer(total_steps=10, lr_peak=1e-2, warmup_steps=0, weight_decay=0.5,
                              lr_multipliers=[("head", 10.0)], frozen=["pos"])
  params = {"student": {"fc": {"kernel": np.ones((2, 2)), "bias": np.ones(2)},
                        "norm": {"scale": np.ones(2)}, "word": {"embedding": np.ones((3, 2))},
                        "head": {"kernel": np.ones((2, 2))}, "pos": {"embedding": np.ones(2)}}}
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
  updates = jax.tree.map(np.asarray, updates["student"])
  np.testing.assert_allclose(updates["fc"]["kernel"], -5e-3, rtol=1e-6)
  np.testing.assert_allclose(updates["word"]["embedding"], -5e-3, rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["kernel"], -5e-2, rtol=1e-6)
  np.testing.assert_array_equal(updates["fc"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)
  np.testing.assert_array_equal(updates["pos"]["embedding"], 0.0)


def test_learning_rate_schedule_warms_up_then_decays():
  _, schedule = step.make_optimizer(total_steps=100, lr_peak=5e-4, warmup_steps=5)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(50), schedule(100)],
                             [0.0, 5e-4, 5e-4 * 50 / 95, 0.0], rtol=1e-6, atol=1e-12)


def test_mlm_only_training_without_teacher():
  run = setup(with_teacher=False)
  state, metrics = run["train"](fresh_state(run), None, random_batch(8), step.Hyper(
      losses.LossWeights(alpha_mlm=1.0)))
  assert set(metrics) >= {"loss", "loss_mlm", "student_accuracy"}
  assert "loss_ce" not in metrics and "teacher_accuracy" not in metrics
  np.testing.assert_allclose(metrics["loss"], metrics["loss_mlm"], rtol=1e-6)
  assert int(state["step"]) == 1


def test_projection_lets_a_narrower_student_use_the_cosine_loss():
  run = setup(project=True)
  before = np.asarray(run["state"]["params"]["projection"]["kernel"])
  state, metrics = run["train"](fresh_state(run), run["teacher"], random_batch(8), WEIGHTS)
  assert np.isfinite(metrics["loss_cos"])
  assert not np.array_equal(before, state["params"]["projection"]["kernel"])


def test_narrower_student_without_projection_is_refused():
  with pytest.raises(ValueError, match="set distill.project_student_hidden=True"):
    run = setup(project=True)
    state = dict(run["state"], params={"student": run["state"]["params"]["student"]})
    step.train_step(state, run["teacher"], random_batch(8), WEIGHTS, config=run["config"],
                    tx=run["tx"])


def test_overfitting_a_fixed_batch_drives_the_loss_down():
  """Labels are the teacher's own predictions, so every loss part can approach zero together."""
  run = setup()
  batch = random_batch(8, seed=1)
  teacher_logits = models.Encoder(run["config"].teacher).apply(
      {"params": run["teacher_params"]}, batch["input_ids"], batch["attention_mask"]).logits
  batch["labels"] = np.where(batch["labels"] != losses.IGNORE_INDEX,
                             np.argmax(teacher_logits, -1), losses.IGNORE_INDEX).astype(np.int32)
  state, first = run["train"](fresh_state(run), run["teacher"], batch, WEIGHTS)
  for _ in range(99):
    state, metrics = run["train"](state, run["teacher"], batch, WEIGHTS)
  assert float(metrics["loss"]) < float(first["loss"]) / 10
  assert float(metrics["student_accuracy"]) > 0.9


def test_eval_step_sums_and_summary():
  run = setup()
  batch = random_batch(8, seed=2)
  sums = run["evaluate"](run["state"]["params"], run["teacher"], batch)
  count = (batch["labels"] != losses.IGNORE_INDEX).sum()
  assert float(sums["count"]) == min(count, 8 * 6)
  summary = step.summarize_eval(jax.tree.map(float, sums))
  assert 0 <= summary["agreement"] <= 1 and summary["kl_t1"] >= 0
  np.testing.assert_allclose(summary["student_perplexity"], np.exp(summary["eval_loss"]))


def test_masked_positions_beyond_max_predictions_are_counted_as_dropped():
  run = setup(restrict_ce_to_mask=True)
  batch = random_batch(8, seed=4, mask_every=1)  # Every real token masked: up to 12 per row.
  _, metrics = run["train"](fresh_state(run), run["teacher"], batch, WEIGHTS)
  per_row = (batch["labels"] != losses.IGNORE_INDEX).sum(1)
  assert float(metrics["dropped_predictions"]) == np.maximum(per_row - 6, 0).sum() > 0
  assert float(metrics["masked"]) == np.minimum(per_row, 6).sum()


def test_max_predictions_leaves_room_for_the_masking_rate():
  assert step.max_predictions(128, 0.15) == 33
  assert step.max_predictions(8, 0.15) == 6
