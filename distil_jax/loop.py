"""The training loop of every command: distillation, the teacher's MLM adaptation, fused sweeps and
GLUE fine-tuning.

A task (`train.py`, `finetune.py`) builds its models, data and compiled step, and hands the loop
what differs as a `Task`; the loop owns everything else: resuming from the checkpoints, the
cadence of logging, evaluation and checkpoints, the preemption watcher, the non-finite policy, the
check of asynchronous saves, the metric writers, the logged learning rate and MFU. (The workdir's
lock and its heartbeat are `workdir.locked`'s, held by the task around data preparation too.)

One or several runs train together (a stack, `distil_jax.stacked`): each has its own metrics, and
either its own checkpoints (a fused sweep: each run's workdir is a complete single-run workdir) or
one checkpoint holds the whole stack (fine-tuning seeds).
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from distil_jax import checkpoint, errors, hosts, metrics, stacked

PyTree = Any
Batch = dict[str, np.ndarray]


class DataIterator(Protocol):
  """Endless host batches whose position can be saved and restored (grain's iterators)."""

  def __next__(self) -> Batch: ...

  def get_state(self) -> dict[str, Any]: ...

  def set_state(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When the loop logs, evaluates and saves, and what it does with a non-finite step."""
  total_steps: int
  log_every_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int  # The last ones; with `keep_best`, the best by eval loss as well.
  on_nonfinite: str = "stop"  # "stop": save the last finite state and end; "skip": go on.
  max_skipped_steps: int = 10
  keep_best: bool = True
  eval_at_start: bool = True  # Evaluate before the first step of a fresh run.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, total_steps: int,
                  **overrides: Any) -> "Cadence":
    """The cadence that a command's config sets (its keys of the same names), `overrides` and
    `total_steps` aside."""
    values = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
    return cls(**{**values, **overrides, "total_steps": total_steps})


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the stack: its name in log lines and where its metrics go."""
  name: str  # "" for a run trained alone.
  metrics_dir: epath.Path  # metrics.jsonl and tensorboard/.
  lr_scale: float = 1.0  # The run's peak learning rate over the optimizer's.
  quiet: tuple[str, ...] = ()  # Metrics written to the files but not printed.


@dataclasses.dataclass(frozen=True)
class Task:
  """What a training hands the loop."""
  # (state, batch, proceed) -> (state, metrics): a step whose `proceed` (a device bool) is
  # false applies nothing and leaves the state's step counter as it is.
  train_step: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, dict[str, jax.Array]]]
  batches: DataIterator  # This process's rows of the train batches, on the host.
  place: Callable[[Batch], PyTree]  # A host batch -> the global batch on the mesh.
  evaluate: Callable[[PyTree], list[dict[str, float]]]  # Params -> each run's held-out metrics.
  schedule: optax.Schedule  # The optimizer's learning rate by update count.
  flops: Callable[[Batch], float]  # Model FLOPs of one update on a batch (0: unknown).
  peak_flops: float  # Per device, for MFU.
  num_runs: int = 0  # Runs stacked on a leading axis of the state (0: no such axis).


@dataclasses.dataclass(frozen=True)
class Result:
  state: PyTree
  eval_metrics: list[dict[str, float]]  # Each run's last held-out metrics ({} if none).
  finished: bool  # Whether the state is at the last step.


def train(task: Task, state: PyTree, runs: Sequence[Run], checkpoint_dirs: Sequence[epath.Path],
          cadence: Cadence, resume_step: int | None = None) -> Result:
  """Trains `state` to `cadence.total_steps`, resuming from the checkpoints in `checkpoint_dirs`
  (one per run, or one for the whole stack), or from `resume_step` (a rewind).

  Raises `errors.Preempted` after saving when a preemption (SIGTERM) stops it, and
  `errors.Diverged` after saving the last finite state when a non-finite step stops it.
  """
  per_run = len(checkpoint_dirs) > 1
  take = stacked.take if per_run else (lambda tree, i: tree)
  ckpts = [checkpoint.Checkpointer(d, save_every_steps=cadence.checkpoint_every_steps,
                                   keep_last=cadence.keep_checkpoints, keep_best=cadence.keep_best)
           for d in checkpoint_dirs]
  storage_failed = False
  try:
    first_step, state = _resume(ckpts, state, task, per_run, resume_step)
    writers = [metrics.MetricWriter(r.metrics_dir, cadence.total_steps, r.name, first_step,
                                    r.quiet) for r in runs]
    try:
      return _loop(task, state, runs, ckpts, take, writers, first_step, cadence)
    finally:
      for writer in writers:
        writer.close()
  except errors.StorageError:
    storage_failed = True  # Closing would wait out orbax's timeouts on the failed storage.
    raise
  finally:
    if not storage_failed:
      for ckpt in ckpts:
        ckpt.close()


def _loop(task: Task, state: PyTree, runs: Sequence[Run], ckpts, take, writers, first_step: int,
          cadence: Cadence) -> Result:
  steps = cadence.total_steps
  eval_metrics = [{} for _ in runs]
  if first_step == 0 and cadence.eval_at_start:  # Where the runs start.
    eval_metrics = task.evaluate(state["params"])
    for writer, m in zip(writers, eval_metrics, strict=True):
      writer.eval(0, m)
  elif first_step == steps:
    logging.info("The run is at its last step already.")
  tokens, flops, skipped = 0.0, 0.0, np.zeros(len(runs), int)
  # With "stop", a step runs only if every step before it was finite: a device-side flag, so
  # that the host reads a step's flag one step late, the next step already queued behind it.
  proceed = jnp.asarray(True)
  pending = None  # The last step whose flag is not read yet.

  def check(pending: _Pending) -> None:
    """Reads a step's flag: counts what was skipped, stops the run if it must."""
    finite = np.asarray(jax.device_get(pending.metrics["finite"])).reshape(-1)
    if finite.all():
      return
    nonlocal skipped
    skipped = skipped + ~finite
    why = _nonfinite(cadence, pending.step, pending.metrics, finite, runs, skipped)
    if why:
      _log(writers, runs, task, pending.step, pending.metrics, tokens, flops, skipped)
      with metrics.paused(writers):
        raise errors.Diverged(_stop(why, cadence, ckpts, take, state, pending.data_before,
                                    task.batches.get_state()))

  with checkpoint.PreemptionWatcher() as watcher:
    for step in range(first_step + 1, steps + 1):
      before = task.batches.get_state()  # Where the data stand for a state saved at step - 1.
      batch = next(task.batches)
      flops += task.flops(batch)
      state, step_metrics = task.train_step(state, task.place(batch), proceed)
      if cadence.on_nonfinite == "stop":
        proceed = proceed & jnp.all(step_metrics["finite"])
      tokens = tokens + step_metrics["tokens"]  # Stays on device until the next log.
      for ckpt in ckpts:
        ckpt.check()  # A failed asynchronous save stops the run now.
      if pending is not None:
        check(pending)  # The step before: done, or nearly, with this one queued behind it.
      pending = _Pending(step, step_metrics, before)
      preempted = watcher.should_stop(step)
      logs, evaluates = step % cadence.log_every_steps == 0, step % cadence.eval_every_steps == 0
      if not (logs or evaluates or preempted or step == steps
              or any(ckpt.due(step) for ckpt in ckpts)):
        continue
      check(pending)  # What is logged, evaluated or saved is known to be finite.
      pending = None
      if logs or step == steps:
        _log(writers, runs, task, step, step_metrics, tokens, flops, skipped)
        tokens, flops = 0.0, 0.0
      with metrics.paused(writers):
        eval_losses = [None] * len(runs)
        if evaluates or step == steps:
          eval_metrics = task.evaluate(state["params"])
          for writer, m in zip(writers, eval_metrics, strict=True):
            writer.eval(step, m)
          eval_losses = [m.get("eval_loss") for m in eval_metrics]
        force = step == steps or preempted
        if force or any(ckpt.due(step) for ckpt in ckpts):
          data_state = task.batches.get_state()
          for i, ckpt in enumerate(ckpts):  # Each run's share is cut out only when saved.
            ckpt.save(step, take(state, i), data_state, eval_losses[i], force=force)
        if preempted:
          for ckpt in ckpts:
            ckpt.wait()
          raise errors.Preempted(f"Preempted: saved step {step}; start the same command again "
                                 "to resume.")
  finished = int(np.asarray(jax.device_get(state["step"])).reshape(-1)[0]) == steps
  if finished and not any(eval_metrics):  # Resumed at the last step: no evaluation yet.
    eval_metrics = task.evaluate(state["params"])
  return Result(state, eval_metrics, finished)


def _log(writers, runs: Sequence[Run], task: Task, step: int, step_metrics, tokens, flops: float,
         skipped: np.ndarray) -> None:
  """Each run's train metrics of `step`, its learning rate and the throughput since the last."""
  fetched, tokens = jax.device_get((step_metrics, tokens))
  for i, (writer, run) in enumerate(zip(writers, runs, strict=True)):
    scalars = {k: float(np.asarray(v).reshape(-1)[i]) for k, v in fetched.items()}
    # The learning rate of this step's update (the schedule counts updates from 0).
    scalars["lr"] = float(task.schedule(step - 1)) * run.lr_scale
    scalars["skipped_steps"] = float(skipped[i])
    writer.train(step, scalars, float(np.asarray(tokens).reshape(-1)[i]), flops, task.peak_flops)


def _resume(ckpts: Sequence[checkpoint.Checkpointer], state: PyTree, task: Task, per_run: bool,
            resume_step: int | None) -> tuple[int, PyTree]:
  """(step, state) of the latest step that every checkpoint saved and every process reads back
  (or of `resume_step`), the data iterator set to its position; (0, `state`) for none.

  A corrupt or partial step is skipped with a warning. Steps after the one resumed from (corrupt,
  rewound to `resume_step`, or saved by some runs only) are set aside, not deleted, so that the
  run saves them again."""
  steps = hosts.decide(lambda: sorted(set.intersection(*(set(c.all_steps()) for c in ckpts)),
                                      reverse=True))
  if resume_step is not None:
    if resume_step not in steps:
      raise checkpoint.CheckpointError(
          f"--resume_step={resume_step} is not a checkpoint of {ckpts[0].directory} (every "
          f"run has steps {sorted(steps)}): pick one of them")
    steps = [resume_step]
  shardings = jax.tree.map(lambda x: x.sharding, state)
  if per_run and task.num_runs:
    abstract = jax.eval_shape(stacked.take, state, 0)
    one_shardings = stacked.one_run_shardings(shardings)
  else:
    abstract, one_shardings = state, shardings
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, one_shardings)
  resumed = None
  for step in steps:
    try:
      restored, ok = [c.restore(abstract, step) for c in ckpts], True
    except checkpoint.CorruptCheckpoint as e:
      logging.warning("%s: resuming from the previous checkpoint instead.", e)
      ok = False
    if hosts.all_true(ok):
      resumed = (step, restored)
      break
  if steps and resumed is None:
    raise checkpoint.CheckpointError(
        f"no checkpoint of {ckpts[0].directory} can be read back (steps {steps}): move them out "
        "of the way to start afresh, or use a new --workdir")
  first_step = resumed[0] if resumed else 0
  for ckpt in ckpts:
    for later in hosts.decide(lambda ckpt=ckpt: [s for s in ckpt.all_steps() if s > first_step]):
      where = ckpt.set_aside(later, f"after-{first_step}")
      logging.warning("Set checkpoint %d aside in %s: the run resumes from step %d.", later,
                      where, first_step)
  if resumed is None:
    return 0, state
  states = [s for s, _ in resumed[1]]
  state = stacked.put_back(states, shardings) if per_run and task.num_runs else states[0]
  task.batches.set_state(resumed[1][0][1])
  logging.info("Resumed from step %d of %s.", first_step,
               ", ".join(str(c.directory.parent) for c in ckpts))
  return first_step, state


@dataclasses.dataclass(frozen=True)
class _Pending:
  step: int
  metrics: dict[str, jax.Array]
  data_before: dict[str, Any]  # The data position before the step's batch.


def _stop(why: str, cadence: Cadence, ckpts, take, state: PyTree,
          data_before_failure: dict[str, Any], data_now: dict[str, Any]) -> str:
  """Saves what a stop for a non-finite step keeps; returns the whole message.

  With "stop", no update of the failing step or after it was applied (a stack stops together;
  later steps do nothing): the state is the last finite one, saved as the checkpoint of the step
  before the failing one, with the data position before the failing step's batch, so that
  running again redoes that step rather than walking past it. After too many skipped steps, the
  state as it is (its non-finite updates skipped) is saved, with the data position now."""
  step = int(np.asarray(jax.device_get(state["step"])).reshape(-1)[0])
  if cadence.on_nonfinite == "skip":
    for i, ckpt in enumerate(ckpts):
      ckpt.save(step, take(state, i), data_now, force=True)
      ckpt.wait()
    return (f"{why}; saved the state of step {step} (its non-finite updates skipped): lower the "
            "learning rate (run again with --allow_config_change to resume from there) or check "
            "the data")
  last = step - 1  # The failing step counted, and nothing after it.
  if last == 0:
    return (f"{why}; nothing to save at the first step: lower the learning rate and start "
            "again")
  had = all(last in ckpt.all_steps() for ckpt in ckpts)
  earlier = sorted(set.intersection(*(set(c.all_steps()) for c in ckpts)) - {last})
  last_state = {**state, "step": state["step"] - 1}
  for i, ckpt in enumerate(ckpts):
    ckpt.save(last, take(last_state, i), data_before_failure, force=True)
    ckpt.wait()
  saved = (f"checkpoint {last} holds the last finite state" if had
           else f"saved the last finite state as checkpoint {last}")
  rewind = (f"add --resume_step=N to rewind to an earlier checkpoint (steps "
            f"{', '.join(map(str, earlier))})" if earlier
            else "if it diverges again from there, start afresh in a new --workdir")
  return (f"{why}; {saved}: lower the learning rate and run again with --allow_config_change "
          f"(it resumes from step {last}); {rewind}")


def _nonfinite(cadence: Cadence, step: int, step_metrics, finite: np.ndarray,
               runs: Sequence[Run], skipped: np.ndarray) -> str | None:
  """Logs the runs whose update at `step` was not finite (naming the offending part); returns
  why training must stop, or None to go on."""
  values = jax.device_get(step_metrics)
  for i in np.flatnonzero(~finite):
    value = lambda key, i=i: float(np.asarray(values[key]).reshape(-1)[i])
    parts = [f"{k}={value(k)}" for k in sorted(values) if k.startswith("loss")
             and not math.isfinite(value(k))]
    if not parts:
      parts = ([f"grad_norm={value('grad_norm')}"] if not math.isfinite(value("grad_norm"))
               else ["the updated parameters"])
    name = runs[i].name
    what = f"{name + ': ' if name else ''}step {step} is not finite ({', '.join(parts)})"
    if cadence.on_nonfinite == "stop":
      return f"{what}; no update of step {step} was applied"
    what += "; its update was not applied"
    logging.warning("%s (skipped %d of at most %d).", what, skipped[i], cadence.max_skipped_steps)
    if skipped[i] > cadence.max_skipped_steps:
      return (f"{what}: {skipped[i]} steps skipped, more than max_skipped_steps="
              f"{cadence.max_skipped_steps}")
  return None
