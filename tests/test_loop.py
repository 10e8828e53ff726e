"""The one training loop on a toy task (least squares, SGD): cadence, resume, the non-finite
policy, preemption, stacked runs, the logged learning rate and MFU. No model: seconds, not
minutes; the commands' own runs are in test_main, test_sweep, test_finetune and test_faults."""

import dataclasses
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from distil_jax import checkpoint, errors, loop, optim, sharding, stacked

TX = optax.sgd(0.1)
TARGET = np.arange(4, dtype=np.float32)


class Batches:
  """Batch k is TARGET plus noise seeded by k; NaN at the steps in `poisoned`."""

  def __init__(self, poisoned=()):
    self.step, self.poisoned = 0, set(poisoned)

  def __next__(self):
    self.step += 1
    x = TARGET + np.random.default_rng(self.step).normal(size=4).astype(np.float32)
    return {"x": np.full(4, np.nan, np.float32) if self.step in self.poisoned else x}

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = state["step"]


def _one_run(state, batch, lr_scale):
  loss_fn = lambda p: jnp.sum((p["w"] - batch["x"]) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  state, grad_norm, finite = optim.apply_update(state, grads, lr_scale, loss, tx=TX)
  return state, {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                 "tokens": jnp.float32(4)}


def _task(batches, lr_scales=None):
  """One run, or with `lr_scales` a stack of runs (one per scale) on the same batches."""
  if lr_scales is None:
    step = jax.jit(lambda s, b: _one_run(s, b, 1.0))
    evaluate = lambda p: [{"eval_loss": float(jnp.sum((p["w"] - TARGET) ** 2))}]
  else:
    scales = jnp.asarray(lr_scales, jnp.float32)
    step = jax.jit(lambda s, b: jax.vmap(_one_run, in_axes=(0, None, 0))(s, b, scales))
    evaluate = lambda p: [{"eval_loss": float(jnp.sum((w - TARGET) ** 2))} for w in p["w"]]
  return loop.Task(train_step=step, batches=batches, place=lambda b: b, evaluate=evaluate,
                   schedule=optax.constant_schedule(0.1), flops=lambda b: 1e3, peak_flops=1e9,
                   num_runs=len(lr_scales or ()))


def _state(num_runs=0):
  """The initial state on a one-device mesh (w = 0), or a stack of `num_runs` of them."""
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  params = {"w": np.zeros(4, np.float32)}
  shardings = {"w": NamedSharding(mesh, P())}
  if num_runs:
    params, shardings = stacked.stack([params] * num_runs), sharding.stacked(shardings)
  return optim.create_state(params, TX, shardings, mesh, num_runs)[0]


CADENCE = loop.Cadence(total_steps=6, log_every_steps=2, eval_every_steps=3,
                       checkpoint_every_steps=2, keep_checkpoints=10)


def _rows(directory, kind):
  return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()
          if json.loads(line)["kind"] == kind]


def _train(tmp_path, batches=None, cadence=CADENCE, resume_step=None):
  return loop.train(_task(batches or Batches()), _state(), [loop.Run("", tmp_path)], [tmp_path],
                    cadence, resume_step)


def _w(result):
  return np.asarray(result.state["params"]["w"])


def test_cadence_of_logs_evaluations_and_checkpoints(tmp_path):
  result = _train(tmp_path)
  assert result.finished and int(result.state["step"]) == 6
  assert [r["step"] for r in _rows(tmp_path, "train")] == [2, 4, 6]
  assert [r["step"] for r in _rows(tmp_path, "eval")] == [0, 3, 6]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4, 6]
  train = _rows(tmp_path, "train")
  assert all(r["lr"] == pytest.approx(0.1) and r["skipped_steps"] == 0 for r in train)
  # MFU: 2 steps of 1e3 FLOPs over the interval, against 1e9 per device.
  for row in train[1:]:
    assert row["mfu"] == pytest.approx(2e3 / (2 / row["steps_per_s"]) / 1e9 / jax.device_count())
  np.testing.assert_allclose(result.eval_metrics[0]["eval_loss"],
                             np.sum((_w(result) - TARGET) ** 2), rtol=1e-6)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
  whole = _train(tmp_path / "whole")
  _train(tmp_path / "part", cadence=dataclasses.replace(CADENCE, total_steps=4))
  resumed = _train(tmp_path / "part")
  np.testing.assert_array_equal(_w(resumed), _w(whole))
  assert [r["step"] for r in _rows(tmp_path / "part", "train")] == [2, 4, 6]
  # A rewind to step 2: later checkpoints set aside, the same steps redone.
  rewound = _train(tmp_path / "part", resume_step=2)
  np.testing.assert_array_equal(_w(rewound), _w(whole))
  assert sorted(p.name for p in (tmp_path / "part" / "set_aside").iterdir()) == ["4-after-2",
                                                                                 "6-after-2"]


def test_a_nonfinite_step_stops_the_run_with_its_last_finite_state_saved(tmp_path):
  with pytest.raises(errors.Diverged, match=r"^step 3 is not finite \(loss=nan\); its update "
                                            r"was not applied; saved the last finite state"):
    _train(tmp_path, Batches(poisoned={3}))
  before = _train(tmp_path / "two", cadence=dataclasses.replace(CADENCE, total_steps=2))
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep_last=5) as ckpt:
    assert ckpt.all_steps() == [2, 3]
    np.testing.assert_array_equal(ckpt.restore_on_one_device(3)["params"]["w"], _w(before))


def test_nonfinite_steps_are_skipped_up_to_the_limit(tmp_path):
  cadence = dataclasses.replace(CADENCE, on_nonfinite="skip", max_skipped_steps=1,
                                log_every_steps=1)
  with pytest.raises(errors.Diverged, match=r"step 5 is not finite .*: 2 steps skipped, more "
                                            r"than max_skipped_steps=1"):
    _train(tmp_path, Batches(poisoned={2, 5}), cadence)
  assert [r["skipped_steps"] for r in _rows(tmp_path, "train")] == [0, 1, 1, 1, 2]
  with pytest.raises(errors.ConfigError, match="on_nonfinite='ignore' is unknown"):
    _train(tmp_path / "bad", cadence=dataclasses.replace(CADENCE, on_nonfinite="ignore"))


def test_a_preemption_saves_and_raises_preempted(tmp_path):
  class Preempting(Batches):
    def __next__(self):
      if self.step == 2:
        signal.raise_signal(signal.SIGTERM)  # Caught by the loop's watcher.
      return super().__next__()
  with pytest.raises(errors.Preempted, match=r"^Preempted: saved step 3; start the same "):
    _train(tmp_path, Preempting())
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 3]
  np.testing.assert_array_equal(_w(_train(tmp_path)), _w(_train(tmp_path / "whole")))


def test_stacked_runs_save_each_run_in_its_own_workdir(tmp_path):
  dirs = [tmp_path / "a", tmp_path / "b"]
  result = loop.train(_task(Batches(), lr_scales=[1.0, 0.5]), _state(2),
                      [loop.Run("a", dirs[0], 1.0), loop.Run("b", dirs[1], 0.5)], dirs, CADENCE)
  assert [r["lr"] for r in _rows(dirs[1], "train")] == pytest.approx([0.05] * 3)
  whole = _w(result)
  np.testing.assert_allclose(whole[0], _w(_train(tmp_path / "alone")), rtol=1e-6)
  # Each workdir resumes a single run's state: the stack is cut at save and put back at resume.
  resumed = loop.train(_task(Batches(), lr_scales=[1.0, 0.5]), _state(2),
                       [loop.Run("a", dirs[0], 1.0), loop.Run("b", dirs[1], 0.5)], dirs, CADENCE)
  np.testing.assert_array_equal(_w(resumed), whole)
  assert resumed.eval_metrics[1]["eval_loss"] == pytest.approx(
      float(np.sum((whole[1] - TARGET) ** 2)))
