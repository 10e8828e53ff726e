r"""Fused vs separate: a 4-point sweep of the tiny experiment's distillation stage, same steps.

  .venv/bin/python -m benchmarks.bench_sweep [--steps=30]

Runs `python -m distil_jax.sweep` twice on experiments/tiny.py's distillation stage (MiniLM
teacher, 3-layer student, 32 x 128 packed sequences; the teacher is not adapted first, which
changes no shape), over temperature 1, 4 x alpha_ce 0.5, 5: once fused (one program), once
separate (four runs one after another). Prints the ratio predicted from the FLOPs of the step,
then the measured one: wall time of the whole command, seconds per step in steady state, and
the start-up and compile time saved; and each command's peak memory (resident set).

Then the same two steps in this process, interleaved: each round one fused step of the 4 runs,
then one step of a single run 4 times. A shared or virtual machine's speed drifts by tens of
percent over minutes, which the two commands above, minutes apart, cannot tell from the steps'
own difference; each round compares like with like.
"""

import dataclasses
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import step_setups
from distil_jax import distill_step, hf, perf, resources, stacked

_STEPS = flags.DEFINE_integer("steps", 30, "Train steps of every point.")
_ROUNDS = flags.DEFINE_integer("rounds", 8, "Interleaved rounds in this process, after one.")
SWEEP = ["--sweep=distill.temperature=1,4", "--sweep=distill.alpha_ce=0.5,5"]
CONFIG = """
from experiments import tiny

def get_config():
  config = tiny.get_config()
  config.adapt_teacher = None
  config.total_steps = {steps}
  config.log_every_steps = 1
  config.eval_every_steps = 10**6  # Evaluated at the start and the end only.
  config.eval_batches = 1
  config.checkpoint_every_steps = 10**6  # Saved at the end only.
  config.export = False
  config.fill_mask = ""
  return config
"""


def predicted_ratio(points: int = 4) -> tuple[float, float, float]:
  """(fused FLOPs per step, separate FLOPs per step, their ratio), as the step computes them."""
  teacher, _ = hf.read_config(resources.minilm_dir())
  student = dataclasses.replace(teacher, num_layers=3, type_vocab_size=0)
  one = distill_step.StepConfig(student=student, teacher=teacher, restrict_ce_to_mask=True,
                                max_predictions=distill_step.max_predictions(128, 0.15))
  fused_config = dataclasses.replace(one, num_runs=points)
  fused = perf.train_step_flops(fused_config, perf.full_rows(fused_config, 32, 128))
  separate = points * perf.train_step_flops(one, perf.full_rows(one, 32, 128))
  return fused, separate, fused / separate


def interleaved_ratios(rounds: int, points: int = 4) -> list[float]:
  """Fused / separate step time of each round: one fused step of `points` runs, then `points`
  steps of one run, on the tiny shapes (full rows of 128 real tokens, 15% masked), after one
  round."""
  teacher_config, teacher_params, student_config, student_params = step_setups.tiny_models()
  one = distill_step.StepConfig(student=student_config, teacher=teacher_config,
                                restrict_ce_to_mask=True, mse=False,
                                max_predictions=distill_step.max_predictions(128, 0.15))
  batch = step_setups.real_token_batch(32, 128, teacher_config.vocab_size)
  separate, _ = step_setups.compile_step(one, student_params, teacher_params, batch)
  fused, _ = step_setups.compile_step(dataclasses.replace(one, num_runs=points),
                                      stacked.stack([student_params] * points), teacher_params,
                                      batch)
  separately = lambda: [separate() for _ in range(points)]
  fused_s, separate_s = step_setups.alternate([fused, separately], rounds, warmup=1)
  return [f / s for f, s in zip(fused_s, separate_s, strict=True)]


def run_sweep(mode: str, config: pathlib.Path, workdir: pathlib.Path) -> dict[str, float]:
  """Wall time and peak resident memory of the sweep command, and its steady seconds per step
  (the median over the points of the median interval between logged steps)."""
  command = [sys.executable, "-m", "distil_jax.sweep", f"--config={config}",
             f"--workdir={workdir}", f"--mode={mode}", *SWEEP]
  start = time.perf_counter()
  process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": os.getcwd()},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _, status, usage = os.wait4(process.pid, 0)
  wall = time.perf_counter() - start
  if status:
    raise RuntimeError(f"{mode} sweep failed: {process.stderr.read()[-2000:]}")
  step_seconds = []
  for metrics in sorted(workdir.glob("*/metrics.jsonl")):
    times = [r["time"] for r in map(json.loads, metrics.read_text().splitlines())
             if r["kind"] == "train"]
    intervals = sorted(b - a for a, b in itertools.pairwise(times))
    step_seconds.append(intervals[len(intervals) // 2])
  return {"wall_s": wall, "peak_gib": usage.ru_maxrss / 2**20,
          "step_s": sorted(step_seconds)[len(step_seconds) // 2]}


def main(argv) -> None:
  del argv
  fused_flops, separate_flops, ratio = predicted_ratio()
  print(f"FLOPs per step of the 4 points: fused {fused_flops / 1e12:.2f} T, separate "
        f"{separate_flops / 1e12:.2f} T (4 x {separate_flops / 4e12:.3f} T): predicted step "
        f"time ratio {ratio:.2f}")
  with tempfile.TemporaryDirectory() as directory:
    directory = pathlib.Path(directory)
    config = directory / "bench_config.py"
    config.write_text(CONFIG.format(steps=_STEPS.value))
    runs = {mode: run_sweep(mode, config, directory / mode) for mode in ("fused", "separate")}
  fused, separate = runs["fused"], runs["separate"]
  steps = _STEPS.value
  print("\n| mode | wall (s) | s per step of all 4 points | peak memory (GiB) |\n"
        "|---|---|---|---|")
  for mode, r, per_step in (("fused", fused, fused["step_s"]),
                            ("separate", separate, 4 * separate["step_s"])):
    print(f"| {mode} | {r['wall_s']:.0f} | {per_step:.2f} | {r['peak_gib']:.2f} |")
  measured = fused["step_s"] / (4 * separate["step_s"])
  overhead = lambda r, n: r["wall_s"] - n * steps * r["step_s"]
  print(f"\nsteady step time, fused / separate: measured {measured:.2f}, predicted {ratio:.2f} "
        f"({(measured / ratio - 1):+.0%})")
  print(f"wall time, fused / separate: {fused['wall_s'] / separate['wall_s']:.2f} "
        f"({separate['wall_s'] - fused['wall_s']:.0f} s saved, of which start-up and compile: "
        f"{overhead(separate, 4) - overhead(fused, 1):.0f} s)")
  ratios = sorted(interleaved_ratios(_ROUNDS.value))
  print(f"\nin one process, interleaved ({len(ratios)} rounds): steady step time, fused / "
        f"separate: median {ratios[len(ratios) // 2]:.2f} (from {ratios[0]:.2f} to "
        f"{ratios[-1]:.2f})")


if __name__ == "__main__":
  app.run(main)
