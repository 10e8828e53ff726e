"""FLOPs of the train steps and the peak FLOP/s of a device, for MFU."""

import time

import jax
import jax.numpy as jnp

from distil_jax import distill_step, models

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def forward_flops(config: models.ModelConfig, seq_len: int, logit_positions: int) -> float:
  """Matmul FLOPs of one sequence's forward pass, MLM head at `logit_positions` positions."""
  h, i = config.hidden_size, config.intermediate_size
  per_token_layer = 2 * (4 * h * h + 2 * h * i) + 2 * 2 * seq_len * h  # Dense + attention.
  head = 2 * (h * h + h * config.vocab_size)
  return config.num_layers * seq_len * per_token_layer + logit_positions * head


def train_step_flops(config: distill_step.StepConfig, batch_size: int, seq_len: int) -> float:
  """FLOPs of one update: the student's forward and backward (3x forward, once per run of a
  fused sweep), the teacher's forward (once), on every (padded) position; logits where the step
  computes them."""
  gathered = config.gather_logits and (config.teacher is None or config.restrict_ce_to_mask)
  positions = min(config.max_predictions, seq_len) if gathered else seq_len
  flops = 3 * max(config.num_runs, 1) * forward_flops(config.student, seq_len, positions)
  if config.teacher is not None:
    flops += forward_flops(config.teacher, seq_len, positions)
  return batch_size * flops


def classify_step_flops(config: models.ModelConfig, num_runs: int, batch_size: int,
                        seq_len: int) -> float:
  """FLOPs of one fine-tuning update of `num_runs` stacked runs, each on its own batch: the
  encoder's forward and backward (the classification head is negligible)."""
  return 3 * num_runs * batch_size * forward_flops(config, seq_len, 0)


def peak_flops_per_device(device: jax.Device | None = None) -> float:
  """The device's dense peak: from the table for accelerators, measured with a matmul on CPU."""
  device = device or jax.devices()[0]
  for kind, peak in PEAK_FLOPS.items():
    if device.device_kind.startswith(kind):
      return peak
  return measure_matmul_flops(device)


def measure_matmul_flops(device: jax.Device, n: int = 2048, repeats: int = 3,
                         trials: int = 3) -> float:
  """Best achieved float32 FLOP/s of a large matmul on `device`: the practical peak of a CPU."""
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda x: x @ x / n)
  matmul(a).block_until_ready()
  best = 0.0
  for _ in range(trials):
    start = time.perf_counter()
    for _ in range(repeats):
      a = matmul(a)
    a.block_until_ready()
    best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
  return best
