"""Faults and bad input lose nothing: a one-line error or a recovery each (docs/reliability.md).

Runs are called in this process (`train.run`) where the fault is in the run's own logic, and
as a user starts them (a subprocess) where the process itself is the point.
"""

import contextlib
import json
import os
import pathlib
import re
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
  # At this learning rate, steps 1 and 2 are finite and step 3 is not (its loss is NaN).
  stop = tmp_path / "stop"
  for _ in range(2):  # Running the same command again stops at the same step, saving nothing.
    with pytest.raises(errors.Diverged, match=r"^step 3 is not finite \(loss=nan, loss_ce=nan.*"
                                              r"no update of step 3 was applied; checkpoint 2 "
                                              r"holds the last finite state: lower the learning "
                                              r"rate and run again with --allow_config_change "
                                              r"\(it resumes from step 2\); if it diverges again "
                                              r"from there, start afresh in a new --workdir$"):
      _run(stop, bert_dir, corpus, checkpoint_every_steps=2, **{"optim.lr_peak": 1e6})
    assert checkpoint.saved_steps(stop) == [2]
  assert all(np.isfinite(x).all() for x in _params(stop, 2))
  rows = [json.loads(line, parse_constant=pytest.fail) for line in  # Strict JSON: no bare NaN.
          (stop / "metrics.jsonl").read_text().splitlines()]
  assert [r["loss"] for r in rows if r["kind"] == "train"][-1] == "nan"

  with pytest.raises(errors.Diverged, match=r"2 steps skipped, more than max_skipped_steps=1"):
    _run(tmp_path / "skip", bert_dir, corpus, on_nonfinite="skip", max_skipped_steps=1,
         **{"optim.lr_peak": 1e6})
  rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text()
          .splitlines() if '"train"' in line]
  assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2]


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
  for overwrite in (False, True):  # Another model's directory is never written into.
    with pytest.raises(errors.OutputExists, match=r"holds files that are not an export of "
                                                  r"distil_jax: choose a new or empty --out"):
      export.export_checkpoint(finished, teacher_like, overwrite=overwrite)
  assert (teacher_like / "model.safetensors").read_bytes() == b"weights of another model"
  out = export.export_checkpoint(finished, tmp_path / "hf", step=3)
  first = safetensors.numpy.load_file(out / "model.safetensors")
  export.export_checkpoint(finished, out)  # An earlier export of the same run: replaced.
  assert any((safetensors.numpy.load_file(out / "model.safetensors")[k] != v).any()
             for k, v in first.items())


@pytest.mark.parametrize("files, pattern, message", [
    ({"empty.txt": b"\n \n"}, "*.txt", r"^no text in .*empty.txt: add documents"),
    ({}, "nothing*.txt", r"^no file matches '.*nothing\*.txt'"),
    ({"latin1.txt": "caf\xe9\n".encode("latin1")}, "*.txt",
     r"^.*latin1.txt \(the line at byte 0\): byte 3 is not UTF-8: re-encode"),
    ({"huge.txt": b"word " * 2_200_000}, "*.txt",
     r"^.*huge.txt \(the line at byte 0\) is over 10 MB on one line: split the document"),
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
  assert _fatal(output).startswith(f"FATAL cannot write checkpoints to {tmp_path}/checkpoints (")
  assert not (tmp_path / "lock.json").exists()


# ------------------------------------------------------------------ Faults, round two.


def _fatal(output: str) -> str:
  """The one FATAL line a failed command ends with; no traceback anywhere in its output."""
  assert "Traceback" not in output, output[-3000:]
  last = output.strip().splitlines()[-1]
  assert last.startswith("FATAL "), output[-3000:]
  return last


@contextlib.contextmanager
def _small_disk(path: pathlib.Path, megabytes: float):
  """A tmpfs of `megabytes` at `path` (root only): yields a function that resizes it."""
  path.mkdir(parents=True)
  size = lambda mb: f"size={int(mb * 1024)}k"
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", size(megabytes), "tmpfs", str(path)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk faults "
                "need one")
  try:
    yield lambda mb: subprocess.run(["mount", "-o", f"remount,{size(mb)}", str(path)],
                                    check=True)
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_a_full_disk_at_start_leaves_no_lock_and_the_workdir_works_once_freed(
    tmp_path, bert_dir, corpus):
  flags = ("--config.total_steps=2", "--config.export=False")
  with _small_disk(tmp_path / "disk", 1) as resize:
    (tmp_path / "disk" / "ballast").write_bytes(b"\0" * 1024 * 1024)  # The disk is full.
    workdir = tmp_path / "disk" / "run"
    process = runs.start("main", workdir, bert_dir, corpus, *flags)
    (output,) = runs.finish(process, returncode=1)
    assert re.match(rf"FATAL cannot write {workdir}/lock.json \(OSError: No space left on "
                    r"device\): free space", _fatal(output))
    assert not (workdir / "lock.json").exists() and not list(workdir.glob(".lock*"))
    resize(64)  # Space is freed: the same command runs.
    runs.finish(runs.start("main", workdir, bert_dir, corpus, *flags))
    assert sorted(runs.train_losses(workdir)) == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("total_steps", [6, 2], ids=["mid_run", "last_step"])
def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_loses_nothing(
    tmp_path, bert_dir, corpus, total_steps):
  """A tmpfs with room for one checkpoint (mid-run: step 2 fits, step 4 does not) or none (the
  only save is the last step's)."""
  flags = (f"--config.total_steps={total_steps}", "--config.checkpoint_every_steps=2",
           "--config.export=False", "--config.eval_every_steps=1000")
  reference = tmp_path / "reference"
  runs.finish(runs.start("main", reference, bert_dir, corpus, *flags))
  checkpoint_mb = sum(p.stat().st_size for p in (reference / "checkpoints" / "2").rglob("*")
                      if p.is_file()) / 2**20
  room = 1.6 if total_steps > 2 else 0.6  # Checkpoints of room for, plus 0.2 MiB of logs.
  with _small_disk(tmp_path / "disk", checkpoint_mb * room + 0.2) as resize:
    workdir = tmp_path / "disk" / "run"
    (output,) = runs.finish(runs.start("main", workdir, bert_dir, corpus, *flags), returncode=1)
    assert re.match(rf"FATAL no space for checkpoint {2 if total_steps == 2 else 4} in "
                    rf"{workdir}/checkpoints: it needs up to .* MiB are free: free space and "
                    rf"start again to resume from "
                    rf"{'the start' if total_steps == 2 else 'step 2'}", _fatal(output))
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert saved == ([] if total_steps == 2 else [2]) and not (workdir / "lock.json").exists()
    resize(256)
    runs.finish(runs.start("main", workdir, bert_dir, corpus, *flags))
    expected = runs.train_losses(reference)
    np.testing.assert_allclose([runs.train_losses(workdir)[s] for s in expected],
                               list(expected.values()), rtol=1e-6)
    for a, b in zip(_params(workdir, total_steps), _params(reference, total_steps), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6)


def test_an_unreadable_lock_is_cleared_by_the_command_it_names(finished, bert_dir, corpus):
  lock = finished / "lock.json"
  before = _snapshot(finished)
  lock.write_text("")  # A run that could not write its lock (a full disk).
  with pytest.raises(workdir.WorkdirError,
                     match=rf"lock.json is empty, \d+ s old .*: it is taken over once 600 s old; "
                           rf"if no run uses {finished}, clear it now with `rm {lock}`"):
    _run(finished, bert_dir, corpus, export=False)
  lock.write_text("{ half a lock")
  with pytest.raises(workdir.WorkdirError,
                     match=rf"is not a lock that distil_jax wrote: if no run uses {finished}, "
                           rf"clear it with `rm {lock}`"):
    _run(finished, bert_dir, corpus, export=False)
  assert _snapshot(finished) == {**before, "lock.json": b"{ half a lock"}
  lock.write_text("")
  os.utime(lock, (time.time() - 700, time.time() - 700))  # Empty, older than the stale limit.
  _run(finished, bert_dir, corpus, export=False)  # Taken over; the finished run stays finished.
  assert not lock.exists() and runs.train_losses(finished).keys() == {1, 2, 3, 4}


def test_export_never_writes_into_a_directory_it_did_not_create(finished, tmp_path):
  before = _snapshot(finished)
  for overwrite in (False, True):  # A run's workdir is never an export target.
    with pytest.raises(errors.OutputExists, match=rf"{finished} is a run's workdir, which an "
                                                  rf"export never replaces: export into a new "
                                                  rf"directory, e.g. --out={finished}/export"):
      export.export_checkpoint(finished, finished, overwrite=overwrite)
  assert _snapshot(finished) == before
  foreign = tmp_path / "foreign"  # Someone's model: not an export of distil_jax.
  foreign.mkdir()
  (foreign / "config.json").write_text('{"theirs": true}')
  (foreign / "vocab.txt").write_text("[PAD]\n")
  for overwrite in (False, True):
    with pytest.raises(errors.OutputExists, match="holds files that are not an export of "
                                                  "distil_jax: choose a new or empty --out"):
      export.export_checkpoint(finished, foreign, overwrite=overwrite)
  assert (foreign / "config.json").read_text() == '{"theirs": true}'
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(errors.OutputExists, match="is a file: give a directory"):
    export.export_checkpoint(finished, tmp_path / "a_file")
  # An export of another run is replaced only with --overwrite.
  other = export.export_checkpoint(finished, tmp_path / "other")
  (other / export.hf.EXPORT_MARK).write_text('{"source": "/elsewhere"}')
  with pytest.raises(errors.OutputExists, match="holds an export of /elsewhere: choose a new"):
    export.export_checkpoint(finished, other)
  export.export_checkpoint(finished, other, overwrite=True)
  assert json.loads((other / export.hf.EXPORT_MARK).read_text())["source"] == str(finished)
  assert not list(tmp_path.glob(".*export-tmp"))


@pytest.mark.slow
def test_export_to_a_file_or_a_read_only_disk_ends_in_one_line(finished, tmp_path):
  (tmp_path / "a_file").write_text("x")
  export_to = lambda out: runs.finish(runs.launch("export", f"--workdir={finished}",
                                                  f"--out={out}"), returncode=1)[0]
  assert "is a file: give a directory" in _fatal(export_to(tmp_path / "a_file"))
  with _small_disk(tmp_path / "disk", 1):
    subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "disk")], check=True)
    assert re.match(rf"FATAL cannot write the export {tmp_path}/disk/hf \(OSError: Read-only "
                    r"file system\): give an --out on a writable disk",
                    _fatal(export_to(tmp_path / "disk" / "hf")))


@pytest.mark.parametrize("overrides, message", [
    ({"data.max_len": 256}, r"data.max_len=256: it must be an integer in \[3, 128\]"),
    ({"data.max_len": 4096}, r"data.max_len=4096: it must be an integer in \[3, 128\]"),
    ({"student.num_layers": 9}, r"student.num_layers=9: it must be an integer in \[1, 4\]"),
    ({"data.batch_size": 0}, r"data.batch_size=0: it must be an integer >= 1"),
    ({"data.batch_size": -8}, r"data.batch_size=-8: it must be an integer >= 1"),
    ({"optim.frozen": ("[",)}, r"optim.frozen=\('\[',\): it must be a tuple of Python regular"),
    ({"on_nonfinite": "ignore"}, r"on_nonfinite='ignore': it must be one of 'stop', 'skip'"),
    ({"optim.lr_peak": -1.0}, r"optim.lr_peak=-1.0: it must be a number in \(0, inf\)"),
    ({"dtype": "float64"}, r"dtype='float64': it must be one of 'float32', 'bfloat16'"),
])
def test_a_value_that_cannot_run_is_refused_before_anything_is_written(tmp_path, bert_dir, corpus,
                                                                       overrides, message):
  with pytest.raises(errors.ConfigError, match=r"^1 config value cannot run: " + message):
    _run(tmp_path / "run", bert_dir, corpus, **overrides)
  assert not (tmp_path / "run").exists()
