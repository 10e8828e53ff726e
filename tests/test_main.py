"""`distil_jax.main` end to end: a run, its export, resume after SIGTERM and kill -9, overrides."""

import json
import os
import pathlib
import re
import signal
import time

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from distil_jax import export
from tests import runs

pytestmark = pytest.mark.slow  # Runs of the command in subprocesses.


def _start(workdir, bert_dir, corpus, *flags):
  return runs.start("main", workdir, bert_dir, corpus, *flags)


def _run(*args) -> str:
  return runs.finish(_start(*args))[0]


def _weights(directory):
  return safetensors.numpy.load_file(directory / "export" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, bert_dir, corpus) -> tuple[pathlib.Path, str]:
  """The workdir and output of a run logging JAX's compiles."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  env = {**os.environ, "JAX_LOG_COMPILES": "1"}
  return workdir, runs.finish(runs.start("main", workdir, bert_dir, corpus, env=env))[0]


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> pathlib.Path:
  return uninterrupted_run[0]


def test_run_writes_config_metrics_checkpoints_and_an_export(uninterrupted):
  config = json.loads((uninterrupted / "config.json").read_text())
  assert config["total_steps"] == 60 and config["distill"]["temperature"] == 2.0
  losses = runs.train_losses(uninterrupted)
  assert sorted(losses) == list(range(1, 61)) and losses[60] < losses[1]
  evals = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text()
           .splitlines() if '"eval"' in line]
  assert [e["step"] for e in evals] == [0, 20, 40, 60]
  assert {"student_accuracy", "teacher_accuracy", "agreement", "kl_t1"} <= set(evals[-1])
  assert any((uninterrupted / "tensorboard").iterdir())
  model, info = transformers.DistilBertForMaskedLM.from_pretrained(
      uninterrupted / "export", output_loading_info=True)
  assert not any(info.values()) and model.config.n_layers == 2


def test_the_loop_runs_the_train_step_that_the_fit_check_compiled(uninterrupted_run):
  # Each lowering logs "Compiling"; a second one would compile the bert_base step again on a pod.
  assert uninterrupted_run[1].count("Compiling jit(train_step)") == 1


def test_export_command_matches_the_final_export(uninterrupted, tmp_path):
  out = export.export_checkpoint(uninterrupted, tmp_path / "hf", step=60)
  expected = _weights(uninterrupted)
  for name, value in safetensors.numpy.load_file(out / "model.safetensors").items():
    np.testing.assert_array_equal(value, expected[name], err_msg=name)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ids = tokenizer("the cat sat on the [MASK].", return_tensors="pt")
  with torch.no_grad():
    logits = transformers.AutoModelForMaskedLM.from_pretrained(out)(**ids).logits
  assert logits.shape[-1] == 30522


def _wait_for(path: pathlib.Path, process, timeout=300):
  start = time.time()
  while not path.exists():
    assert process.poll() is None, process.communicate()[0][-3000:]
    assert time.time() - start < timeout
    time.sleep(0.05)


def _latest_checkpoint(workdir) -> int:
  return max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_resumed(workdir, output: str, latest: int):
  """The run's log says it resumed from `latest`, the first step it logged is the next, and
  metrics.jsonl holds each step up to it once (rows of replayed steps are dropped)."""
  resumed = re.search(r"Resumed from step (\d+) of ", output)
  assert resumed and int(resumed[1]) == latest, output[-3000:]
  first_logged = re.search(r"\bstep (\d+)/\d+ loss=", output[resumed.end():])
  assert first_logged and int(first_logged[1]) == latest + 1, output[-3000:]
  assert set(range(1, latest + 2)) <= set(runs.train_losses(workdir))


def test_resume_after_sigterm_and_after_kill_9_equals_an_uninterrupted_run(
    uninterrupted, tmp_path, bert_dir, corpus):
  workdir = tmp_path / "interrupted"
  process = _start(workdir, bert_dir, corpus)
  _wait_for(workdir / "checkpoints" / "10", process)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output[-3000:]
  stopped_at = _latest_checkpoint(workdir)
  assert 10 <= stopped_at < 60, "SIGTERM should stop the run before its end"
  assert max(runs.train_losses(workdir)) == stopped_at

  process = _start(workdir, bert_dir, corpus)
  next_checkpoint = (stopped_at // 10 + 1) * 10
  _wait_for(workdir / "checkpoints" / str(next_checkpoint), process)
  process.kill()
  output, _ = process.communicate()
  assert not (workdir / "export").exists(), "kill -9 should stop the run before its end"
  _assert_resumed(workdir, output, stopped_at)

  latest = _latest_checkpoint(workdir)
  assert latest >= next_checkpoint
  _assert_resumed(workdir, _run(workdir, bert_dir, corpus), latest)
  expected, resumed = runs.train_losses(uninterrupted), runs.train_losses(workdir)
  assert sorted(resumed) == sorted(expected)
  np.testing.assert_allclose([resumed[s] for s in expected], list(expected.values()), rtol=1e-6)
  weights = _weights(workdir)
  for name, value in _weights(uninterrupted).items():
    np.testing.assert_allclose(weights[name], value, atol=1e-6, err_msg=name)


def test_overrides_land_in_the_saved_config(tmp_path, bert_dir, corpus):
  _run(tmp_path, bert_dir, corpus, "--config.distill.temperature=4",
       "--config.total_steps=2", "--config.export=False")
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["distill"]["temperature"] == 4.0 and config["total_steps"] == 2
  assert not (tmp_path / "export").exists()
