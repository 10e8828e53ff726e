"""Two processes of 4 CPU devices (one mesh of 8, JAX's multi-host runtime) train, evaluate,
checkpoint, stop on a SIGTERM sent to one of them, resume and export exactly as one process of
8 devices."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from distil_jax import resources

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  records = json.loads(resources.wiki_offline_json().read_text())
  path = tmp_path_factory.mktemp("corpus") / "wiki.txt"
  path.write_text("\n".join(r["extract"].replace("\n", " ")
                            for r in list(records.values())[:400]) + "\n")
  return path


def _start(workdir, bert_dir, corpus, devices: int, *flags) -> subprocess.Popen:
  command = [sys.executable, "-m", "distil_jax.main", "--config=tests/configs/random_teacher.py",
             f"--workdir={workdir}", f"--config.teacher={bert_dir}",
             f"--config.data.sources=('text:{corpus}',)",
             f"--config.data.data_dir={corpus.parent / 'data'}", "--config.total_steps=20",
             "--config.checkpoint_every_steps=5", "--config.eval_every_steps=10", *flags]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _two_processes(workdir, bert_dir, corpus) -> list[subprocess.Popen]:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  return [_start(workdir, bert_dir, corpus, 4, "--distributed",
                 f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 f"--process_id={i}") for i in range(2)]


def _finish(processes) -> list[str]:
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, output in zip(processes, outputs, strict=True):
    assert p.returncode == 0, output[-3000:]
  return outputs


def _train_losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows if r["kind"] == "train"]
  assert len(steps) == len(set(steps)), "a step was logged twice"
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_two_hosts_with_a_preemption_equal_one_host(tmp_path, bert_dir, corpus):
  one, two = tmp_path / "one", tmp_path / "two"
  _finish([_start(one, bert_dir, corpus, 8)])

  processes = _two_processes(two, bert_dir, corpus)
  deadline = time.time() + 300
  while not (two / "checkpoints" / "5").exists():
    assert all(p.poll() is None for p in processes) and time.time() < deadline
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)  # One host of two is preempted: both stop together.
  outputs = _finish(processes)
  stopped = [int(o.split("Preempted: saved step ")[1].split(";")[0]) for o in outputs]
  assert stopped[0] == stopped[1] < 20 and not (two / "export").exists()

  outputs = _finish(_two_processes(two, bert_dir, corpus))
  assert f"Resumed from step {stopped[0]} of" in outputs[0]
  assert "Exported to" in outputs[0] and "Exported to" not in outputs[1]  # Process 0 writes.
  expected, losses = _train_losses(one), _train_losses(two)
  assert sorted(losses) == sorted(expected) == list(range(1, 21))
  np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=1e-5)
  weights = safetensors.numpy.load_file(two / "export" / "model.safetensors")
  for name, value in safetensors.numpy.load_file(one / "export" / "model.safetensors").items():
    np.testing.assert_allclose(weights[name], value, atol=1e-5, err_msg=name)
  assert not (two / "lock.json").exists()
