r"""Our train step against the same distillation step in PyTorch (benchmarks/torch_reference.py).

  .venv/bin/python -m benchmarks.bench_vs_torch [--repeats=5 --warmup=1 --shapes=tiny,bert-base]

For each shape (tiny.py's MiniLM teacher and 3-layer student on 16 x 128; a random bert-base
teacher and its 6-layer student on 4 x 128) and each L_ce variant (every real token; masked
positions only, both frameworks projecting only the masked positions onto the vocabulary), the two
steps run alternately on one batch of real tokens (no padding), after warm-up; the medians are
compared. FLOPs per token are `perf.train_step_flops`' count with the logits at the batch's
masked positions (the useful work); MFU is against each framework's own fp32 matmul peak,
measured in the same run. The machine's load (`uptime`) is printed before and after.
"""

import dataclasses
import statistics
import subprocess
import time
from collections.abc import Sequence

import jax
import numpy as np
import torch
from absl import app, flags

from benchmarks import step_setups, torch_reference
from distil_jax import distill_step, perf

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps of each framework, alternating.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps of each before.")
_SHAPES = flags.DEFINE_list("shapes", ["tiny", "bert-base"], "Shapes to run.")

SHAPES = {"tiny": (step_setups.tiny_models, 16, 128),
          "bert-base": (step_setups.bert_base_models, 4, 128)}
CE_ON_MASKED_ONLY = {"every real token": False, "masked only": True}
FORMATS = {"L_ce on": "{}", "ours tokens/s": "{:,.0f}", "torch tokens/s": "{:,.0f}",
           "ours/torch": "{:.2f}x", "GFLOP/token": "{:.2f}", "ours MFU": "{:.1%}",
           "torch MFU": "{:.1%}"}


def torch_matmul_flops(n: int = 2048, repeats: int = 3, trials: int = 3) -> float:
  """`perf.measure_matmul_flops` in PyTorch: best float32 FLOP/s of an n x n matmul."""
  a = torch.ones(n, n)
  best = 0.0
  for _ in range(trials):
    start = time.perf_counter()
    for _ in range(repeats):
      a = a @ a / n
    best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
  return best


def measure(shape: str, repeats: int, warmup: int, peaks: tuple[float, float]) -> list[dict]:
  """A row per L_ce variant: both steps' tokens/s at `shape`, FLOPs per token and MFUs."""
  build, batch_size, seq_len = SHAPES[shape]
  teacher_config, teacher_params, student_config, student_params = build()
  batch = step_setups.real_token_batch(batch_size, seq_len, teacher_config.vocab_size)
  tokens = batch_size * seq_len
  masked_per_row = round(float(np.mean(np.sum(batch["labels"] != -100, axis=1))))
  teacher = torch_reference.from_flax(teacher_config, teacher_params)
  student = torch_reference.from_flax(student_config, student_params)
  rows = []
  for ce_on, masked_only in CE_ON_MASKED_ONLY.items():
    config = distill_step.StepConfig(
        student=student_config, teacher=teacher_config, restrict_ce_to_mask=masked_only,
        max_predictions=distill_step.max_predictions(seq_len, 0.15),
        mse=False)  # alpha_mse is 0: neither step computes L_mse.
    ours, _ = step_setups.compile_step(config, student_params, teacher_params, batch)
    reference = torch_reference.Distiller(teacher, student, restrict_ce_to_mask=masked_only)
    ours_s, torch_s = map(statistics.median, step_setups.alternate(
        [ours, lambda r=reference: r.step(batch)], repeats, warmup))
    counted = dataclasses.replace(config, max_predictions=masked_per_row)
    useful = perf.train_step_flops(counted, perf.full_rows(counted, batch_size, seq_len)) / tokens
    rows.append({"shape": f"{shape} {batch_size}x{seq_len}", "L_ce on": ce_on,
                 "ours tokens/s": tokens / ours_s, "torch tokens/s": tokens / torch_s,
                 "ours/torch": torch_s / ours_s, "GFLOP/token": useful / 1e9,
                 "ours MFU": useful * tokens / ours_s / peaks[0],
                 "torch MFU": useful * tokens / torch_s / peaks[1]})
  return rows


def uptime() -> str:
  return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main(argv: Sequence[str]) -> None:
  del argv
  print(f"load before: {uptime()}")
  peaks = perf.measure_matmul_flops(jax.devices()[0]), torch_matmul_flops()
  print(f"fp32 2048^3 matmul: jax {peaks[0] / 1e9:.0f} GFLOP/s, torch {peaks[1] / 1e9:.0f} "
        f"GFLOP/s ({torch.get_num_threads()} torch threads); medians of {_REPEATS.value} "
        f"alternating steps after {_WARMUP.value} warm-up\n")
  rows = [row for shape in _SHAPES.value
          for row in measure(shape, _REPEATS.value, _WARMUP.value, peaks)]
  print(step_setups.markdown_table(rows, FORMATS))
  print(f"\nload after: {uptime()}")


if __name__ == "__main__":
  app.run(main)
