"""Two processes of 4 CPU devices (one mesh of 8, JAX's multi-host runtime) train, evaluate,
checkpoint, stop on a SIGTERM sent to one of them, resume and export exactly as one process of
8 devices."""

import signal
import time

import numpy as np
import pytest
import safetensors.numpy

from tests import runs

pytestmark = pytest.mark.slow  # Two processes under jax.distributed.


def _start(workdir, bert_dir, corpus, devices: int, *flags):
  return runs.start("main", workdir, bert_dir, corpus, "--config.total_steps=20",
                    "--config.checkpoint_every_steps=5", "--config.eval_every_steps=10", *flags,
                    devices=devices)


def _two_processes(workdir, bert_dir, corpus):
  port = runs.free_port()
  return [_start(workdir, bert_dir, corpus, 4, "--distributed",
                 f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 f"--process_id={i}") for i in range(2)]


def test_two_hosts_with_a_preemption_equal_one_host(tmp_path, bert_dir, corpus):
  one, two = tmp_path / "one", tmp_path / "two"
  runs.finish(_start(one, bert_dir, corpus, 8))

  processes = _two_processes(two, bert_dir, corpus)
  deadline = time.time() + 300
  while not (two / "checkpoints" / "5").exists():
    assert all(p.poll() is None for p in processes) and time.time() < deadline
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)  # One host of two is preempted: both stop together.
  outputs = runs.finish(*processes)
  stopped = [int(o.split("Preempted: saved step ")[1].split(";")[0]) for o in outputs]
  assert stopped[0] == stopped[1] < 20 and not (two / "export").exists()

  outputs = runs.finish(*_two_processes(two, bert_dir, corpus))
  assert f"Resumed from step {stopped[0]} of" in outputs[0]
  assert "Exported to" in outputs[0] and "Exported to" not in outputs[1]  # Process 0 writes.
  expected, losses = runs.train_losses(one), runs.train_losses(two)
  assert sorted(losses) == sorted(expected) == list(range(1, 21))
  np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=1e-5)
  weights = safetensors.numpy.load_file(two / "export" / "model.safetensors")
  for name, value in safetensors.numpy.load_file(one / "export" / "model.safetensors").items():
    np.testing.assert_allclose(weights[name], value, atol=1e-5, err_msg=name)
  assert not (two / "lock.json").exists()
