"""`distil_jax.report` on hand-written workdirs: tables, CSV and figures vs the written rows."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

from distil_jax import report, results

ROOT = pathlib.Path(__file__).parent.parent
TOTAL_STEPS = 60
TEACHER = {"teacher_accuracy": 0.2241, "teacher_perplexity": 178.3}


def _config(temperature: float, alpha_ce: float, seed: int, mode: str = "distill") -> dict:
  return {"mode": mode, "seed": seed, "total_steps": TOTAL_STEPS,
          "distill": {"temperature": temperature, "alpha_ce": alpha_ce, "alpha_mlm": 2.0},
          "optim": {"lr_peak": 5e-4}, "data": {"mask_prob": 0.15, "sources": ["wiki_offline"]}}


def _eval_row(rng: np.random.Generator, step: int, teacher: bool = True) -> dict:
  row = {"step": step, "kind": "eval", "time": 1764350000.0 + step,
         "eval_loss": rng.uniform(5, 6),
         "student_accuracy": 0.15 + step / 1000 + rng.uniform(0, 0.02),
         "student_perplexity": rng.uniform(190, 230)}
  if teacher:
    row.update(TEACHER, agreement=rng.uniform(0.5, 0.7), kl_t1=rng.uniform(0.2, 0.3))
  return row


def _train_row(step: int) -> dict:
  return {"step": step, "kind": "train", "time": 1764350000.0 + step, "loss": 9.0 - step / 10,
          "loss_ce": 1.0, "student_accuracy": 0.1}


def _write_run(path: pathlib.Path, config: dict, rows: list[dict]) -> None:
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config, indent=2))
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(rng, steps, teacher=True) -> list[dict]:
  return [r for s in steps for r in ([_train_row(s)] if s else []) + [_eval_row(rng, s, teacher)]]


def _command(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "distil_jax.report", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _tables(text: str) -> list[list[dict[str, str]]]:
  """Every markdown table of `text`, as rows of {header: cell}."""
  tables, block = [], []
  for line in [*text.splitlines(), ""]:
    if line.startswith("|"):
      block.append([cell.strip() for cell in line.strip("|").split("|")])
    elif block:
      tables.append([dict(zip(block[0], row, strict=True)) for row in block[2:]])
      block = []
  return tables


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """2 temperatures x 2 alpha_ce x 2 seeds, finished (one resumed, its last eval logged twice);
  T=4 seed 0 stopped at step 30, T=4 seed 1 not started. Returns (dir, final eval rows)."""
  root, rng, entries, finals = tmp_path_factory.mktemp("sweep"), np.random.default_rng(0), [], {}
  for t in (1.0, 2.0):
    for ce in (0.0, 5.0):
      for seed in (0, 1):
        name = f"T{t:g}_ce{ce:g}_seed{seed}"
        rows = _rows(rng, (0, 20, 40, 60))
        if name == "T2_ce5_seed1":  # Resumed from step 40: steps 40..60 logged again.
          rows += _rows(rng, (40, 60))
        _write_run(root / name, _config(t, ce, seed), rows)
        entries.append({"overrides": {"distill.temperature": t, "distill.alpha_ce": ce,
                                      "seed": seed}, "workdir": name})
        finals[name] = rows[-1]
  _write_run(root / "T4_ce5_seed0", _config(4.0, 5.0, 0), [*_rows(rng, (0, 20)), _train_row(30)])
  entries += [{"overrides": {"distill.temperature": 4.0, "distill.alpha_ce": 5.0, "seed": s},
               "workdir": f"T4_ce5_seed{s}"} for s in (0, 1)]
  (root / "sweep.json").write_text(json.dumps(entries))
  result = _command(root)
  assert result.returncode == 0, result.stderr[-3000:]
  return root, finals


def test_points_table_holds_the_last_eval_row_of_every_run(sweep):
  root, finals = sweep
  table = _tables((root / "report.md").read_text())[0]
  assert [r["run"] for r in table] == [
      "T1_ce0_seed0", "T1_ce0_seed1", "T1_ce5_seed0", "T1_ce5_seed1", "T2_ce0_seed0",
      "T2_ce0_seed1", "T2_ce5_seed0", "T2_ce5_seed1", "T4_ce5_seed0", "T4_ce5_seed1"]
  for row in table[:8]:
    final = finals[row["run"]]
    assert row["step"] == "60" and row["status"] == "finished"
    assert row["distill.temperature"] == row["run"][1] and row["seed"] == row["run"][-1]
    for column, key, decimals in [("student acc", "student_accuracy", 4),
                                  ("teacher acc", "teacher_accuracy", 4),
                                  ("student ppl", "student_perplexity", 2),
                                  ("teacher ppl", "teacher_perplexity", 2),
                                  ("top-1 agreement", "agreement", 4), ("KL(T=1)", "kl_t1", 4)]:
      assert float(row[column]) == pytest.approx(final[key], abs=0.51 * 10**-decimals), column
    ratio = np.divide(final["student_accuracy"], final["teacher_accuracy"]) * 100
    assert float(row["student/teacher acc (%)"]) == pytest.approx(ratio, abs=0.051)


def test_the_resumed_run_reports_its_last_logged_row(sweep):
  root, finals = sweep
  lines = (root / "T2_ce5_seed1" / "metrics.jsonl").read_text().splitlines()
  first_60 = next(json.loads(x) for x in lines if '"step": 60, "kind": "eval"' in x)
  row = next(r for r in _tables((root / "report.md").read_text())[0] if r["run"] == "T2_ce5_seed1")
  assert float(row["student acc"]) == pytest.approx(finals["T2_ce5_seed1"]["student_accuracy"],
                                                    abs=5.1e-5)
  assert float(row["student acc"]) != pytest.approx(first_60["student_accuracy"], abs=5.1e-5)


def test_unfinished_runs_are_marked_and_left_out_of_the_means(sweep):
  root, _ = sweep
  text = (root / "report.md").read_text()
  runs, summary = _tables(text)
  stopped, not_started = runs[8], runs[9]
  assert stopped["status"] == "**unfinished: step 30 of 60**" and stopped["step"] == "20"
  assert not_started["status"] == "**not started**" and not_started["student acc"] == "—"
  assert "Unfinished, so left out of the means and the final-accuracy figures: T4_ce5_seed0 " \
      "(unfinished: step 30 of 60), T4_ce5_seed1 (not started)." in text
  assert [r["distill.temperature"] for r in summary] == ["1", "1", "2", "2"]


def test_mean_over_seeds_equals_numpy(sweep):
  root, finals = sweep
  summary = _tables((root / "report.md").read_text())[1]
  assert [(r["distill.temperature"], r["distill.alpha_ce"], r["n"]) for r in summary] == [
      ("1", "0", "2"), ("1", "5", "2"), ("2", "0", "2"), ("2", "5", "2")]
  for row in summary:
    runs = [f"T{row['distill.temperature']}_ce{row['distill.alpha_ce']}_seed{s}" for s in (0, 1)]
    for column, values in [("student acc", [finals[r]["student_accuracy"] for r in runs]),
                           ("student/teacher acc (%)", [
                               100 * finals[r]["student_accuracy"] / finals[r]["teacher_accuracy"]
                               for r in runs])]:
      mean, rest = row[column].split(" ± ")
      std, lo_hi = rest.split(" (")
      lo, hi = lo_hi.rstrip(")").split("–")
      decimals = len(mean.split(".")[1])
      tolerance = 0.51 * 10**-decimals
      assert float(mean) == pytest.approx(np.mean(values), abs=tolerance)
      assert float(std) == pytest.approx(np.std(values, ddof=1), abs=tolerance)
      assert (float(lo), float(hi)) == pytest.approx((min(values), max(values)), abs=tolerance)


def test_csv_round_trips_every_override_and_final_metric(sweep):
  root, finals = sweep
  with (root / "report.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 10
  for row in rows[:8]:
    final = finals[row["run"]]
    assert row["status"] == "finished" and int(row["step"]) == 60
    assert float(row["distill.temperature"]) == float(row["run"][1])
    assert float(row["distill.alpha_ce"]) == float(row["run"].split("_ce")[1][0])
    assert int(row["seed"]) == int(row["run"][-1])
    for key in ("eval_loss", "student_accuracy", "teacher_accuracy", "student_perplexity",
                "teacher_perplexity", "agreement", "kl_t1"):
      assert float(row[key]) == final[key], key  # Exact: the CSV keeps every digit.
    assert float(row["accuracy_ratio_pct"]) == pytest.approx(
        100 * final["student_accuracy"] / final["teacher_accuracy"], rel=1e-12)
  assert (rows[8]["status"], rows[8]["step"], rows[8]["last_step"]) == (
      "unfinished: step 30 of 60", "20", "30")
  assert (rows[9]["status"], rows[9]["step"], rows[9]["student_accuracy"]) == (
      "not started", "", "")


@pytest.mark.parametrize("name", ["accuracy_vs_temperature.png", "learning_curves.png",
                                  "final_accuracy.png"])
def test_figures_are_images_embedded_in_the_report(sweep, name):
  root, _ = sweep
  pixels = image.imread(root / name)
  assert pixels.shape[0] >= 400 and pixels.shape[1] >= 800 and pixels.shape[2] in (3, 4)
  assert pixels[..., :3].std() > 0.05  # Not blank.
  assert f"]({name})" in (root / "report.md").read_text()


def test_two_run_workdirs_as_arguments(tmp_path):
  """A distillation run and a teacher MLM run: only `mode` differs, no seeds, no temperatures."""
  rng = np.random.default_rng(1)
  distill, mlm = tmp_path / "runs" / "student", tmp_path / "runs" / "teacher"
  distill_rows, mlm_rows = _rows(rng, (0, 20, 40, 60)), _rows(rng, (0, 20, 40, 60), teacher=False)
  _write_run(distill, _config(2.0, 5.0, 0), distill_rows)
  _write_run(mlm, _config(2.0, 5.0, 0, mode="mlm"), mlm_rows)
  result = _command(distill, mlm, f"--out_dir={tmp_path / 'out'}")
  assert result.returncode == 0, result.stderr[-3000:]
  text = (tmp_path / "out" / "report.md").read_text()
  tables = _tables(text)
  assert len(tables) == 1 and "## Mean over seeds" not in text
  student, teacher = tables[0]
  assert (student["run"], student["mode"], teacher["run"], teacher["mode"]) == (
      "student", "distill", "teacher", "mlm")
  assert float(student["student acc"]) == pytest.approx(distill_rows[-1]["student_accuracy"],
                                                        abs=5.1e-5)
  assert float(teacher["student acc"]) == pytest.approx(mlm_rows[-1]["student_accuracy"],
                                                        abs=5.1e-5)
  assert teacher["teacher acc"] == teacher["KL(T=1)"] == "—"
  assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
      "final_accuracy.png", "learning_curves.png"]


def test_errors_are_one_line(tmp_path):
  result = _command(tmp_path)
  assert result.returncode != 0
  assert result.stderr.strip() == (f"FATAL {tmp_path} has neither sweep.json nor config.json: "
                                   "pass a sweep workdir or the workdir of a distil_jax.main run")


@pytest.mark.parametrize("metrics, message", [
    ('{"step": 0, "kind": "eval", "student_accuracy": 0.1}\n{"step": 10, "kind": "tr',
     "metrics.jsonl line 2 is not valid JSON"),
    ('{"step": 10, "kind": "train", "loss": 3.0}\n', "no eval row in the metrics.jsonl of any"),
    ('[1, 2]\n', "metrics.jsonl line 1 has no integer 'step' and 'kind'")])
def test_bad_metrics_are_one_line_errors(tmp_path, metrics, message):
  _write_run(tmp_path / "run", _config(2.0, 5.0, 0), [])
  (tmp_path / "run" / "metrics.jsonl").write_text(metrics)
  with pytest.raises(results.ReportError, match=message) as error:
    report.write_report([str(tmp_path / "run")], tmp_path)
  assert "\n" not in str(error.value)


def test_bad_sweep_json_is_a_one_line_error(tmp_path):
  (tmp_path / "sweep.json").write_text('{"workdir": "a"}')
  with pytest.raises(results.ReportError, match="sweep.json is not a list of") as error:
    report.write_report([str(tmp_path)], tmp_path)
  assert "\n" not in str(error.value)
