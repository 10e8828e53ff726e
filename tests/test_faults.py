"""Faults and bad input lose nothing: a one-line error or a recovery each (docs/reliability.md).

Runs are called in this process (`train.run`) where the fault is in the run's own logic, and
as a user starts them (a subprocess) where the process itself is the point.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
import safetensors.numpy

from distil_jax import checkpoint, errors, export, train, workdir
from tests import runs

SHORT = {"total_steps": 4, "checkpoint_every_steps": 1, "log_every_steps": 1,
         "eval_every_steps": 2, "optim.warmup_frac": 0.0}


def _run(workdir, bert_dir, corpus, allow_config_change=False, resume_step=None, **overrides):
  config = runs.config(bert_dir, corpus, **{**SHORT, **overrides})
  return train.run([config], [workdir], allow_config_change=allow_config_change,
                   resume_step=resume_step)


def _snapshot(workdir: pathlib.Path) -> dict[str, bytes]:
  """Every file of the workdir (but the event files, written at each start) and its bytes."""
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
          if p.is_file() and "tensorboard" not in p.parts}


def _params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
  with checkpoint.Checkpointer(workdir, save_every_steps=1, keep_last=1) as ckpt:
    return [np.asarray(x) for x in jax.tree.leaves(ckpt.restore_on_one_device(step)["params"])]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, bert_dir, corpus) -> pathlib.Path:
  """A 4-step run with every step checkpointed, not exported."""
  workdir = tmp_path_factory.mktemp("finished")
  _run(workdir, bert_dir, corpus, export=False)
  return workdir


@pytest.mark.slow
def test_nonfinite_steps_are_never_applied_and_the_run_stops_or_skips(tmp_path, bert_dir,
                                                                        corpus):
  with pytest.raises(errors.Diverged, match=r"^step 2 is not finite \(loss=nan, loss_ce=nan"):
    _run(tmp_path / "stop", bert_dir, corpus, **{"optim.lr_peak": 1e6})
  steps = checkpoint.Checkpointer(tmp_path / "stop", save_every_steps=1, keep_last=1).all_steps()
  assert steps == [1, 2]
  for step in steps:
    assert all(np.isfinite(x).all() for x in _params(tmp_path / "stop", step))
  # Step 2's update was not applied: checkpoint 2 holds step 1's parameters.
  for a, b in zip(_params(tmp_path / "stop", 1), _params(tmp_path / "stop", 2), strict=True):
    np.testing.assert_array_equal(a, b)

  with pytest.raises(errors.Diverged, match=r"3 steps skipped, more than max_skipped_steps=2"):
    _run(tmp_path / "skip", bert_dir, corpus, on_nonfinite="skip", max_skipped_steps=2,
         **{"optim.lr_peak": 1e6})
  rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text()
          .splitlines() if '"train"' in line]
  assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_changed_config_is_refused_before_anything_is_written(finished, bert_dir, corpus):
  before = _snapshot(finished)
  with pytest.raises(workdir.WorkdirError,
                     match=r"holds a run with another config \(optim.lr_peak: 0.001 -> 0.002; "
                           r"total_steps: 4 -> 6\): use a new --workdir"):
    _run(finished, bert_dir, corpus, export=False, total_steps=6, **{"optim.lr_peak": 2e-3})
  with pytest.raises(workdir.WorkdirError,
                     match=r"holds a 2-layer DistilBERT student \(hidden 32, 4 heads, mlp 64, "
                           r"vocab 30522, 128 positions\), this config makes a 1-layer"):
    _run(finished, bert_dir, corpus, export=False, allow_config_change=True,
         **{"student.num_layers": 1})
  with pytest.raises(workdir.WorkdirError, match="checkpoint at step 4, past total_steps=3"):
    _run(finished, bert_dir, corpus, export=False, total_steps=3, allow_config_change=True)
  assert _snapshot(finished) == before
  # What only changes logging is accepted; the run is finished, so nothing is redone.
  _run(finished, bert_dir, corpus, export=False, log_every_steps=2)
  assert runs.train_losses(finished).keys() == {1, 2, 3, 4}


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_run_resumes_before_it(
    finished, tmp_path, bert_dir, corpus):
  workdir = tmp_path / "run"
  os.system(f"cp -r {finished} {workdir}")
  for path in (workdir / "checkpoints" / "4" / "state" / "d").iterdir():
    path.write_bytes(path.read_bytes()[:10])  # Truncated data files.
  _run(workdir, bert_dir, corpus, export=False)
  assert (workdir / "set_aside" / "4-after-3").is_dir()  # Kept, not deleted.
  np.testing.assert_allclose(runs.train_losses(workdir)[4], runs.train_losses(finished)[4],
                             rtol=1e-6)
  for a, b in zip(_params(workdir, 4), _params(finished, 4), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)

  # A rewind sets the later checkpoints aside too, and training redoes the same steps.
  _run(workdir, bert_dir, corpus, export=False, resume_step=2)
  assert sorted(p.name for p in (workdir / "set_aside").iterdir()) == [
      "3-after-2", "4-after-2", "4-after-3"]
  np.testing.assert_allclose(runs.train_losses(workdir)[4], runs.train_losses(finished)[4],
                             rtol=1e-6)


@pytest.mark.slow
def test_a_workdir_is_locked_while_a_run_holds_it(finished, bert_dir, corpus):
  lock = finished / "lock.json"
  here = socket.gethostname()
  lock.write_text(json.dumps({"host": here, "pid": os.getpid(), "heartbeat": time.time()}))
  with pytest.raises(workdir.WorkdirError,
                     match=rf"is in use by process {os.getpid()} on host {here} \(heartbeat"):
    _run(finished, bert_dir, corpus, export=False)
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time()}))
  with pytest.raises(workdir.WorkdirError, match="in use by process 1 on host elsewhere"):
    _run(finished, bert_dir, corpus, export=False)
  # Stale: a dead process of this host, or another host's heartbeat older than 10 minutes.
  dead = subprocess.Popen(["true"])
  dead.wait()
  for holder in ({"host": here, "pid": dead.pid, "heartbeat": time.time()},
                 {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 700}):
    lock.write_text(json.dumps(holder))
    _run(finished, bert_dir, corpus, export=False)
    assert not lock.exists()


@pytest.mark.slow
def test_export_refuses_a_directory_holding_something_else(finished, tmp_path):
  teacher_like = tmp_path / "teacher"
  teacher_like.mkdir()
  (teacher_like / "model.safetensors").write_bytes(b"weights of another model")
  with pytest.raises(errors.OutputExists, match=r"holds files that are not an export of this "
                                                r"run: choose an empty --out directory"):
    export.export_checkpoint(finished, teacher_like)
  assert (teacher_like / "model.safetensors").read_bytes() == b"weights of another model"
  out = export.export_checkpoint(finished, tmp_path / "hf", step=3)
  first = safetensors.numpy.load_file(out / "model.safetensors")
  export.export_checkpoint(finished, out)  # An earlier export of the same run: replaced.
  assert any((safetensors.numpy.load_file(out / "model.safetensors")[k] != v).any()
             for k, v in first.items())
  export.export_checkpoint(finished, teacher_like, overwrite=True)


@pytest.mark.parametrize("files, pattern, message", [
    ({"empty.txt": b"\n \n"}, "*.txt", r"^no text in .*empty.txt: add documents"),
    ({}, "nothing*.txt", r"^no file matches '.*nothing\*.txt'"),
    ({"latin1.txt": "caf\xe9\n".encode("latin1")}, "*.txt",
     r"^.*latin1.txt:1: byte 3 is not UTF-8: re-encode"),
    ({"huge.txt": b"word " * 2_200_000}, "*.txt",
     r"^.*huge.txt:1 is 11 MB on one line, over 10 MB: split the document"),
])
def test_bad_text_is_refused_in_one_line(tmp_path, bert_dir, files, pattern, message):
  for name, content in files.items():
    (tmp_path / name).write_bytes(content)
  config = runs.config(bert_dir, tmp_path / "unused", **SHORT)
  config.data.sources = (f"text:{tmp_path}/{pattern}",)
  with pytest.raises(errors.UserError, match=message) as error:
    train.run([config], [tmp_path / "run"])
  assert "\n" not in str(error.value)
  assert not (tmp_path / "run" / "config.json").exists()


def test_a_tokenizer_that_is_not_the_teachers_is_refused(tmp_path, bert_dir, corpus):
  tokenizer = tmp_path / "tokenizer"
  tokenizer.mkdir()
  (tokenizer / "vocab.txt").write_text("\n".join(
      ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a"]) + "\n")
  with pytest.raises(errors.UserError,
                     match=r"vocab.txt has 7 tokens but the teacher's vocab_size is 30522"):
    _run(tmp_path / "run", bert_dir, corpus, tokenizer=str(tokenizer))


@pytest.mark.slow
def test_user_errors_print_one_line_without_a_traceback(tmp_path, bert_dir, corpus):
  (output,) = runs.finish(runs.start("main", tmp_path, bert_dir, corpus,
                                     "--config.data.sources=('text:/nowhere/*.txt',)"),
                          returncode=1)
  assert "Traceback" not in output
  assert output.strip().splitlines()[-1].startswith("FATAL no file matches '/nowhere/*.txt'")
  (output,) = runs.finish(runs.start("main", tmp_path / "new", bert_dir, corpus,
                                     config_path=None), returncode=1)
  assert "Traceback" not in output and "--config is required to start a run" in output


@pytest.mark.slow
def test_kill_9_during_an_asynchronous_save_resumes_from_the_last_complete_one(
    tmp_path, bert_dir, corpus, finished):
  flags = [f"--config.{key}={value}" for key, value in {**SHORT, "export": False}.items()]
  process = runs.start("main", tmp_path, bert_dir, corpus, *flags)
  deadline = time.time() + 300
  while not list((tmp_path / "checkpoints").glob("3.orbax-checkpoint-tmp*")):
    assert process.poll() is None and time.time() < deadline, process.communicate()[0][-2000:]
    time.sleep(0.002)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  # Resumed as a user would after a crash: the workdir alone, its saved config.
  runs.finish(runs.start("main", tmp_path, bert_dir, corpus, config_path=None))
  np.testing.assert_allclose(list(runs.train_losses(tmp_path).values()),
                             list(runs.train_losses(finished).values()), rtol=1e-6)


@pytest.mark.slow
def test_storage_failing_mid_run_stops_in_one_line_at_once(tmp_path, bert_dir, corpus):
  process = runs.start("main", tmp_path, bert_dir, corpus, "--config.total_steps=500",
                       "--config.checkpoint_every_steps=2", "--config.eval_every_steps=1000")
  deadline = time.time() + 300
  while not (tmp_path / "checkpoints" / "4").exists():
    assert process.poll() is None and time.time() < deadline, process.communicate()[0][-2000:]
    time.sleep(0.05)
  (tmp_path / "checkpoints").rename(tmp_path / "moved")
  (tmp_path / "checkpoints").write_text("not a directory")  # The disk "fails".
  failed = time.time()
  (output,) = runs.finish(process, returncode=1)
  assert time.time() - failed < 60  # Not orbax's 5-minute timeouts.
  assert output.strip().splitlines()[-1].startswith(
      f"FATAL cannot write checkpoints to {tmp_path}/checkpoints (")
  assert not (tmp_path / "lock.json").exists()
