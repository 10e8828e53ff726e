"""A run's workdir, apart from its checkpoints: what it records, its lock, and the resume checks.

A workdir holds (besides `checkpoints/`, `distil_jax.checkpoint`'s)::

  config.json         the resolved config (`write_config`, `read_config`, `saved_config`)
  model.json          the trained model's config and tokenizer, and extra facts (`write_model`)
  lock.json           while a run holds it (`locked`), with a heartbeat renewed on a timer
  compilation_cache/  the compiled steps (`use_compilation_cache`): a restart compiles nothing

Resuming with a config that changes the run's trajectory, or a model of another shape, is refused
(`check_workdir`, `check_model`).
"""

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from distil_jax import errors, hf, hosts, models, storage

# A lock whose heartbeat is older than this is stale (its run is gone); the heartbeat is renewed
# every quarter of it.
STALE_AFTER_S = 600.0

# Keys that may change when a run resumes: they change what is logged, saved or how the work is
# split, not the run's trajectory (the kernels: rounding, and the student's dropout masks drawn
# from another stream of the same distribution). Any other change is refused unless
# allow_config_change.
RESUMABLE_CHANGES = ("log_every_steps", "eval_every_steps", "eval_batches",
                     "checkpoint_every_steps", "keep_checkpoints", "export", "fill_mask",
                     "mesh_shape", "accum_steps", "on_nonfinite", "max_skipped_steps",
                     "data.read_threads", "data.data_dir", "data.tfds_data_dir",
                     "data.eval_batch_size", "distill.teacher_flash_attention",
                     "distill.student_flash_attention", "distill.logit_kernel")


class WorkdirError(errors.UserError, ValueError):
  """A workdir that does not fit the run; the one-line message says what to do."""


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every leaf of `config` by its dotted key, e.g. {"distill.temperature": 2.0, ...}."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
    else:
      flat[key] = value
  return flat


def write_config(workdir: epath.PathLike, config: dict[str, Any]) -> None:
  """Writes the resolved config to `workdir/config.json` (from process 0)."""
  if hosts.is_main():
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(workdir: epath.PathLike) -> dict[str, Any]:
  """Reads the config that `write_config` wrote to `workdir`."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise WorkdirError(f"{path} does not exist; pass the --workdir of a distil_jax run")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise WorkdirError(
        f"{path} is not valid JSON ({e}); rewrite it by running again on this workdir with the "
        "experiment's --config") from e


def saved_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir` (its lists back to tuples, as config files write them)."""
  as_tuples = lambda v: ({k: as_tuples(x) for k, x in v.items()} if isinstance(v, dict)
                         else tuple(map(as_tuples, v)) if isinstance(v, list) else v)
  return ml_collections.ConfigDict(as_tuples(read_config(workdir)))


def write_model(workdir: epath.PathLike, config: models.ModelConfig,
                tokenizer_dir: epath.PathLike, **extra: Any) -> None:
  """Records what `read_model` needs to rebuild the trained model (from process 0), and `extra`
  facts for the commands that read it (a fine-tuned classifier's task and labels)."""
  if hosts.is_main():
    description = {"model": dataclasses.asdict(config), "tokenizer_dir": str(tokenizer_dir),
                   **extra}
    (epath.Path(workdir) / "model.json").write_text(json.dumps(description, indent=2) + "\n")


def read_model(workdir: epath.PathLike) -> tuple[models.ModelConfig, str, dict[str, Any]]:
  """(model config, tokenizer directory, the other facts `write_model` recorded) of the run in
  `workdir`."""
  path = epath.Path(workdir) / "model.json"
  if not path.exists():
    raise WorkdirError(f"{path} does not exist; pass the --workdir of a distil_jax run that "
                       "has started training")
  description = json.loads(path.read_text())
  config = models.ModelConfig(**description.pop("model"))
  return config, description.pop("tokenizer_dir"), description


def model_directory(name: epath.PathLike) -> epath.Path:
  """A HF directory: `name` itself, a local or gs:// one, the export of the workdir `name`, or
  the download of a hub name."""
  path = epath.Path(name).expanduser()
  if (path / "export" / "config.json").exists():
    return path / "export"
  if (path / "model.json").exists():  # A workdir that has not exported (yet).
    raise errors.MissingInput(f"{path} is a workdir without an export: run "
                              f"`python -m distil_jax.export --workdir={path} --out=DIR` first")
  return hf.resolve(name)


def use_compilation_cache(workdir: epath.Path) -> None:
  """Keeps the compiled programs in WORKDIR/compilation_cache (JAX's persistent cache), so that a
  restarted run does not compile them again; a cache set already (JAX_COMPILATION_CACHE_DIR)
  is left as it is."""
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", str(workdir / "compilation_cache"))


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """The keys of `config` that differ from the `saved` config and alter the trajectory, each as
  "key: old -> new"."""
  as_json = lambda flat: {k: json.dumps(v, sort_keys=True) for k, v in flat.items()}
  old = as_json(flatten(ml_collections.ConfigDict(saved)))
  new = as_json(flatten(ml_collections.ConfigDict(json.loads(json.dumps(config.to_dict())))))
  return [f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
          for key in sorted(old.keys() | new.keys())
          if old.get(key) != new.get(key) and key not in RESUMABLE_CHANGES]


def check_workdir(config: ml_collections.ConfigDict, workdir: epath.Path,
                  allow_config_change: bool) -> None:
  """Refuses to resume a run in `workdir` with a config that changes its trajectory."""
  if not (workdir / "config.json").exists():
    return
  changes = config_changes(read_config(workdir), config)
  if changes and not allow_config_change:
    raise WorkdirError(
        f"{workdir} holds a run with another config ({'; '.join(changes[:4])}"
        f"{f'; and {len(changes) - 4} more' if len(changes) > 4 else ''}): use a new --workdir, "
        "or resume with the saved config (omit --config), or pass --allow_config_change")
  if changes:
    logging.warning("Resuming %s with a changed config: %s.", workdir, "; ".join(changes))


def check_model(workdir: epath.Path, model_config: models.ModelConfig) -> None:
  """Refuses a workdir whose checkpoints hold a model of another shape."""
  if not (workdir / "model.json").exists():
    return
  saved, _, _ = read_model(workdir)
  shape = lambda c: dataclasses.replace(c, dtype="", param_dtype="", hidden_dropout=0,
                                        attention_dropout=0)
  if shape(saved) != shape(model_config):
    raise WorkdirError(
        f"{workdir} holds a {_describe(saved)}, this config makes a {_describe(model_config)}: "
        "use a new --workdir")


def _describe(c: models.ModelConfig) -> str:
  kind = "DistilBERT student" if c.is_distilbert else "BERT"
  return (f"{c.num_layers}-layer {kind} (hidden {c.hidden_size}, {c.num_heads} heads, mlp "
          f"{c.intermediate_size}, vocab {c.vocab_size}, {c.max_positions} positions)")


class WorkdirLock:
  """WORKDIR/lock.json, held by the run that trains in the workdir (taken by process 0).

  A second run is refused with the holder's host and pid. A lock is taken over only when it is
  provably stale: on the same host when its pid is gone, from another host when its heartbeat
  (renewed by `refresh`, which `locked` calls on a timer) is older than `stale_after_s`, and an
  empty lock file (a run that could not write it) once it is older than that. Any other
  unreadable lock is refused with the command that clears it. On local disks the lock is created
  whole and atomically (a hard link of a written file); on GCS it is written and read back (two
  runs started within the same second could both pass).
  """

  def __init__(self, workdir: epath.PathLike, stale_after_s: float | None = None):
    self.path = epath.Path(workdir) / "lock.json"
    self.stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
    self._mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}

  def acquire(self) -> None:
    holder = self._holder()
    if holder is _UNREADABLE:
      holder = self._unreadable()
    if holder is not None and self._alive(holder):
      raise WorkdirError(
          f"{self.path.parent} is in use by process {holder.get('pid')} on host "
          f"{holder.get('host')} (heartbeat {time.time() - holder.get('heartbeat', 0):.0f} s "
          "ago): wait for that run to end or stop it; the lock of a dead process is taken over")
    if holder and "pid" in holder:
      logging.warning("Taking over the lock of %s: its process %s on %s is gone.",
                      self.path.parent, holder.get("pid"), holder.get("host"))
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._write(exclusive=holder is None)
    except FileExistsError:
      raise WorkdirError(f"{self.path.parent} was locked by another run just now: wait for "
                         "it to end or stop it") from None
    except OSError as e:
      raise errors.StorageError(
          f"cannot write {self.path} ({type(e).__name__}: {e.strerror or e}): free space or fix "
          "the permissions of the workdir, then start again; nothing was changed") from None
    if (self._holder() or {}).get("token") != self._mine["token"]:
      raise WorkdirError(f"{self.path.parent} was locked by another run just now: wait for "
                         "it to end or stop it")

  def refresh(self) -> None:
    """Renews the heartbeat."""
    self._write(exclusive=False)

  def release(self) -> None:
    if (self._holder() or {}).get("token") == self._mine["token"]:
      self.path.unlink()

  def _holder(self) -> dict[str, Any] | None:
    """The lock's content; None if there is none, `_UNREADABLE` if it is not a lock's JSON."""
    try:
      holder = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, UnicodeDecodeError):
      return _UNREADABLE
    return holder if isinstance(holder, dict) and "heartbeat" in holder else _UNREADABLE

  def _unreadable(self) -> dict[str, Any] | None:
    """An empty lock file older than the stale limit as a stale holder; None if it is gone; any
    other unreadable lock refused."""
    try:
      stat = self.path.stat()
    except FileNotFoundError:  # Released just now.
      return None
    age = time.time() - stat.mtime
    if stat.length == 0 and age > self.stale_after_s:
      logging.warning("Taking over the empty lock file %s, %.0f s old.", self.path, age)
      return {"heartbeat": 0.0}
    clear = (f"gcloud storage rm {self.path}" if storage.is_remote(self.path)
             else f"rm {self.path}")
    if stat.length == 0:
      raise WorkdirError(
          f"{self.path} is empty, {age:.0f} s old (a run that could not write it, or one "
          f"starting): it is taken over once {self.stale_after_s:.0f} s old; if no run uses "
          f"{self.path.parent}, clear it now with `{clear}`")
    raise WorkdirError(f"{self.path} is not a lock that distil_jax wrote: if no run uses "
                       f"{self.path.parent}, clear it with `{clear}` and start again")

  def _alive(self, holder: dict[str, Any]) -> bool:
    if holder.get("host") == self._mine["host"] and "pid" in holder:
      try:
        os.kill(holder["pid"], 0)
      except ProcessLookupError:
        return False
      except PermissionError:
        return True
      return True
    return time.time() - holder.get("heartbeat", time.time()) < self.stale_after_s

  def _write(self, exclusive: bool) -> None:
    text = json.dumps({**self._mine, "heartbeat": time.time()})
    if exclusive and not storage.is_remote(self.path):
      # Written whole, then linked into place: fails if another run created it first, and a
      # full disk leaves no empty lock behind.
      written = self.path.with_name(f".lock.{self._mine['token']}.tmp")
      try:
        written.write_text(text)
        os.link(written, self.path)
      finally:
        written.unlink(missing_ok=True)
    else:
      storage.write_atomic(self.path, text)  # A reader never sees half a heartbeat.


_UNREADABLE = {"unreadable": True}  # What `_holder` returns for a lock it cannot read.


class _Heartbeat:
  """Refreshes locks every `interval_s` seconds on a daemon thread until `stop`."""

  def __init__(self, locks: Sequence[WorkdirLock], interval_s: float):
    self._locks, self._interval_s = locks, interval_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="workdir-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self._interval_s):
      for lock in self._locks:
        try:
          lock.refresh()
        except OSError as e:  # A full disk or a lost bucket: the run itself will say so.
          logging.warning("Could not renew the lock of %s: %s", lock.path.parent, e)

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


@contextlib.contextmanager
def locked(workdirs: Sequence[epath.PathLike]) -> Iterator[list[WorkdirLock]]:
  """Holds the lock of every workdir (taken by process 0, the answer shared) for the block, its
  heartbeat renewed on a timer whatever the block does (data preparation, compilation, training).

  On several hosts, a workdir that is not the same directory on every host is refused."""
  locks = [WorkdirLock(w) for w in workdirs]

  def acquire() -> None:
    for lock in locks:
      lock.acquire()
  heartbeat = None
  try:
    hosts.decide(acquire)
    if hosts.is_main():
      heartbeat = _Heartbeat(locks, locks[0].stale_after_s / 4)
    _check_shared(locks[0])
    yield locks
  finally:
    if heartbeat is not None:
      heartbeat.stop()
    if hosts.is_main():
      for lock in locks:
        lock.release()


def _check_shared(lock: WorkdirLock) -> None:
  if jax.process_count() == 1:
    return
  token = hosts.share(json.loads(lock.path.read_text())["token"] if hosts.is_main() else None)
  seen = lock.path.exists() and json.loads(lock.path.read_text()).get("token") == token
  if not hosts.all_true(seen):
    raise errors.ConfigError(
        f"{lock.path.parent} is not the same directory on every host: give a --workdir that "
        "all hosts share (gs://BUCKET/... or a shared file system)")
