r"""A run's held-out accuracy against steps and wall time: a table and a PNG.

  .venv/bin/python -m benchmarks.learning_curve WORKDIR [--out=curve.png]

Reads WORKDIR/metrics.jsonl (the eval rows: the standard held-out masked-LM evaluation). The wall
time is measured from the first row (the step-0 evaluation), so it includes evaluations and
saves. The last column is the accuracy gained over the previous 500 steps, the stopping rule of
docs/results.md (stop below one point per 500 steps).
"""

import json
import pathlib
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_OUT = flags.DEFINE_string("out", None, "PNG file; default: WORKDIR/learning_curve.png.")


def eval_rows(workdir: pathlib.Path) -> list[dict]:
  """The eval rows of the run, one per step (the last of a step logged twice)."""
  rows = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row["kind"] == "eval":
      rows[row["step"]] = row
  return [rows[step] for step in sorted(rows)]


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("pass one run workdir")
  workdir = pathlib.Path(argv[1])
  rows = eval_rows(workdir)
  start = rows[0]["time"]
  by_step = {r["step"]: r["student_accuracy"] for r in rows}
  print("| step | hours | held-out accuracy | perplexity | gain over 500 steps (points) |")
  print("|---|---|---|---|---|")
  for r in rows:
    before = by_step.get(r["step"] - 500)
    gain = f"{100 * (r['student_accuracy'] - before):+.1f}" if before is not None else ""
    print(f"| {r['step']} | {(r['time'] - start) / 3600:.2f} | {r['student_accuracy']:.2%} | "
          f"{r['student_perplexity']:.1f} | {gain} |")
  figure = Figure(figsize=(7, 4), dpi=120)
  axes = figure.add_subplot()
  axes.plot([r["step"] for r in rows], [100 * r["student_accuracy"] for r in rows], "o-")
  axes.set_xlabel("update step")
  axes.set_ylabel("held-out masked-token accuracy (%)")
  axes.set_title(f"{workdir.name}: held-out accuracy during training")
  axes.grid(alpha=0.3)
  hours = axes.secondary_xaxis(
      "top", functions=(lambda s: _interpolate(s, rows, "step", "time", start),
                        lambda h: _interpolate(h, rows, "time", "step", start)))
  hours.set_xlabel("wall time (hours)")
  figure.tight_layout()
  out = pathlib.Path(_OUT.value or workdir / "learning_curve.png")
  FigureCanvasAgg(figure).print_png(str(out))
  print(f"\n{out}")


def _interpolate(x, rows, source: str, target: str, start: float):
  """Steps to hours or back, along the run's eval rows."""
  hours = lambda r: (r["time"] - start) / 3600
  xs = [r["step"] if source == "step" else hours(r) for r in rows]
  ys = [r["step"] if target == "step" else hours(r) for r in rows]
  return np.interp(x, xs, ys)


if __name__ == "__main__":
  app.run(main)
