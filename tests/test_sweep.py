"""`distil_jax.sweep`: a fused sweep equals separate runs and resumes after SIGTERM; a point is
finished at its last step (bad grids and --plan: test_cli.py)."""

import json
import signal
import time

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from distil_jax import checkpoint, sweep
from tests import runs
from tests.configs import sweep_points

POINTS = ["T1_ce0.5_seed0", "T1_ce5_seed1", "T4_ce0.5_seed2", "T4_ce5_seed3"]
SWEEP_CONFIG = "tests/configs/sweep_points.py"


def _start(workdir, bert_dir, corpus, *flags):
  return runs.start("sweep", workdir, bert_dir, corpus, *flags, config_path=SWEEP_CONFIG)


def _run(*args) -> str:
  return runs.finish(_start(*args))[0]


@pytest.fixture(scope="module")
def separate(tmp_path_factory, bert_dir, corpus):
  workdir = tmp_path_factory.mktemp("separate")
  _run(workdir, bert_dir, corpus, "--mode=separate")
  return workdir


@pytest.mark.slow
def test_fused_sweep_resumed_after_sigterm_equals_separate_runs(tmp_path, bert_dir, corpus,
                                                                 separate):
  process = _start(tmp_path, bert_dir, corpus)
  deadline = time.time() + 300
  while not (tmp_path / POINTS[-1] / "checkpoints" / "4").exists():
    assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0 and "start the same command again" in output, output[-3000:]
  assert not (tmp_path / POINTS[0] / "export").exists()
  output = _run(tmp_path, bert_dir, corpus)
  assert "Resumed from step" in output and "Sweep of 4 points in 1 group" in output

  plan = json.loads((tmp_path / "sweep.json").read_text())
  assert [p["workdir"] for p in plan] == POINTS
  assert plan[1]["overrides"] == {"distill.temperature": 1.0, "distill.alpha_ce": 5.0, "seed": 1}
  for point, spec in zip(POINTS, plan, strict=True):
    fused, alone = tmp_path / point, separate / point
    config = json.loads((fused / "config.json").read_text())
    assert config["distill"]["alpha_ce"] == spec["overrides"]["distill.alpha_ce"]
    assert config["seed"] == spec["overrides"]["seed"]
    expected = runs.train_losses(alone)
    assert sorted(runs.train_losses(fused)) == sorted(expected) == list(range(1, 11))
    # fp32, the same operations in the same order: only XLA's vmapped kernels differ.
    np.testing.assert_allclose([runs.train_losses(fused)[s] for s in expected],
                               list(expected.values()), rtol=1e-5, err_msg=point)
    weights = safetensors.numpy.load_file(fused / "export" / "model.safetensors")
    for name, value in safetensors.numpy.load_file(
        alone / "export" / "model.safetensors").items():
      np.testing.assert_allclose(weights[name], value, atol=1e-6, err_msg=f"{point} {name}")
  # The points really differ (temperature, weights, dropout seed).
  finals = [runs.train_losses(tmp_path / p)[10] for p in POINTS]
  assert len(set(finals)) == 4

  output = _run(tmp_path, bert_dir, corpus)
  assert "Group 0 is finished" in output and "Resumed" not in output


@pytest.mark.parametrize("export", [True, False])
def test_a_point_is_finished_at_its_last_step_with_or_without_export(tmp_path, export):
  config = sweep_points.get_config()
  config.export = export
  point = sweep.Point({}, "point", config)
  steps = [config.total_steps - 2, config.total_steps]
  with checkpoint.Checkpointer(tmp_path / "point", save_every_steps=1, keep_last=2) as ckpt:
    for step in steps:
      assert not sweep.finished(point, tmp_path)
      ckpt.save(step, {"x": jnp.zeros(2)}, {})
      ckpt.wait()
  if export:  # A point that exports is finished when its export is there.
    assert not sweep.finished(point, tmp_path)
    (tmp_path / "point" / "export").mkdir()
    (tmp_path / "point" / "export" / "config.json").write_text("{}")
  assert sweep.finished(point, tmp_path)
