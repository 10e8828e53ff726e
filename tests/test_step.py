"""The train and eval steps against a reference built from their parts (tests/step_reference.py):
losses, gradients, accumulation, the gather, dropout and fused points; the optimizer options."""

from functools import partial

import jax
import numpy as np
import pytest
import step_reference as reference
from helpers import TEACHER, fresh_state, random_batch, setup
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from distil_jax import distill_step, losses, models, optim, stacked

# Five distinct values, so that a weight applied to the wrong part shows. Python floats: every
# test's Hyper has the same types, so the steps compiled by `setup` serve them all.
WEIGHTS = losses.LossWeights(temperature=3.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.5,
                             alpha_mse=0.02)
HYPER = distill_step.Hyper(WEIGHTS)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _sgd_step(batch, hyper=HYPER, **options):
  """One step of SGD at learning rate 1: (run, parameters before, minus the update, metrics).

  Minus the update is the step's gradient (times each point's lr_scale)."""
  run = setup(sgd=True, lr=1.0, **options)
  before = _host(run["state"]["params"])
  state, metrics = run["train"](fresh_state(run), run["teacher"], batch, hyper)
  update = jax.tree.map(lambda a, b: a - np.asarray(b), before, state["params"])
  return run, before, update, _host(metrics)


def _assert_trees_close(actual, expected):
  """Leaf by leaf, to float32 rounding of the largest entry."""
  scale = max(np.abs(x).max() for x in jax.tree.leaves(expected))
  jax.tree_util.tree_map_with_path(lambda path, a, e: np.testing.assert_allclose(
      a, e, rtol=1e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path)), actual, expected)


def _assert_metrics_match(metrics, expected):
  assert set(expected) <= set(metrics)
  for key, value in expected.items():
    np.testing.assert_allclose(metrics[key], value, rtol=2e-5, err_msg=key)


@pytest.mark.parametrize("options", [
    {}, pytest.param({"accum_steps": 4}, marks=pytest.mark.slow), {"restrict_ce_to_mask": True},
    {"restrict_ce_to_mask": True, "accum_steps": 4},
    pytest.param({"restrict_ce_to_mask": True, "gather_logits": False}, marks=pytest.mark.slow),
    {"project": True}, {"logit_chunk": 5},
    pytest.param({"restrict_ce_to_mask": True, "logit_chunk": 4, "accum_steps": 2},
                 marks=pytest.mark.slow),
], ids=["all_tokens", "all_tokens_accum4", "masked_gather", "masked_gather_accum4",
        "masked_no_gather", "projection", "all_tokens_chunked",
        "masked_chunked_accum2"])  # Three variants are in the slow tier only.
def test_train_step_equals_the_reference(options):
  batch = random_batch(8, seed=3)  # Rows of unequal lengths and masked counts.
  assert (batch["attention_mask"] == 0).any()
  run, params, update, metrics = _sgd_step(batch, **options)
  grads, expected = reference.gradient(params, run["teacher_params"], batch, WEIGHTS,
                                       config=run["config"])
  _assert_metrics_match(metrics, expected)
  _assert_trees_close(update, grads)
  if "projection" in params:
    assert np.abs(grads["projection"]["bias"]).min() > 0


def test_mlm_only_step_equals_the_students_own_mlm_loss():
  batch = random_batch(8, seed=3)
  run, params, update, metrics = _sgd_step(batch, with_teacher=False)
  assert "loss_ce" not in metrics and "teacher_accuracy" not in metrics
  grads, expected = reference.gradient(params, None, batch, WEIGHTS, config=run["config"])
  np.testing.assert_allclose(expected["loss"], WEIGHTS.alpha_mlm * expected["loss_mlm"])
  _assert_metrics_match(metrics, expected)
  _assert_trees_close(update, grads)


def test_step_without_mse_leaves_it_out_whatever_its_weight():
  batch = random_batch(8, seed=3)
  run, params, update, metrics = _sgd_step(batch, mse=False)  # HYPER's alpha_mse is 0.02.
  assert "loss_mse" not in metrics
  without = WEIGHTS._replace(alpha_mse=0.0)
  grads, expected = reference.gradient(params, run["teacher_params"], batch, without,
                                       config=run["config"])
  del expected["loss_mse"]
  _assert_metrics_match(metrics, expected)
  _assert_trees_close(update, grads)
  with_mse, _ = reference.gradient(params, run["teacher_params"], batch, WEIGHTS,
                                   config=run["config"])
  difference = jax.tree.map(lambda a, b: np.abs(a - b).max(), with_mse, grads)
  assert max(jax.tree.leaves(difference)) > 1e-3  # L_mse at 0.02 would show.


# Fused points with dropout: their updates differ by seed, and the teacher must stay deterministic.
FUSED = {"num_runs": 2, "dropout": 0.1}


def _dropout_key(seed: int) -> jax.Array:
  """The step's dropout key at step 0, micro-batch 0."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), 0)


def test_fused_points_equal_the_reference_of_each():
  hypers = [HYPER._replace(seed=7),
            distill_step.Hyper(losses.LossWeights(1.0, 0.5, 3.0, 0.0, 0.1), 0.25, 8)]
  batch = random_batch(8, seed=3)
  run, params, update, metrics = _sgd_step(batch, stacked.stack(hypers), **FUSED)
  for i, hyper in enumerate(hypers):
    take = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)
    grads, expected = reference.gradient(take(params), run["teacher_params"], batch,
                                         hyper.weights, config=run["config"],
                                         rng=_dropout_key(hyper.seed))
    _assert_metrics_match(take(metrics), expected)
    _assert_trees_close(take(update), jax.tree.map(partial(np.multiply, hyper.lr_scale), grads))


def test_dropout_is_the_students_alone_and_follows_the_seed():
  batch = random_batch(8, seed=3)
  hyper = stacked.stack([HYPER._replace(seed=7), HYPER._replace(seed=8)])  # Only seeds differ.
  run, params, update, metrics = _sgd_step(batch, hyper, **FUSED)
  assert run["config"].teacher.hidden_dropout == run["config"].student.hidden_dropout == 0.1
  again = _sgd_step(batch, hyper, **FUSED)[2]
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(update),
                                                  jax.tree.leaves(again), strict=True))
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  kernel = update["student"]["layer_0"]["fc1"]["kernel"]
  assert not np.allclose(kernel[0], kernel[1])
  # Against the reference's dropout with the step's key, and its deterministic teacher.
  grads, expected = reference.gradient(first(params), run["teacher_params"], batch, WEIGHTS,
                                       config=run["config"], rng=_dropout_key(7))
  _assert_metrics_match(first(metrics), expected)
  _assert_trees_close(first(update), grads)
  without_dropout, _ = reference.gradient(first(params), run["teacher_params"], batch, WEIGHTS,
                                          config=run["config"])
  difference = jax.tree.map(lambda a, b: np.abs(a - b).max(), first(update), without_dropout)
  assert max(jax.tree.leaves(difference)) > 0.1  # Rounding is below 1e-4.


def test_eval_step_equals_the_reference():
  run = setup()
  batch = random_batch(8, seed=2)
  params = _host(run["state"]["params"])
  sums = _host(run["evaluate"](params, run["teacher"], batch))
  expected = reference.eval_sums(params, run["teacher_params"], batch, config=run["config"])
  # The student disagrees with the teacher somewhere, and its KL is not symmetric there.
  assert 0 < expected["agreement"] < expected["count"]
  _assert_metrics_match(sums, expected)
  n = float(expected["count"])
  summary = distill_step.summarize_eval(jax.tree.map(float, sums))
  np.testing.assert_allclose(
      [summary[k] for k in ("eval_loss", "student_accuracy", "teacher_accuracy", "agreement",
                            "kl_t1", "student_perplexity", "teacher_perplexity")],
      [expected["student_nll"] / n, expected["student_correct"] / n,
       expected["teacher_correct"] / n, expected["agreement"] / n, expected["kl"] / n,
       np.exp(expected["student_nll"] / n), np.exp(expected["teacher_nll"] / n)], rtol=2e-5)


def test_summarize_eval_takes_each_figure_from_its_own_sums():
  sums = {"count": 4.0, "student_correct": 3.0, "student_nll": 2.0, "teacher_correct": 1.0,
          "teacher_nll": 6.0, "agreement": 2.0, "kl": 0.8}
  assert distill_step.summarize_eval(sums) == pytest.approx({
      "eval_loss": 0.5, "positions": 4.0, "student_accuracy": 0.75,
      "student_perplexity": np.exp(0.5), "teacher_accuracy": 0.25,
      "teacher_perplexity": np.exp(1.5), "agreement": 0.5, "kl_t1": 0.2})


def test_every_student_parameter_changes():
  run = setup()
  before = _host(run["state"]["params"])
  state, metrics = run["train"](fresh_state(run), run["teacher"], random_batch(8), HYPER)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, state["params"])
  assert all(jax.tree.leaves(changed))
  assert int(state["step"]) == 1
  assert set(metrics) >= {"loss", "loss_ce", "loss_mlm", "loss_cos", "loss_mse",
                          "student_accuracy", "teacher_accuracy", "grad_norm", "tokens"}


@settings(max_examples=30, deadline=None)
@given(masked=hnp.arrays(bool, st.tuples(st.integers(1, 4), st.integers(1, 10))),
       max_predictions=st.integers(1, 12))
def test_gather_keeps_every_masked_position_it_has_room_for(masked, max_predictions):
  labels = np.where(masked, 7 + np.arange(masked.size).reshape(masked.shape),
                    losses.IGNORE_INDEX)
  config = distill_step.StepConfig(student=TEACHER, teacher=None, max_predictions=max_predictions)
  targets = jax.jit(distill_step._logit_targets, static_argnums=0)(
      config, {"labels": labels, "attention_mask": np.ones_like(labels)})
  positions, valid, gathered = map(np.asarray, targets)
  per_row = masked.sum(1)
  np.testing.assert_array_equal(valid.sum(1), np.minimum(per_row, max_predictions))
  for row in range(len(labels)):
    kept = positions[row][valid[row]]
    assert len(set(kept)) == len(kept) and masked[row, kept].all()
    np.testing.assert_array_equal(gathered[row][valid[row]], labels[row, kept])
  assert (gathered[~valid] == losses.IGNORE_INDEX).all()


def test_frozen_position_embeddings_and_weight_decay_mask():
  run = setup(frozen=("position_embeddings",), weight_decay=0.5)
  before = jax.tree.map(np.asarray, run["state"]["params"]["student"])
  state, _ = run["train"](fresh_state(run), run["teacher"], random_batch(8), HYPER)
  after = jax.tree.map(np.asarray, state["params"]["student"])
  np.testing.assert_array_equal(after["embeddings"]["position_embeddings"]["embedding"],
                                before["embeddings"]["position_embeddings"]["embedding"])
  assert not np.array_equal(after["embeddings"]["word_embeddings"]["embedding"],
                            before["embeddings"]["word_embeddings"]["embedding"])
  # With zero gradients Adam's step is 0, so the update is the decay alone: -lr * wd * param on
  # kernels and embeddings, nothing on biases and LayerNorm.
  # A multiplied group decays (and steps) `factor` times faster; a frozen one does not move.
  tx, _ = optim.make_optimizer(total_steps=10, lr_peak=1e-2, warmup_steps=0, weight_decay=0.5,
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
  _, schedule = optim.make_optimizer(total_steps=100, lr_peak=5e-4, warmup_steps=5)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(50), schedule(100)],
                             [0.0, 5e-4, 5e-4 * 50 / 95, 0.0], rtol=1e-6, atol=1e-12)


def test_narrower_student_without_projection_is_refused():
  with pytest.raises(ValueError, match="set distill.project_student_hidden=True"):
    run = setup(sgd=True, lr=1.0, project=True)  # The cached one.
    state = dict(run["state"], params={"student": run["state"]["params"]["student"]})
    distill_step.train_step(state, run["teacher"], random_batch(8), HYPER, config=run["config"],
                    tx=run["tx"])


def test_overfitting_a_fixed_batch_drives_the_loss_down():
  """Labels are the teacher's own predictions, so every loss part can approach zero together."""
  run = setup()
  batch = random_batch(8, seed=1)
  teacher_logits = models.Encoder(run["config"].teacher).apply(
      {"params": run["teacher_params"]}, batch["input_ids"], batch["attention_mask"]).logits
  batch["labels"] = np.where(batch["labels"] != losses.IGNORE_INDEX,
                             np.argmax(teacher_logits, -1), losses.IGNORE_INDEX).astype(np.int32)
  state, first = run["train"](fresh_state(run), run["teacher"], batch, distill_step.Hyper())
  for _ in range(99):
    state, metrics = run["train"](state, run["teacher"], batch, distill_step.Hyper())
  assert float(metrics["loss"]) < float(first["loss"]) / 10
  assert float(metrics["student_accuracy"]) > 0.9


def test_masked_positions_beyond_max_predictions_are_counted_as_dropped():
  batch = random_batch(8, seed=4, mask_every=1)  # Every real token masked: up to 12 per row.
  _, _, _, metrics = _sgd_step(batch, restrict_ce_to_mask=True)
  per_row = (batch["labels"] != losses.IGNORE_INDEX).sum(1)
  assert float(metrics["dropped_predictions"]) == np.maximum(per_row - 6, 0).sum() > 0
  assert float(metrics["masked"]) == np.minimum(per_row, 6).sum()


def test_max_predictions_leaves_room_for_the_masking_rate():
  assert distill_step.max_predictions(128, 0.15) == 33
  assert distill_step.max_predictions(8, 0.15) == 6
