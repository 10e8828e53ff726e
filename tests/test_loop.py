"""The one training loop on a toy task (least squares, SGD): cadence, resume, the non-finite
policy, preemption, stacked runs, the logged learning rate and MFU. No model: seconds, not
minutes; the commands' own runs are in test_main, test_sweep, test_finetune and test_faults."""

import dataclasses
import functools
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


def _one_run(state, batch, lr_scale, proceed, stack_axis=None):
  loss_fn = lambda p: jnp.sum((p["w"] - batch["x"]) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  state, grad_norm, finite = optim.apply_update(state, grads, lr_scale, loss, tx=TX,
                                                stack_axis=stack_axis, proceed=proceed)
  return state, {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                 "tokens": jnp.float32(4)}


def _task(batches, lr_scales=None, stop_together=False):
  """One run, or with `lr_scales` a stack of runs (one per scale) on the same batches."""
  if lr_scales is None:
    step = jax.jit(lambda s, b, p: _one_run(s, b, 1.0, p))
    evaluate = lambda p: [{"eval_loss": float(jnp.sum((p["w"] - TARGET) ** 2))}]
  else:
    scales = jnp.asarray(lr_scales, jnp.float32)
    one_run = functools.partial(_one_run, stack_axis="runs" if stop_together else None)
    step = jax.jit(lambda s, b, p: jax.vmap(one_run, in_axes=(0, None, 0, None),
                                            axis_name="runs")(s, b, scales, p))
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
  """Checkpoint 3 is the state before the non-finite step 4, with the data before its batch:
  running again redoes step 4 (and stops again, saving nothing); without the fault, the resumed
  run equals an uninterrupted one. At step 3, checkpoint 2 (on the interval) is that state."""
  for saved in ("saved the last finite state as checkpoint 3", "checkpoint 3 holds the last "
                "finite state"):
    with pytest.raises(errors.Diverged, match=r"^step 4 is not finite \(loss=nan\); no update of "
                                              rf"step 4 was applied; {saved}: lower the learning "
                                              r"rate and run again with --allow_config_change "
                                              r"\(it resumes from step 3\); add --resume_step=N "
                                              r"to rewind to an earlier checkpoint \(steps 2\)$"):
      _train(tmp_path, Batches(poisoned={4}))
    assert checkpoint.saved_steps(tmp_path) == [2, 3]
  np.testing.assert_array_equal(_w(_train(tmp_path)), _w(_train(tmp_path / "whole")))
  with pytest.raises(errors.Diverged, match=r"checkpoint 2 holds the last finite state"):
    _train(tmp_path / "at3", Batches(poisoned={3}))
  assert checkpoint.saved_steps(tmp_path / "at3") == [2]
  with pytest.raises(errors.Diverged, match=r"nothing to save at the first step"):
    _train(tmp_path / "at1", Batches(poisoned={1}))
  assert checkpoint.saved_steps(tmp_path / "at1") == []


def test_a_stack_stops_together_at_its_last_finite_state(tmp_path):
  """Run b's learning rate (1e9 times a's) overflows its parameters at step 3; with stop_together,
  run a's update of step 3 is not applied either: both runs save their state of step 2 (no
  checkpoint is due before), run a's equal to two steps of its own."""
  dirs = [tmp_path / "a", tmp_path / "b"]
  cadence = dataclasses.replace(CADENCE, checkpoint_every_steps=100)
  with pytest.raises(errors.Diverged, match=r"^b: step 3 is not finite \(the updated "
                                            r"parameters\); no update of step 3 was applied; "
                                            r"saved the last finite state as checkpoint 2"):
    loop.train(_task(Batches(), lr_scales=[1.0, 1e9], stop_together=True), _state(2),
               [loop.Run("a", dirs[0]), loop.Run("b", dirs[1])], dirs, cadence)
  assert checkpoint.saved_steps(dirs[0]) == checkpoint.saved_steps(dirs[1]) == [2]
  alone = _train(tmp_path / "alone", cadence=dataclasses.replace(cadence, total_steps=2))
  with checkpoint.Checkpointer(dirs[0], save_every_steps=1, keep_last=5) as ckpt:
    np.testing.assert_allclose(ckpt.restore_on_one_device(2)["params"]["w"], _w(alone),
                               rtol=1e-6)


def test_nonfinite_steps_are_skipped_up_to_the_limit(tmp_path):
  cadence = dataclasses.replace(CADENCE, on_nonfinite="skip", max_skipped_steps=1,
                                log_every_steps=1)
  with pytest.raises(errors.Diverged, match=r"step 5 is not finite .*: 2 steps skipped, more "
                                            r"than max_skipped_steps=1; saved the state of step 5"):
    _train(tmp_path, Batches(poisoned={2, 5}), cadence)
  assert [r["skipped_steps"] for r in _rows(tmp_path, "train")] == [0, 1, 1, 1, 2]
  assert checkpoint.saved_steps(tmp_path) == [2, 4, 5]


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
