r"""Sweeps temperature, loss weights (any config key) over a grid, many runs in one program.

  python -m distil_jax.sweep --config=experiments/tiny.py --workdir=DIR \
      --sweep='distill.temperature=1,2,4,8' --sweep='distill.alpha_ce=0.5,5' \
      [--mode=fused|separate] [--config.KEY=VALUE ...]

Repeated --sweep flags form a grid (their product); without them, the experiment file's
`get_sweep()` lists the points (dicts of overrides). DIR/sweep.json lists the points and their
workdirs (DIR/T2_ce5, ...), each a complete single-run workdir. In `fused` mode (the default), the
points that differ only in `train.FUSABLE_KEYS` form a group trained by one compiled step: one
teacher forward per batch, one data pipeline, one teacher in memory, the students stacked;
other keys (depth, max_len, batch size, data, teacher) split the grid into groups. `separate`
runs the points one after another. Running the command again resumes every unfinished point.
`--plan` prints the groups as JSON lines (for launchers) and `--group=K` runs group K only.
"""

import ast
import copy
import dataclasses
import importlib.util
import itertools
import json
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from distil_jax import checkpoint, cli, errors, tpu, train

_SWEEP = flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: values of a config key; "
                                   "repeated flags form a grid.")
_MODE = flags.DEFINE_enum("mode", "fused", ["fused", "separate"],
                          "fused: groups of points in one program; separate: one run per point.")
_PLAN = flags.DEFINE_bool("plan", False, "Print the groups as JSON lines and exit.")
_GROUP = flags.DEFINE_integer("group", None, "Run this group only (see --plan).")

# Short names of swept keys in the points' directory names, e.g. T2_ce5.
_SHORT_NAMES = {"distill.temperature": "T", "distill.alpha_ce": "ce", "distill.alpha_mlm": "mlm",
                "distill.alpha_cos": "cos", "distill.alpha_mse": "mse", "optim.lr_peak": "lr",
                "data.seed": "dseed", "student.num_layers": "L"}


class SweepError(errors.UserError, ValueError):
  """A sweep that cannot run; the one-line message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Point:
  overrides: dict[str, Any]
  workdir: str  # Relative to the sweep directory.
  config: ml_collections.ConfigDict


def parse_sweeps(base: ml_collections.ConfigDict, specs: Sequence[str]) -> list[dict[str, Any]]:
  """The grid of `--sweep KEY=V1,V2` specs: one dict of overrides per point, values parsed with
  the types of `base`'s keys."""
  axes = []
  for spec in specs:
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key:
      raise SweepError(f"--sweep={spec!r} is not KEY=V1,V2,...: e.g. "
                       "--sweep='distill.temperature=1,2,4'")
    current = _lookup(base, key, f"--sweep={spec!r}")
    parsed = [_parse(v, current, key) for v in _split_values(values)]
    if not parsed:
      raise SweepError(f"--sweep={spec!r} gives no value for {key}: list at least one")
    axes.append([(key, v) for v in parsed])
  return [dict(combo) for combo in itertools.product(*axes)]


def _lookup(config: ml_collections.ConfigDict, key: str, where: str) -> Any:
  node = config
  for i, part in enumerate(key.split(".")):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      close = [k for k in (node.keys() if isinstance(node, ml_collections.ConfigDict) else ())
               if k.startswith(part[:3])]
      hint = f" (did you mean {'.'.join([*key.split('.')[:i], close[0]])!r}?)" if close else ""
      raise SweepError(f"{where}: unknown config key {key!r}{hint}; the keys are in "
                       "experiments/common.py")
    node = node[part]
  return node


def _split_values(values: str) -> list[str]:
  """Splits on the commas outside brackets and quotes: "(0,2),(1,3)" -> ["(0,2)", "(1,3)"]."""
  parts, depth, quote, current = [], 0, None, ""
  for char in values:
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      parts.append(current)
      current = ""
      continue
    current += char
  parts.append(current)
  return [p.strip() for p in parts if p.strip()]


def _parse(text: str, current: Any, key: str) -> Any:
  """`text` as a value of the type of `current`, the key's value in the base config."""
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    value = ast.literal_eval(text)
    if isinstance(current, (tuple, list)) and not isinstance(value, (tuple, list)):
      raise ValueError
    return tuple(value) if isinstance(current, tuple) else value
  except (ValueError, SyntaxError):
    raise SweepError(f"--sweep value {text!r} for {key} is not a {type(current).__name__} (the "
                     "type of that key): fix the value") from None


def experiment_points(config_path: str) -> list[dict[str, Any]] | None:
  """The experiment file's `get_sweep()`, or None if it defines none."""
  path = config_path.split(":")[0]
  spec = importlib.util.spec_from_file_location("_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_sweep() if hasattr(module, "get_sweep") else None


def point_name(overrides: dict[str, Any]) -> str:
  """A readable directory name: T2_ce5 for {"distill.temperature": 2.0, "distill.alpha_ce": 5.0}."""
  def show(value):
    if isinstance(value, float):
      return f"{value:g}"
    if isinstance(value, (tuple, list)):
      return "-".join(map(show, value))
    return re.sub(r"[^A-Za-z0-9.+-]", "", str(value))
  parts = [_SHORT_NAMES.get(key, key.split(".")[-1]) + show(value)
           for key, value in overrides.items()]
  return "_".join(parts) or "base"


def make_points(base: ml_collections.ConfigDict, grid: list[dict[str, Any]]) -> list[Point]:
  """One config per point of the grid, each with a unique directory name."""
  if not grid:
    raise SweepError("the sweep has no point: give --sweep='KEY=V1,V2' or define get_sweep() in "
                     "the experiment file")
  points, names = [], set()
  for overrides in grid:
    config = copy.deepcopy(base)
    for key, value in overrides.items():
      _lookup(config, key, "get_sweep()")
      try:
        config.update_from_flattened_dict({key: value})
      except TypeError as e:
        raise SweepError(f"sweep value {value!r} for {key}: {e}") from None
    name = point_name(overrides)
    if name in names:
      name = f"{name}_{len(points)}"
    names.add(name)
    points.append(Point(overrides, name, config))
  return points


def groups(points: Sequence[Point], mode: str) -> list[list[Point]]:
  """Points trained together: equal `train.fusion_key` in fused mode, one each in separate."""
  if mode == "separate":
    return [[p] for p in points]
  by_key: dict[str, list[Point]] = {}
  for p in points:
    by_key.setdefault(train.fusion_key(p.config), []).append(p)
  return list(by_key.values())


def _split_keys(groups_: Sequence[Sequence[Point]]) -> list[str]:
  """The swept keys that differ between groups."""
  keys = {k for g in groups_ for p in g for k in p.overrides}
  values = lambda key: {json.dumps(g[0].overrides.get(key), default=str) for g in groups_}
  return sorted(k for k in keys if k not in train.FUSABLE_KEYS and len(values(k)) > 1)


def write_plan(directory: epath.Path, points: Sequence[Point]) -> None:
  """Writes DIR/sweep.json, or checks that the one there lists the same points."""
  plan = [{"overrides": p.overrides, "workdir": p.workdir} for p in points]
  path = directory / "sweep.json"
  if path.exists():
    if json.loads(path.read_text()) != json.loads(json.dumps(plan)):
      raise SweepError(f"{path} lists other points than this command: use a new --workdir, or "
                       "the --sweep flags that made it")
    return
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")


def finished(point: Point, directory: epath.Path) -> bool:
  """Whether the point's run has reached its last step (and exported, if it exports)."""
  workdir = directory / point.workdir
  if point.config.export:
    return (workdir / "export" / "config.json").exists()
  if not (workdir / "checkpoints").exists():
    return False
  steps = checkpoint.Checkpointer(workdir, save_every_steps=1, keep_last=1).all_steps()
  return bool(steps) and steps[-1] >= point.config.total_steps


def shared_teacher(points: Sequence[Point], directory: epath.Path) -> None:
  """Adapts the teacher once into DIR/teacher when the experiment asks for it, and points every
  point's config at its export."""
  adapt = {json.dumps(p.config.adapt_teacher.to_dict() if p.config.adapt_teacher else None,
                      sort_keys=True, default=str) for p in points}
  if adapt == {"null"}:
    return
  if len(adapt) > 1:
    raise SweepError("points differ in adapt_teacher.*: adapt each teacher in a run of its own "
                     "and sweep with --config.teacher=ITS_EXPORT")
  teacher = train.teacher_directory(points[0].config, directory)
  for p in points:
    p.config.adapt_teacher = None
    p.config.teacher = str(teacher)


def _train(points: Sequence[Point], directory: epath.Path, named: bool,
           allow_config_change: bool) -> None:
  """Trains `points` fused; a fused program the devices cannot hold is split in two, and so on.
  A preemption raises errors.Preempted: running the command again resumes."""
  try:
    train.run([p.config for p in points], [directory / p.workdir for p in points],
              [p.workdir for p in points] if named else None, allow_config_change)
  except tpu.DoesNotFit as e:
    if len(points) == 1:
      raise
    half = (len(points) + 1) // 2
    logging.info("%d points fused do not fit (%s): split into groups of %d and %d.", len(points),
                 e, half, len(points) - half)
    for part in (points[:half], points[half:]):
      _train(part, directory, named, allow_config_change)


def sweep(base: ml_collections.ConfigDict, grid: list[dict[str, Any]], directory: epath.PathLike,
          mode: str = "fused", group: int | None = None, allow_config_change: bool = False
          ) -> None:
  """Runs (or resumes) every unfinished point of `grid` in `directory`."""
  directory = epath.Path(directory)
  points = make_points(base, grid)
  for p in points:  # Every point is checked before any is trained.
    try:
      train.check_config(p.config)
    except errors.ConfigError as e:
      raise SweepError(f"point {p.workdir}: {e}") from None
  plan = groups(points, mode)
  if group is not None and not 0 <= group < len(plan):
    raise SweepError(f"--group={group} does not exist: this sweep has groups 0..{len(plan) - 1}")
  write_plan(directory, points)
  logging.info("Sweep of %d points in %d %s: %s.", len(points), len(plan),
               "group" if len(plan) == 1 else "groups",
               "; ".join(f"group {i}: {', '.join(p.workdir for p in g)}"
                         for i, g in enumerate(plan))
               + (f" (split by {', '.join(_split_keys(plan))})" if _split_keys(plan) else ""))
  shared_teacher(points, directory)
  for index, members in enumerate(plan):
    if group is not None and index != group:
      continue
    todo = [p for p in members if not finished(p, directory)]
    if not todo:
      logging.info("Group %d is finished.", index)
      continue
    _train(todo, directory, len(points) > 1, allow_config_change)


def main(argv) -> None:
  del argv
  if cli.WORKDIR.value is None:
    raise app.UsageError("--workdir is required: the sweep's directory")
  base = cli.CONFIG.value
  grid = (parse_sweeps(base, _SWEEP.value) if _SWEEP.value
          else experiment_points(config_flags.get_config_filename(flags.FLAGS["config"])))
  if grid is None:
    raise SweepError("nothing to sweep: give --sweep='KEY=V1,V2' or define get_sweep() in the "
                     "experiment file")
  if _PLAN.value:
    for index, members in enumerate(groups(make_points(base, grid), _MODE.value)):
      print(json.dumps({"group": index, "points": [
          {"overrides": p.overrides, "workdir": p.workdir} for p in members]}, default=str))
    return
  sweep(base, grid, cli.WORKDIR.value, _MODE.value, _GROUP.value, cli.ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
  cli.run(main)
