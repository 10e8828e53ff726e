"""Checkpoints of the train state (orbax), and the preemption watcher.

A workdir's checkpoints (the rest of the workdir is `distil_jax.workdir`'s)::

  checkpoints/<step>/state    the train state: student params, optimizer state, step
  checkpoints/<step>/data     the data iterator state (JSON)
  checkpoints/<step>/metrics  the eval loss, when the step had one

The teacher is not checkpointed: it is reloaded from its pretrained weights.

Use in the train loop (a SIGTERM makes it save and exit cleanly)::

  with (Checkpointer(workdir, save_every_steps=1000, keep_last=3) as ckpt,
        PreemptionWatcher() as watcher):
    step = 0
    if ckpt.latest_step() is not None:
      state, data_state = ckpt.restore(abstract_state)
      data_iter.set_state(data_state)
      step = ckpt.latest_step()
    while step < num_steps and not watcher.should_stop(step):
      step += 1
      state, eval_loss = ...  # Train step; eval_loss is None on steps without eval.
      ckpt.save(step, state, data_iter.get_state(), eval_loss)
    ckpt.save(step, state, data_iter.get_state(), force=True)  # No-op if already saved.
"""

import contextlib
import math
import shutil
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from distil_jax import errors, hosts, storage

PyTree = Any

_EVAL_LOSS = "eval_loss"
_DIFFERENT_MODEL = "this workdir holds a checkpoint of a different model; use a new --workdir"


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint or config that cannot be used; the one-line message says what to do."""


class CorruptCheckpoint(CheckpointError):
  """A checkpoint step that cannot be read back (truncated, partly deleted, unreadable)."""


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines() or [""]
  return f"{type(e).__name__}: {lines[0][:200]}"


def _eval_loss(metrics: dict[str, float]) -> float:
  return metrics[_EVAL_LOSS]


def _leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in leaves}


class _CheckpointManager(ocp.CheckpointManager):
  """Leaves JAX's preemption sync point to `PreemptionWatcher`, its only caller.

  orbax 0.12.8 also asks for it from its save-finalize thread, with the step of that save: this
  moves JAX's step counter back and can set the sync point in the past, so no host ever stops.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class Checkpointer:
  """Saves and restores `(state, data_state)` under `workdir/checkpoints`.

  Keeps the last `keep_last` steps and, with `keep_best`, the step of lowest eval loss. Steps
  saved without a (finite) eval loss are kept by the keep-last rule only. Existing steps are
  never overwritten.
  """

  def __init__(self, workdir: epath.PathLike, *, save_every_steps: int, keep_last: int,
               keep_best: bool = True, async_save: bool = True):
    if save_every_steps < 1 or keep_last < 1:
      raise errors.ConfigError(
          f"save_every_steps and keep_last must be >= 1, got {save_every_steps} "
          f"and {keep_last}")
    # orbax's `max_to_keep` with `best_fn` keeps the best K only, so the policies are explicit;
    # its default save policy would also save the first step of a fresh run.
    keep = [checkpoint_managers.LatestN(n=keep_last)]
    if keep_best:
      keep.append(checkpoint_managers.BestN(
          get_metric_fn=_eval_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(save_every_steps),
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(keep),
        best_fn=_eval_loss if keep_best else None,  # Also makes orbax write the metrics.
        best_mode="min",
        enable_async_checkpointing=async_save)
    registry = ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler())
    workdir = epath.Path(workdir)
    if "://" not in str(workdir):
      workdir = workdir.resolve()  # orbax needs absolute paths.
    self.directory = workdir / "checkpoints"
    try:
      self._manager = _CheckpointManager(
          self.directory, options=options, handler_registry=registry)
    except (OSError, ValueError) as e:
      raise CheckpointError(
          f"cannot read the checkpoints in {self.directory} ({_first_line(e)}); move the damaged "
          "step directory out of it, or use a new --workdir") from e

  def latest_step(self) -> int | None:
    """The last saved step, or None when there is no checkpoint."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The saved steps, ascending."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step of lowest eval loss (None if none has one; the latest without `keep_best`)."""
    return self._manager.best_step()

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` would save without `force`: on the save interval, not saved."""
    return self._manager.should_save(step) and step not in self._manager.all_steps()

  def save(self, step: int, state: PyTree, data_state: dict[str, Any],
           eval_loss: float | None = None, force: bool = False) -> bool:
    """Saves on the save interval, or whenever `force`; returns whether it saved.

    A step already on disk is left as it is. `data_state` is written by process 0 only, so it
    must be the same on every process. Asynchronous: `wait()` blocks until it is on disk.
    """
    if step in self._manager.all_steps():
      return False
    if (force or self._manager.should_save(step)) and not storage.is_remote(self.directory):
      self._check_space(step, state)
    metrics = None
    if eval_loss is not None and math.isfinite(eval_loss):
      metrics = {_EVAL_LOSS: float(eval_loss)}
    with self._storage_errors():
      return self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
          metrics=metrics,
          force=force)

  def _check_space(self, step: int, state: PyTree) -> None:
    """Refuses to start a save that the local disk has no room for: the failure would otherwise
    surface later, from orbax's threads, with the disk full."""
    needed = sum(x.nbytes for x in jax.tree.leaves(state))  # Uncompressed: an upper bound.
    existing = next(p for p in (self.directory, *self.directory.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
      latest = self.latest_step()
      raise errors.StorageError(
          f"no space for checkpoint {step} in {self.directory}: it needs up to "
          f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free: free space and start "
          f"again to resume from {f'step {latest}' if latest is not None else 'the start'}")

  def check(self) -> None:
    """Raises `errors.StorageError` if an asynchronous save has failed (cheap: call it often)."""
    with self._storage_errors():
      self._manager.check_for_errors()

  @contextlib.contextmanager
  def _storage_errors(self):
    try:
      yield
    except Exception as e:  # orbax re-raises a background write's failure as it came.
      latest = self.latest_step()
      raise errors.StorageError(
          f"cannot write checkpoints to {self.directory} ({_first_line(e)}): fix the disk or "
          f"bucket (space, permissions, path) and start again to resume from "
          f"{f'step {latest}' if latest is not None else 'the start'}") from e

  def restore(self, abstract_state: PyTree,
              step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Returns `(state, data_state)` of `step` (default: the latest).

    Arrays come back with the shapes, dtypes and shardings of `abstract_state`, a pytree of
    `jax.ShapeDtypeStruct` (or arrays).
    """
    steps = list(self._manager.all_steps())
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(
            f"no checkpoint in {self.directory}; start from scratch, or pass the --workdir of "
            "the run to resume")
    elif step not in steps:
      raise CheckpointError(
          f"no checkpoint of step {step} in {self.directory}; available steps: {steps}")
    stored = _leaf_shapes(self._metadata(step))
    wanted = _leaf_shapes(abstract_state)
    for path, shape in wanted.items():
      if path not in stored:
        raise CheckpointError(
            f"checkpoint step {step} has no leaf '{path}' (shape {shape} in the model); "
            f"{_DIFFERENT_MODEL}")
      if stored[path] != shape:
        raise CheckpointError(
            f"checkpoint step {step} does not match the model: leaf '{path}' has shape "
            f"{stored[path]} in the checkpoint but {shape} in the model; {_DIFFERENT_MODEL}")
    if extra := sorted(stored.keys() - wanted.keys()):
      raise CheckpointError(
          f"checkpoint step {step} has leaves the model lacks ({', '.join(extra[:3])}); "
          f"{_DIFFERENT_MODEL}")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # TensorStore reports a truncated file as a plain Exception.
      raise self._corrupt(step, _first_line(e)) from e
    return restored["state"], restored["data"]

  def _metadata(self, step: int) -> PyTree:
    """The shapes and dtypes of the state saved at `step`."""
    try:
      metadata = self._manager.item_metadata(step)["state"]
    except Exception as e:  # orbax and TensorStore raise many kinds for a damaged step.
      raise self._corrupt(step, _first_line(e)) from e
    if metadata is None:  # orbax could not read state/_METADATA.
      raise self._corrupt(step, "unreadable state metadata")
    return metadata.tree

  def set_aside(self, step: int, reason: str) -> epath.Path:
    """Moves step `step` out of the checkpoints (nothing is deleted) into
    WORKDIR/set_aside/<step>-<reason>, so that the step can be saved again; returns where."""
    target = self.directory.parent / "set_aside" / f"{step}-{reason}"
    with hosts.together(f"setting checkpoint {step} aside"):
      if hosts.is_main():
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(step)).rename(target)
    self._manager.reload()
    return target

  def restore_on_one_device(self, step: int | None = None) -> PyTree:
    """The state of `step` (default: the latest) on this host's first device, whatever mesh
    saved it: for exporting a model without rebuilding its optimizer or mesh."""
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; available "
                            f"steps: {list(self._manager.all_steps())}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            self._metadata(step))
    return self.restore(abstract, step)[0]

  def _corrupt(self, step: int, reason: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(
        f"checkpoint step {step} in {self.directory} is corrupt or incomplete ({reason}); "
        f"use another step (available: {self.all_steps()}) or move "
        f"{self.directory / str(step)} out of the way")

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    with self._storage_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the pending save and releases orbax's resources."""
    with self._storage_errors():
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class PreemptionWatcher:
  """Tells the train loop when a preemption (SIGTERM) asks it to checkpoint and stop.

  With `jax.distributed` initialized (multi-host), JAX's preemption service catches SIGTERM
  and `should_stop` is true at the same step on every host, so all hosts save together: create
  the watcher after `jax.distributed.initialize()` and call `should_stop` at every step on
  every host. Otherwise a SIGTERM handler sets a flag; `close()` restores the previous handler.
  """

  def __init__(self):
    self._sigterm = False
    self._distributed = jax.distributed.is_initialized()
    self._previous = None
    if not self._distributed:  # Else JAX has its own SIGTERM handler, which this would replace.
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._sigterm = True

  def should_stop(self, step: int) -> bool:
    """True when the loop should save at `step` and exit (the same answer on all hosts)."""
    if self._distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._sigterm

  def close(self) -> None:
    """Restores the SIGTERM handler that was there before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self) -> "PreemptionWatcher":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def saved_steps(workdir: epath.PathLike) -> list[int]:
  """The steps of the checkpoint directories in `workdir` (without opening them), ascending."""
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
