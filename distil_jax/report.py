r"""Tables and figures of the final held-out metrics of a sweep, or of several runs.

  python -m distil_jax.report DIR [RUN_DIR ...] [--out_dir=DIR]

Each argument is a sweep workdir (with sweep.json) or the workdir of a `distil_jax.main` run.
Writes to --out_dir (default: the first argument) report.md (a table of every run's final metrics,
the mean over seeds of each setting, the figures), report.csv (a row per run: every override and
every final metric) and the PNG figures that apply: accuracy_vs_temperature.png,
learning_curves.png, final_accuracy.png. Unfinished runs are listed and marked, and left out of
the means and of the figures of final accuracy.
"""

import csv
import json
import pathlib
from collections.abc import Sequence

from absl import app, flags

from distil_jax import cli, plots, results
from distil_jax.results import METRICS, TEMPERATURE, Run

_OUT = flags.DEFINE_string("out_dir", None, "Output directory; default: the first argument.")

# Metric -> (column header, number format).
_COLUMNS = {"student_accuracy": ("student acc", ".4f"), "teacher_accuracy": ("teacher acc", ".4f"),
            "student_perplexity": ("student ppl", ".2f"),
            "teacher_perplexity": ("teacher ppl", ".2f"),
            "accuracy_ratio_pct": ("student/teacher acc (%)", ".1f"),
            "agreement": ("top-1 agreement", ".4f"), "kl_t1": ("KL(T=1)", ".4f")}
_MISSING = "—"


def format_value(value) -> str:
  """A config value as a short table cell: 2.0 -> "2", ("a", "b") -> ["a", "b"]."""
  if isinstance(value, float):
    return f"{value:g}"
  return value if isinstance(value, str) else json.dumps(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = [header, ["---"] * len(header), *rows]
  return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |"
                   for line in lines)


def evaluation_note(runs: Sequence[Run]) -> str:
  """What the metrics are, in one line."""
  rates = sorted({p.values["data.mask_prob"] for p in runs if "data.mask_prob" in p.values})
  rate = "/".join(f"{r:.0%}" for r in rates) or "15%"
  return (f"Held-out masked-LM evaluation: {rate} of the real tokens, uniformly chosen, replaced "
          "by [MASK], at positions fixed for every run and seed. Accuracy: top-1 at those "
          "positions; perplexity: exp of the mean negative log-likelihood there; top-1 "
          "agreement: the fraction where student and teacher predict the same token; KL(T=1): "
          "KL(teacher ‖ student) at temperature 1, averaged over them."
          + (" An MLM-only run (mode mlm) reports the model it trains as the student."
             if any(p.values.get("mode") == "mlm" for p in runs) else ""))


def runs_table(runs: Sequence[Run], keys: Sequence[str]) -> str:
  """A row per run: its values of `keys`, the step and metrics of its last eval, its status."""
  header = ["run", *keys, "step", *(_COLUMNS[m][0] for m in METRICS), "status"]
  rows = []
  for run in results.ordered(runs, keys):
    metrics = run.metrics()
    rows.append([run.name, *(format_value(run.values.get(k)) for k in keys),
                 str(run.final["step"]) if run.final else _MISSING,
                 *(format(metrics[m], _COLUMNS[m][1]) if m in metrics else _MISSING
                   for m in METRICS),
                 run.status if run.finished else f"**{run.status}**"])
  return _md_table(header, rows)


def _spread_cell(values: Sequence[float], fmt: str) -> str:
  if not values:
    return _MISSING
  s = results.spread(values)
  if s.n == 1:
    return format(s.mean, fmt)
  return f"{s.mean:{fmt}} ± {s.std:{fmt}} ({s.min:{fmt}}–{s.max:{fmt}})"


def summary_table(groups: dict[tuple, list[Run]]) -> str:
  """A row per setting: n and each metric's mean ± sample std (min–max) over its seeds."""
  keys = [k for k, _ in next(iter(groups))] or ["setting"]
  rows = []
  for items, runs in groups.items():
    values = [format_value(v) for _, v in items] or ["all"]
    rows.append([*values, str(len(runs)), *(
        _spread_cell([p.metrics()[m] for p in runs if m in p.metrics()], _COLUMNS[m][1])
        for m in METRICS)])
  return _md_table([*keys, "n", *(_COLUMNS[m][0] for m in METRICS)], rows)


def csv_columns(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
  """The run, every override and varying key, progress, and every final metric."""
  overrides = dict.fromkeys([*(k for p in runs for k in p.overrides), *keys])
  return ["run", *overrides, "status", "step", "last_step", "total_steps", "eval_loss", *METRICS]


def write_csv(runs: Sequence[Run], keys: Sequence[str], path: pathlib.Path) -> None:
  columns = csv_columns(runs, keys)
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    for run in results.ordered(runs, keys):
      row = {**run.values, **run.metrics(), "run": run.name, "status": run.status,
             "step": run.final["step"] if run.final else None,
             "last_step": run.last_step, "total_steps": run.total_steps}
      writer.writerow({c: _csv_value(row.get(c)) for c in columns})


def _csv_value(value):
  if value is None:
    return ""
  return value if isinstance(value, str | int | float) else json.dumps(value)


def write_figures(runs: Sequence[Run], keys: Sequence[str], out: pathlib.Path
                  ) -> list[tuple[str, str]]:
  """The figures that apply, as (title, file name): accuracy vs temperature if it varies among
  finished runs; learning curves; bars per setting unless temperature is all that varies."""
  groups = results.by_setting(runs, keys)
  teacher = plots.teacher_accuracy(runs)
  temperatures = {dict(items).get(TEMPERATURE) for items in groups}
  figures = []
  if TEMPERATURE in keys and len(temperatures) > 1:
    plots.accuracy_vs_temperature(groups, teacher, out / "accuracy_vs_temperature.png")
    figures.append(("Final student accuracy vs temperature", "accuracy_vs_temperature.png"))
  if any(len(p.evals) > 1 for p in runs):
    plots.learning_curves(runs, keys, out / "learning_curves.png")
    figures.append(("Learning curves", "learning_curves.png"))
  if len(groups) > 1 and set(keys) - {TEMPERATURE, *results.SEEDS}:
    plots.final_accuracy(groups, teacher, out / "final_accuracy.png")
    figures.append(("Final student accuracy per setting", "final_accuracy.png"))
  return figures


def markdown(runs: Sequence[Run], keys: Sequence[str], figures: Sequence[tuple[str, str]],
             sources: Sequence[str]) -> str:
  """report.md: the runs table, the mean over seeds when seeds repeat a setting, figures."""
  finished = sum(p.finished for p in runs)
  lines = ["# Report", "", f"{len(runs)} runs from {', '.join(f'`{s}`' for s in sources)}, "
           f"{finished} finished."]
  constant = {k: p.values[k] for p in runs for k in p.overrides if k not in keys}
  if constant:
    lines.append("Same in every run: " + ", ".join(f"{k}={format_value(v)}"
                                                   for k, v in constant.items()) + ".")
  lines += ["", "## Final held-out metrics of every run", "", runs_table(runs, keys), "",
            "The eval row of each run's last evaluated step. " + evaluation_note(runs)]
  unfinished = [f"{p.name} ({p.status})" for p in results.ordered(runs, keys) if not p.finished]
  if unfinished:
    lines += ["", "Unfinished, so left out of the means and the final-accuracy figures: "
              + ", ".join(unfinished) + "."]
  groups = results.by_setting(runs, keys)
  if any(len(g) > 1 for g in groups.values()):
    lines += ["", "## Mean over seeds", "", summary_table(groups), "",
              "Mean ± sample standard deviation (min–max) over the finished runs of each setting "
              "that differ only in seed; n: their number. Same evaluation as above."]
  if figures:
    lines += ["", "## Figures", ""]
    lines += [f"![{title}]({name})\n" for title, name in figures]
  return "\n".join(lines).rstrip() + "\n"


def write_report(paths: Sequence[str], out: str | pathlib.Path) -> list[pathlib.Path]:
  """Reads the workdirs `paths` and writes report.md, report.csv and figures to `out`."""
  runs = results.read(paths)
  keys = results.varying_keys(runs)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  figures = write_figures(runs, keys, out)
  write_csv(runs, keys, out / "report.csv")
  (out / "report.md").write_text(markdown(runs, keys, figures, paths))
  return [out / "report.md", out / "report.csv", *(out / name for _, name in figures)]


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("pass a sweep workdir or one or more run workdirs")
  print("\n".join(map(str, write_report(argv[1:], _OUT.value or argv[1]))))


if __name__ == "__main__":
  cli.run(main)
