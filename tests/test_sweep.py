"""`distil_jax.sweep`: a fused sweep equals separate runs, resumes after SIGTERM, and refuses bad
grids before any compute."""

import json
import signal
import time

import numpy as np
import pytest
import safetensors.numpy

from tests import runs

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


def test_plan_splits_the_grid_where_shapes_differ(tmp_path, bert_dir, corpus):
  output = _run(tmp_path, bert_dir, corpus, "--plan", "--sweep=student.num_layers=1,2",
                "--sweep=distill.temperature=2,8")
  groups = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
  assert [[p["workdir"] for p in g["points"]] for g in groups] == [
      ["L1_T2", "L1_T8"], ["L2_T2", "L2_T8"]]
  assert not (tmp_path / "sweep.json").exists()


@pytest.mark.parametrize("flag, message", [
    ("--sweep=distill.temprature=1,2",
     "FATAL --sweep='distill.temprature=1,2': unknown config key 'distill.temprature' (did you "
     "mean 'distill.temperature'?)"),
    ("--sweep=distill.temperature=hot",
     "FATAL --sweep value 'hot' for distill.temperature is not a float"),
    ("--sweep=distill.temperature=", "FATAL --sweep='distill.temperature=' gives no value"),
])
def test_bad_grids_fail_before_any_compute(tmp_path, bert_dir, corpus, flag, message):
  process = _start(tmp_path / "sweep", bert_dir, corpus, flag)
  output, _ = process.communicate(timeout=120)
  assert process.returncode != 0
  assert any(line.startswith(message) for line in output.splitlines()), output[-2000:]
  assert "Traceback" not in output and not (tmp_path / "sweep").exists()
