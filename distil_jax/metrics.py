"""Console progress lines, TensorBoard event files and a JSON-lines log, from process 0 only."""

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence

import jax
from absl import logging
from etils import epath

from distil_jax import errors, storage


class MetricWriter:
  """Writes train and eval scalars to the console, WORKDIR/tensorboard and WORKDIR/metrics.jsonl
  (one JSON object per line: {"step", "kind": "train" or "eval", "time": Unix seconds,
  scalars...}; strict JSON: a non-finite scalar is written as the string "nan", "inf" or "-inf",
  which Python's float() reads back).

  A run resumed from `resume_step` first drops the rows of later steps (logged before the
  interruption, about to be logged again), so that every step has one row of each kind. The file
  is rewritten whole at each write, which works on GCS too (objects cannot be appended to).
  Scalars named in `quiet` are written to the files but not printed.
  """

  def __init__(self, workdir: epath.PathLike, total_steps: int, name: str = "",
               resume_step: int = 0, quiet: Sequence[str] = ()):
    self.total_steps = total_steps
    self.prefix = f"{name}: " if name else ""
    self.quiet = set(quiet)
    self.enabled = jax.process_index() == 0
    self._path = epath.Path(workdir) / "metrics.jsonl"
    self._lines, self._tensorboard = [], None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self._tensorboard = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
      if self._path.exists():
        self._lines = [line for line in self._path.read_text().splitlines()
                       if _step(line) <= resume_step]
    self._last = None  # (time, step) of the previous train write.
    self._excluded = 0.0  # Seconds since then spent outside training (eval, checkpoints).

  def _scalars(self, step: int, kind: str, scalars: dict[str, float]) -> None:
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f"{kind}/{name}", value, step)
    self._tensorboard.flush()
    row = {"step": step, "kind": kind, "time": round(time.time(), 3),
           **{name: _json_number(value) for name, value in scalars.items()}}
    self._lines.append(json.dumps(row, allow_nan=False))
    try:
      storage.write_atomic(self._path, "\n".join(self._lines) + "\n")
    except OSError as e:
      raise errors.StorageError(
          f"cannot write {self._path} ({type(e).__name__}: {e.strerror or e}): free space or fix "
          "the disk, and start again to resume from the last checkpoint") from None

  def train(self, step: int, scalars: dict[str, float], tokens: float, flops: float,
            peak_flops: float) -> None:
    """Logs the train metrics of `step`, with throughput since the previous call.

    `tokens` are real tokens and `flops` the model FLOPs of the steps since the previous call;
    MFU (against `peak_flops` per device) is left out when `flops` is not known (0).
    """
    now = time.perf_counter()
    if self._last is not None:
      seconds, steps = now - self._last[0] - self._excluded, step - self._last[1]
      scalars = {**scalars, "tokens_per_s": tokens / seconds, "steps_per_s": steps / seconds}
      if flops:
        scalars["mfu"] = flops / seconds / (peak_flops * jax.device_count())
    self._last, self._excluded = (now, step), 0.0
    if not self.enabled:
      return
    self._scalars(step, "train", scalars)
    parts = " ".join(f"{k.removeprefix('loss_')}={scalars[k]:.4g}" for k in sorted(scalars)
                     if k.startswith("loss_") and k not in self.quiet)
    line = f"{self.prefix}step {step}/{self.total_steps} loss={scalars['loss']:.4g}"
    line += f" ({parts})" if parts else ""
    for key, label in (("student_accuracy", "acc"), ("accuracy", "acc"),
                       ("teacher_accuracy", "teacher_acc")):
      if key in scalars:
        line += f" {label}={scalars[key]:.3f}"
    if "tokens_per_s" in scalars:
      eta = (self.total_steps - step) / scalars["steps_per_s"]
      line += f" | {scalars['tokens_per_s']:,.0f} tok/s"
      line += f" mfu={scalars['mfu']:.1%}" if "mfu" in scalars else ""
      line += f" eta={_duration(eta)}"
    logging.info("%s", line)

  def eval(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._scalars(step, "eval", scalars)
    logging.info("%seval step %d: %s", self.prefix, step, " ".join(
        f"{name}={value:.4g}" for name, value in sorted(scalars.items())))

  def close(self) -> None:
    if self.enabled:
      self._tensorboard.close()


@contextlib.contextmanager
def paused(writers: Sequence[MetricWriter]) -> Iterator[None]:
  """Excludes the time spent in the block (evaluation, saving) from the writers' throughput."""
  start = time.perf_counter()
  try:
    yield
  finally:
    for writer in writers:
      writer._excluded += time.perf_counter() - start


def _json_number(value: float) -> float | str:
  """`value`, or for a non-finite one its name ("nan", "inf", "-inf"): JSON has no NaN."""
  return value if math.isfinite(value) else str(value)


def _step(line: str) -> float:
  """The step of a metrics.jsonl line (a damaged line counts as step 0: it is kept)."""
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return 0


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
