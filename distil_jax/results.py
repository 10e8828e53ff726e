"""Reads finished and unfinished runs from workdirs: their config and held-out evaluations.

A run is a workdir of `distil_jax.main` (config.json + metrics.jsonl), found directly or
through a sweep workdir's sweep.json (`[{"overrides": {...}, "workdir": "..."}, ...]`, each
workdir relative to the sweep's). Nothing here draws or formats: `distil_jax.report` does.
"""

import dataclasses
import json
import math
import os
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

from distil_jax import errors

# Final held-out metrics, in table order; the teacher's three and KL exist only in distill runs.
METRICS = ("student_accuracy", "teacher_accuracy", "student_perplexity", "teacher_perplexity",
           "accuracy_ratio_pct", "agreement", "kl_t1")
SEED = "seed"
SEEDS = (SEED, "data.seed")  # Keys that only draw another sample of the same setting.
TEMPERATURE = "distill.temperature"


class ReportError(errors.UserError, ValueError):
  """A workdir that cannot be read; the one-line message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run: its config values (dotted keys), its eval rows and how far it got."""
  name: str
  path: pathlib.Path
  values: dict[str, Any]  # The flattened config.json, or the sweep's overrides if not started.
  overrides: tuple[str, ...]  # Keys its sweep.json entry sets (none for a plain run workdir).
  evals: tuple[dict, ...]  # Eval rows by step; of a step logged twice (resumed), the last.
  last_step: int | None  # The last step of any row in metrics.jsonl; None: no row yet.
  total_steps: int | None

  @property
  def final(self) -> dict | None:
    return self.evals[-1] if self.evals else None

  @property
  def finished(self) -> bool:
    return (self.final is not None and self.total_steps is not None
            and self.final["step"] >= self.total_steps)

  @property
  def status(self) -> str:
    if self.last_step is None:
      return "not started"
    if self.finished:
      return "finished"
    return f"unfinished: step {self.last_step} of {self.total_steps or '?'}"

  def metrics(self) -> dict[str, float]:
    """The final eval row's metrics, with the student/teacher accuracy ratio in %."""
    row = dict(self.final or {})
    if row.get("teacher_accuracy"):
      row["accuracy_ratio_pct"] = 100 * row["student_accuracy"] / row["teacher_accuracy"]
    return {name: row[name] for name in ("eval_loss", *METRICS) if name in row}


def _read_json(path: pathlib.Path, expected: str) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ReportError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): it should hold "
                      f"{expected}") from None


_NON_FINITE = ("nan", "inf", "-inf")


def read_metrics(path: pathlib.Path) -> tuple[tuple[dict, ...], int | None]:
  """(eval rows sorted by step, the last row of a step winning; the last step of any row)."""
  evals, last_step = {}, None
  lines = path.read_text().splitlines() if path.exists() else []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ReportError(f"{path} line {number} is not valid JSON ({e.msg}): repair or delete "
                        "that line") from None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or "kind" not in row:
      raise ReportError(f"{path} line {number} has no integer 'step' and 'kind': it is not a "
                        "distil_jax.main metrics row; delete that line")
    last_step = max(row["step"], last_step or 0)
    if row["kind"] == "eval":  # Non-finite values are written as "nan", "inf", "-inf".
      evals[row["step"]] = {k: float(v) if v in _NON_FINITE else v for k, v in row.items()}
  return tuple(evals[step] for step in sorted(evals)), last_step


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"distill": {"temperature": 2}} -> {"distill.temperature": 2}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def read_run(path: pathlib.Path, overrides: dict[str, Any] | None = None) -> Run:
  """The run in `path`; `overrides` (from a sweep) stand in for a config not written yet."""
  config_path = path / "config.json"
  if config_path.exists():
    values = flatten(_read_json(config_path, "the resolved config of a distil_jax.main run"))
  elif overrides is not None:
    values = dict(overrides)
  else:
    raise ReportError(f"{path} has neither sweep.json nor config.json: pass a sweep workdir or "
                      "the workdir of a distil_jax.main run")
  evals, last_step = read_metrics(path / "metrics.jsonl")
  return Run(name=path.name, path=path, values=values, overrides=tuple(overrides or ()),
               evals=evals, last_step=last_step, total_steps=values.get("total_steps"))


def _sweep_entries(path: pathlib.Path) -> list[dict]:
  entries = _read_json(path, '[{"overrides": {...}, "workdir": "..."}, ...]')
  valid = lambda e: (isinstance(e, dict) and isinstance(e.get("workdir"), str)
                     and isinstance(e.get("overrides", {}), dict))
  if not isinstance(entries, list) or not entries or not all(map(valid, entries)):
    raise ReportError(f'{path} is not a list of {{"overrides": {{...}}, "workdir": "..."}}: '
                      "write it as distil_jax.sweep does")
  return entries


def read_workdir(path: pathlib.Path) -> list[Run]:
  """The runs of a sweep workdir (with sweep.json), or the one run of a run workdir."""
  if (path / "sweep.json").exists():
    return [read_run(path / e["workdir"], e.get("overrides", {}))
            for e in _sweep_entries(path / "sweep.json")]
  return [read_run(path)]


def read(paths: Sequence[str | pathlib.Path]) -> list[Run]:
  """Every run of the sweep and run workdirs `paths`, named by their path relative to the
  directory that holds them all; an error if none has been evaluated yet."""
  runs = [p for path in paths for p in read_workdir(pathlib.Path(path))]
  if not any(p.evals for p in runs):
    raise ReportError(f"no eval row in the metrics.jsonl of any of the {len(runs)} runs: "
                      "report after the first evaluation (eval_every_steps)")
  if len(runs) > 1:
    common = os.path.commonpath([p.path.resolve() for p in runs])
    runs = [dataclasses.replace(p, name=os.path.relpath(p.path.resolve(), common))
              for p in runs]
  return runs


def comparable(value: Any) -> str:
  """A hashable form of a config value in which 2 and 2.0 are equal."""
  if isinstance(value, int | float) and not isinstance(value, bool):
    value = float(value)
  return json.dumps(value, sort_keys=True)


def sort_key(value: Any) -> tuple:
  """Orders numbers numerically, before anything else."""
  if isinstance(value, int | float) and not isinstance(value, bool):
    return (0, float(value), "")
  return (1, 0.0, str(value))


def varying_keys(runs: Sequence[Run]) -> list[str]:
  """Config keys with more than one value among the runs: sweep overrides first."""
  keys = list(dict.fromkeys(k for p in runs for k in p.overrides))
  keys += sorted({k for p in runs for k in p.values} - set(keys))
  return [k for k in keys if len({comparable(p.values[k]) for p in runs if k in p.values}) > 1]


def setting(run: Run, keys: Sequence[str]) -> tuple:
  """The run's values of `keys`, except the seeds: runs that differ only in their seeds
  (`seed`, `data.seed`) share it."""
  return tuple((k, run.values.get(k)) for k in keys if k not in SEEDS)


def ordered(runs: Sequence[Run], keys: Sequence[str]) -> list[Run]:
  """The runs sorted by their values of `keys`, then by name."""
  return sorted(runs, key=lambda p: (*(sort_key(p.values.get(k)) for k in keys), p.name))


def by_setting(runs: Sequence[Run], keys: Sequence[str]) -> dict[tuple, list[Run]]:
  """Finished runs grouped by setting, settings in the order of their values."""
  groups = {}
  for run in runs:
    if run.finished:
      groups.setdefault(setting(run, keys), []).append(run)
  order = lambda item: tuple(sort_key(v) for _, v in item[0])
  return dict(sorted(groups.items(), key=order))


@dataclasses.dataclass(frozen=True)
class Spread:
  """Mean, sample standard deviation (NaN for one value), min, max and count of values."""
  mean: float
  std: float
  min: float
  max: float
  n: int


def spread(values: Sequence[float]) -> Spread:
  std = statistics.stdev(values) if len(values) > 1 else math.nan
  return Spread(statistics.fmean(values), std, min(values), max(values), len(values))
