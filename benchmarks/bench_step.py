r"""Speed of the train step on this machine, for the models of experiments/tiny.py.

  .venv/bin/python -m benchmarks.bench_step [--batch=32 --seq_len=128 --timed_steps=3]

Prints, per variant of the step: seconds per step, real and padded tokens/s, FLOPs per step
(our analytic count and XLA's cost analysis), and MFU against the measured matmul peak of the
device; then the input pipeline's tokens/s beside what the fastest step consumes.
"""

import time
from collections.abc import Sequence

import jax
from absl import app, flags

from benchmarks import bench_data, step_setups
from distil_jax import data, distill_step, perf, resources

_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_TIMED_STEPS = flags.DEFINE_integer("timed_steps", 3, "Timed steps per variant, after one more.")

# name -> (distil?, restrict_ce_to_mask, gather_logits)
VARIANTS = {
    "distill, L_ce on all tokens (original)": (True, False, False),
    "distill, L_ce on masked, full logits": (True, True, False),
    "distill, L_ce on masked, gathered (tiny.py)": (True, True, True),
    "teacher MLM, full logits": (False, False, False),
    "teacher MLM, gathered (teacher_mlm.py)": (False, False, True),
}


def measure_steps(batch: dict, steps: int) -> list[dict]:
  """Times each variant of the step on `batch` (MiniLM teacher, 3-layer student)."""
  teacher_config, teacher_params, student_config, student_params = step_setups.tiny_models()
  batch_size, seq_len = batch["input_ids"].shape
  tokens = int(batch["attention_mask"].sum())
  peak = perf.peak_flops_per_device() * jax.device_count()
  rows = []
  for name, (distill, restrict, gather) in VARIANTS.items():
    config = distill_step.StepConfig(
        student=student_config if distill else teacher_config,
        teacher=teacher_config if distill else None, restrict_ce_to_mask=restrict,
        gather_logits=gather, max_predictions=distill_step.max_predictions(seq_len, 0.15),
        mse=False)  # As a run with alpha_mse 0 (the default) trains.
    run, xla_flops = step_setups.compile_step(
        config, student_params if distill else teacher_params,
        teacher_params if distill else None, batch)
    run()
    start = time.perf_counter()
    for _ in range(steps):
      run()
    seconds = (time.perf_counter() - start) / steps
    flops = perf.train_step_flops(config, perf.full_rows(config, batch_size, seq_len))
    rows.append({"variant": name, "s/step": seconds, "tokens/s": tokens / seconds,
                 "padded tokens/s": batch_size * seq_len / seconds, "GFLOP/step": flops / 1e9,
                 "XLA GFLOP/step": xla_flops / 1e9, "MFU": flops / seconds / peak})
  return rows


FORMATS = {"s/step": "{:.2f}", "tokens/s": "{:,.0f}", "padded tokens/s": "{:,.0f}",
           "GFLOP/step": "{:.1f}", "XLA GFLOP/step": "{:.1f}", "MFU": "{:.1%}"}


def main(argv: Sequence[str]) -> None:
  del argv
  config = data.default_data_config()
  config.update({"batch_size": _BATCH.value, "max_len": _SEQ_LEN.value})
  datasets = data.make_datasets(config, resources.minilm_dir(), 30522)
  batch = next(datasets.train)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, matmul peak "
        f"{perf.peak_flops_per_device() / 1e9:.0f} GFLOP/s; batch {_BATCH.value} x "
        f"{_SEQ_LEN.value}, {int(batch['attention_mask'].sum())} real tokens\n")
  rows = measure_steps(batch, _TIMED_STEPS.value)
  print(step_setups.markdown_table(rows, FORMATS))
  pipeline = bench_data.measure_data_pipeline(config, str(resources.minilm_dir()), 30522, 50)
  fastest = max(row["tokens/s"] for row in rows)
  print("\n" + bench_data.format_table(pipeline))
  warm = pipeline[-1].tokens_per_second
  print(f"\nwarm pipeline / fastest step: {warm / fastest:,.0f}x "
        f"({warm:,.0f} vs {fastest:,.0f} tokens/s)")


if __name__ == "__main__":
  app.run(main)
