"""Tests of distil_jax.checkpoint: round trips, shardings, retention, errors and preemption."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distil_jax import checkpoint
from tests import runs

REPO = pathlib.Path(__file__).resolve().parents[1]


def _state(seed=0, width=3):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {
      "dense": {"kernel": jax.random.normal(k1, (4, width)), "bias": jnp.arange(width) / 7},
      "embed": jax.random.normal(k2, (5, 4), jnp.bfloat16),
      "ids": jax.random.randint(k3, (6,), 0, 1000),
  }
  trainable = {"dense": params["dense"], "embed": params["embed"]}
  opt = optax.adamw(1e-2)
  opt_state = opt.init(trainable)
  grads = jax.tree.map(jnp.ones_like, trainable)
  _, opt_state = opt.update(grads, opt_state, trainable)
  return {"step": jnp.int32(seed + 7), "params": params, "opt_state": opt_state}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_bit_equal(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def _steps_on_disk(ckpt):
  return sorted(int(p.name) for p in ckpt.directory.iterdir() if p.name.isdigit())


@contextlib.contextmanager
def _running(script, *args):
  """Runs `script` in a fresh Python (its own jax and devices); kills it if the test fails."""
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  try:
    yield proc
  finally:
    proc.kill()
    proc.communicate()


def test_round_trip_is_bit_identical(tmp_path):
  state = _state()
  data_state = {"epoch": 2, "position": 12345, "shard": "train-00003", "seeds": [1, 2]}
  with checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=2) as ckpt:
    assert ckpt.save(10, state, data_state, eval_loss=1.5)
    ckpt.wait()
  with checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=2) as ckpt:
    assert ckpt.latest_step() == 10
    restored, restored_data = ckpt.restore(_abstract(state))
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  _assert_bit_equal(restored, state)
  assert restored_data == data_state


_SHARDED = """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from distil_jax.checkpoint import Checkpointer

    # Saved on a 4x2 mesh, restored onto a 2x4 mesh with other partitionings.
    save_mesh = jax.make_mesh((4, 2), ("data", "model"))
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    specs = {"kernel": P("data", "model"), "embed": P(None, "model"), "step": P()}
    state = {
        "kernel": jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) / 3,
        "embed": jax.random.normal(jax.random.key(0), (6, 8), jnp.bfloat16),
        "step": jnp.int32(5),
    }
    state = {k: jax.device_put(v, NamedSharding(save_mesh, P(*reversed(specs[k]))))
             for k, v in state.items()}
    target = {k: NamedSharding(mesh, spec) for k, spec in specs.items()}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=target[k])
                for k, v in state.items()}
    with Checkpointer(sys.argv[1], save_every_steps=5, keep_last=1) as ckpt:
      ckpt.save(5, state, {"position": 3})
      ckpt.wait()
      restored, data = ckpt.restore(abstract)
    print(json.dumps({
        "devices": jax.device_count(),
        "same_sharding": {k: restored[k].sharding == target[k] for k in state},
        "saved_sharding_differs": {k: state[k].sharding != target[k] for k in state},
        "bit_equal": {k: np.asarray(restored[k]).tobytes() == np.asarray(state[k]).tobytes()
                      for k in state},
        "data": data,
    }))
"""


def test_restore_onto_mesh_gives_requested_shardings(tmp_path):
  with _running(_SHARDED, tmp_path) as proc:
    out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["devices"] == 8
  assert result["same_sharding"] == {"kernel": True, "embed": True, "step": True}
  assert result["saved_sharding_differs"] == {"kernel": True, "embed": True, "step": True}
  assert result["bit_equal"] == {"kernel": True, "embed": True, "step": True}
  assert result["data"] == {"position": 3}


def test_keeps_last_k_and_best_eval_loss(tmp_path):
  state = {"x": jnp.zeros(2)}
  losses = {10: 3.0, 20: 1.0, 30: None, 40: 2.0, 50: None, 60: None}
  with checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=2) as ckpt:
    for step, loss in losses.items():
      assert ckpt.save(step, state, {}, eval_loss=loss)
    ckpt.wait()
    assert _steps_on_disk(ckpt) == [20, 50, 60]
    assert ckpt.best_step() == 20
  # The best survives a restart; a NaN eval loss never becomes the best.
  with checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=2) as ckpt:
    assert ckpt.save(70, state, {}, eval_loss=5.0)
    assert ckpt.save(80, state, {}, eval_loss=float("nan"))
    ckpt.wait()
    assert _steps_on_disk(ckpt) == [20, 70, 80]
    assert ckpt.best_step() == 20
    assert ckpt.save(90, state, {}, eval_loss=0.5)
    ckpt.wait()
    assert _steps_on_disk(ckpt) == [80, 90]


def test_keep_best_off_keeps_last_k_only(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=1, keep_last=2, keep_best=False) as ckpt:
    for step, loss in [(1, 0.1), (2, 5.0), (3, 6.0)]:
      ckpt.save(step, {"x": jnp.zeros(2)}, {}, eval_loss=loss)
    ckpt.wait()
    assert _steps_on_disk(ckpt) == [2, 3]


def test_save_interval_force_and_async_wait(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=5, keep_last=10) as ckpt:
    saved = [step for step in range(1, 13) if ckpt.save(step, {"x": jnp.full(3, step)}, {})]
    assert saved == [5, 10]
    assert ckpt.save(12, {"x": jnp.full(3, 12)}, {"at": 12}, force=True)
    # An existing step is never overwritten, forced or not.
    assert not ckpt.save(12, {"x": jnp.full(3, -1)}, {"at": -1}, force=True)
    assert not ckpt.save(10, {"x": jnp.full(3, -1)}, {"at": -1}, force=True)
    ckpt.wait()
    assert _steps_on_disk(ckpt) == [5, 10, 12]
    assert sorted(p.name for p in ckpt.directory.iterdir()) == ["10", "12", "5"]
    restored, data = ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.int32)})
  np.testing.assert_array_equal(restored["x"], [12, 12, 12])
  assert data == {"at": 12}


def test_empty_workdir(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=5, keep_last=1) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(checkpoint.CheckpointError, match=r"^no checkpoint in .*checkpoints; "):
      ckpt.restore({"x": jax.ShapeDtypeStruct((3,), jnp.float32)})


def _saved(tmp_path, steps=(10, 20)):
  state = _state()
  with checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=5) as ckpt:
    for step in steps:
      ckpt.save(step, state, {"step": step})
  return state


def test_missing_step_lists_available_steps(tmp_path):
  state = _saved(tmp_path)
  with (checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=5) as ckpt,
        pytest.raises(checkpoint.CheckpointError) as error):
    ckpt.restore(_abstract(state), step=15)
  assert str(error.value) == (
      f"no checkpoint of step 15 in {tmp_path}/checkpoints; available steps: [10, 20]")


def test_shape_mismatch_names_leaf_shapes_and_fix(tmp_path):
  _saved(tmp_path)
  with (checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=5) as ckpt,
        pytest.raises(checkpoint.CheckpointError) as error):
    ckpt.restore(_abstract(_state(width=8)))
  message = str(error.value)
  assert "\n" not in message
  assert message == (
      "checkpoint step 20 does not match the model: leaf 'opt_state/0/mu/dense/bias' has shape "
      "(3,) in the checkpoint but (8,) in the model; this workdir holds a checkpoint of a "
      "different model; use a new --workdir")


def test_structure_mismatch_names_leaf(tmp_path):
  state = _saved(tmp_path)
  with checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=5) as ckpt:
    extra = {**state, "params": {**state["params"], "head": jnp.zeros(2)}}
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"has no leaf 'params/head' \(shape \(2,\) in the model\); this"):
      ckpt.restore(_abstract(extra))
    fewer = {k: v for k, v in state.items() if k != "opt_state"}
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"has leaves the model lacks \(opt_state/0/count, "):
      ckpt.restore(_abstract(fewer))


# orbax's failed read leaves a tensorstore callback to its closed asyncio loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate_data", "truncate_metadata", "delete_state"])
def test_corrupt_checkpoint_is_reported_and_kept(tmp_path, damage):
  state = _saved(tmp_path)
  step_dir = tmp_path / "checkpoints" / "20"
  if damage == "truncate_data":
    for path in (step_dir / "state" / "d").iterdir():
      path.write_bytes(b"")
  elif damage == "truncate_metadata":
    (step_dir / "state" / "_METADATA").write_bytes(b"")
  else:
    for path in (step_dir / "state").rglob("*"):
      if path.is_file():
        path.unlink()
  files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  with checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=5) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpoint) as error:
      ckpt.restore(_abstract(state))
    restored, data = ckpt.restore(_abstract(state), step=10)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(
      f"checkpoint step 20 in {tmp_path}/checkpoints is corrupt or incomplete (")
  assert message.endswith(f"use another step (available: [10, 20]) or move {step_dir} out of "
                          "the way")
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files_before
  _assert_bit_equal(restored, state)
  assert data == {"step": 10}


def test_corrupt_metrics_file_is_reported(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=5) as ckpt:
    ckpt.save(10, {"x": jnp.zeros(2)}, {}, eval_loss=1.0)
  (tmp_path / "checkpoints" / "10" / "metrics" / "metrics").write_text("{")
  with pytest.raises(checkpoint.CheckpointError, match=r"^cannot read the checkpoints in .*; move"):
    checkpoint.Checkpointer(tmp_path, save_every_steps=10, keep_last=5)
  assert (tmp_path / "checkpoints" / "10" / "state").is_dir()


def test_watcher_restores_previous_sigterm_handler():
  def previous(signum, frame):
    del signum, frame

  before = signal.signal(signal.SIGTERM, previous)
  try:
    with checkpoint.PreemptionWatcher() as watcher:
      assert signal.getsignal(signal.SIGTERM) not in (previous, before)
      assert not watcher.should_stop(1)
      signal.raise_signal(signal.SIGTERM)
      assert watcher.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, before)


# The train loop of the module docstring, on a counter; `distributed` uses JAX's preemption
# service (one process) instead of the Python SIGTERM handler.
_LOOP = """
    import sys
    import jax, jax.numpy as jnp
    from distil_jax.checkpoint import Checkpointer, PreemptionWatcher

    workdir, num_steps, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if port:
      jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0)
    state, data = {"count": jnp.int32(0)}, {"step": 0}
    with (Checkpointer(workdir, save_every_steps=100, keep_last=2) as ckpt,
          PreemptionWatcher() as watcher):
      step = 0
      if ckpt.latest_step() is not None:
        state, data = ckpt.restore(jax.eval_shape(lambda: state))
        step = ckpt.latest_step()
      print("start", step, int(state["count"]), data["step"], flush=True)
      while step < num_steps and not watcher.should_stop(step):
        step += 1
        state = {"count": state["count"] + 1}
        ckpt.save(step, state, {"step": step})
        if step == 250:
          print("ready", flush=True)
      ckpt.save(step, state, {"step": step}, force=True)
    print("stopped", step, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("distributed", [False, True])
def test_sigterm_saves_exits_cleanly_and_resumes(tmp_path, distributed):
  port = runs.free_port() if distributed else 0
  with _running(_LOOP, tmp_path, 10**9, port) as proc:
    assert proc.stdout.readline().split() == ["start", "0", "0", "0"]
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  stopped = int(out.split()[-1])
  assert stopped >= 250

  last_interval_step = (stopped - 1) // 100 * 100
  with checkpoint.Checkpointer(tmp_path, save_every_steps=100, keep_last=2) as ckpt:
    assert ckpt.latest_step() == stopped
    assert _steps_on_disk(ckpt) == [last_interval_step, stopped]

  with _running(_LOOP, tmp_path, stopped + 3, 0) as proc:
    out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  assert out.split() == ["start", str(stopped), str(stopped), str(stopped),
                         "stopped", str(stopped + 3)]
