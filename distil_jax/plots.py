"""PNG figures of a sweep's held-out student accuracy (matplotlib, Agg backend, no pyplot)."""

import pathlib
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from distil_jax.results import SEEDS, TEMPERATURE, Run, ordered, setting, spread

ACCURACY = "held-out masked-token accuracy (%)"
_SHORT = {"temperature": "T", "alpha_ce": "α_ce", "alpha_mlm": "α_mlm", "alpha_cos": "α_cos",
          "alpha_mse": "α_mse", "lr_peak": "lr"}


def label(items: Sequence[tuple[str, object]]) -> str:
  """A short legend label: (("distill.alpha_ce", 5.0),) -> "α_ce=5"."""
  short = lambda k: _SHORT.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1])
  value = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
  return ", ".join(f"{short(k)}={value(v)}" for k, v in items) or "student"


def percent(run: Run, metric: str = "student_accuracy") -> float:
  return 100 * run.metrics()[metric]


def teacher_accuracy(runs: Sequence[Run]) -> float | None:
  """The teacher's final accuracy in %, averaged over finished distill runs (None: no teacher)."""
  values = [percent(p, "teacher_accuracy") for p in runs
            if p.finished and "teacher_accuracy" in p.metrics()]
  return sum(values) / len(values) if values else None


def _colors(n: int) -> list:
  return list(colormaps["tab10" if n <= 10 else "tab20"].colors)


def _figure(width: float, height: float) -> Figure:
  """A figure drawn by the Agg backend, `width` x `height` inches at 120 dpi."""
  figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def _teacher_line(axes, teacher: float | None, vertical: bool = False) -> None:
  if teacher is not None:
    draw = axes.axvline if vertical else axes.axhline
    draw(teacher, color="black", linestyle="--", linewidth=1.2, label=f"teacher ({teacher:.1f}%)")


def _means(value_lists: Sequence[list[float]]) -> tuple[list[float], list | None]:
  """The mean of each list and, if any has several, error bars to their min and max."""
  spreads = [spread(values) for values in value_lists]
  means = [s.mean for s in spreads]
  if all(s.n == 1 for s in spreads):
    return means, None
  return means, [[s.mean - s.min for s in spreads], [s.max - s.mean for s in spreads]]


def _over_seeds(groups: dict[tuple, list[Run]]) -> str:
  return " (mean over seeds, bars: min–max)" if any(len(g) > 1 for g in groups.values()) else ""


def accuracy_vs_temperature(groups: dict[tuple, list[Run]], teacher: float | None,
                            path: pathlib.Path) -> None:
  """Final student accuracy vs T, a line per setting of the other keys, mean over seeds."""
  lines = {}
  for items, runs in groups.items():
    other = tuple(item for item in items if item[0] != TEMPERATURE)
    lines.setdefault(other, {})[dict(items)[TEMPERATURE]] = [percent(p) for p in runs]
  ticks = sorted({t for by_t in lines.values() for t in by_t})
  figure = _figure(8, 4.5)
  axes = figure.subplots()
  if ticks[0] > 0 and ticks[-1] / ticks[0] >= 4:  # Such as 1, 2, 4, 8.
    axes.set_xscale("log", base=2)
  for i, ((other, by_t), color) in enumerate(zip(lines.items(), _colors(len(lines)),
                                                 strict=False)):
    temperatures = sorted(by_t)
    means, errors = _means([by_t[t] for t in temperatures])
    dodge = 1 + 0.01 * (i - (len(lines) - 1) / 2)  # Keeps the error bars of lines apart.
    axes.errorbar([t * dodge for t in temperatures], means, yerr=errors, color=color, marker="o",
                  capsize=3, label=label(other))
  _teacher_line(axes, teacher)
  axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
  axes.minorticks_off()
  axes.set(xlabel="softmax temperature T of L_ce", ylabel=ACCURACY,
           title="Final student accuracy vs temperature" + _over_seeds(groups))
  axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
  axes.grid(alpha=0.3)
  figure.savefig(path)


def _curve(axes, run: Run, color) -> None:
  """A run's student accuracy vs step; its teacher's dashed; an x where an unfinished run is."""
  steps = [row["step"] for row in run.evals]
  student = [100 * row["student_accuracy"] for row in run.evals]
  axes.plot(steps, student, color=color, linewidth=1.2)
  if "teacher_accuracy" in run.evals[-1]:
    axes.plot(steps, [100 * row["teacher_accuracy"] for row in run.evals], color="black",
              linestyle="--", linewidth=1, alpha=0.6)
  if not run.finished:
    axes.plot(steps[-1], student[-1], "x", color=color, markersize=10, markeredgewidth=2.5)


def learning_curves(runs: Sequence[Run], keys: Sequence[str], path: pathlib.Path) -> None:
  """Held-out student accuracy vs step of every run that has evals, seeds in one colour.

  When the temperature varies, a panel per setting of the other keys and a colour per
  temperature (dark to light); otherwise one panel and a colour per setting.
  """
  evaluated = [p for p in ordered(runs, keys) if p.evals]
  by_temperature = TEMPERATURE in keys
  panel_keys = [k for k in keys if k != TEMPERATURE] if by_temperature else []
  colour_keys = [TEMPERATURE] if by_temperature else keys
  panels = list(dict.fromkeys(setting(p, panel_keys) for p in evaluated))
  series = list(dict.fromkeys(setting(p, colour_keys) for p in evaluated))
  palette = (colormaps["plasma"](np.linspace(0, 0.8, len(series))) if by_temperature
             else _colors(len(series)))
  color = dict(zip(series, palette, strict=False))
  columns = min(3, len(panels))
  rows = -(-len(panels) // columns)
  figure = _figure(max(8, 3.4 * columns + 1.8), max(4.5, 3 * rows + 1))
  grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).flat
  for axes, panel in zip(grid, panels, strict=False):
    for run in evaluated:
      if setting(run, panel_keys) == panel:
        _curve(axes, run, color[setting(run, colour_keys)])
    if len(panels) > 1:
      axes.set_title(label(panel), fontsize="medium")
    axes.grid(alpha=0.3)
  for axes in list(grid):  # Panels the grid has beyond the settings.
    axes.set_visible(False)
  handles = [Line2D([], [], color=color[s], label=label(s)) for s in series]
  if any("teacher_accuracy" in p.evals[-1] for p in evaluated):
    handles.append(Line2D([], [], color="black", linestyle="--", label="teacher"))
  if not all(p.finished for p in evaluated):
    handles.append(Line2D([], [], color="gray", marker="x", markeredgewidth=2.5, linestyle="",
                          label="unfinished (last eval)"))
  figure.legend(handles=handles, fontsize="small", loc="outside right center")
  figure.supxlabel("training step")
  figure.supylabel(ACCURACY)
  figure.suptitle("Learning curves: held-out student accuracy"
                  + (" (seeds share a colour)" if set(SEEDS) & set(keys) else ""))
  figure.savefig(path)


def final_accuracy(groups: dict[tuple, list[Run]], teacher: float | None,
                   path: pathlib.Path) -> None:
  """Horizontal bars: final student accuracy per setting, mean over seeds, min–max bars."""
  labels = [label(items) for items in groups]
  means, errors = _means([[percent(p) for p in runs] for runs in groups.values()])
  figure = _figure(8, max(3.5, 1.4 + 0.45 * len(labels)))
  axes = figure.subplots()
  bars = axes.barh(range(len(labels)), means, xerr=errors, color=_colors(1)[0], capsize=3,
                   height=0.6)
  axes.bar_label(bars, fmt="%.2f%%", label_type="center", color="white", fontsize="small")
  axes.set_yticks(range(len(labels)), labels)
  axes.invert_yaxis()
  _teacher_line(axes, teacher, vertical=True)
  axes.set(xlabel="final " + ACCURACY,
           title="Final student accuracy per setting" + _over_seeds(groups))
  if teacher is not None:
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
  axes.grid(axis="x", alpha=0.3)
  figure.savefig(path)
