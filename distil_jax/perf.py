"""FLOPs of the train steps and the peak FLOP/s of a device, for MFU."""

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


class Work(NamedTuple):
  """What a batch asks of a model: its real tokens, the (query, key) pairs of real tokens that
  attend to each other (within their segments), and the positions that need logits."""
  tokens: float
  attention_pairs: float
  logit_positions: float


def full_rows(config: distill_step.StepConfig, batch_size: int, seq_len: int) -> Work:
  """Rows without padding, each one segment, with logits where the step computes them (at
  `max_predictions` gathered positions per row, or at every position)."""
  gathered = config.gather_logits and logits_at_masked(config)
  positions = min(config.max_predictions, seq_len) if gathered else seq_len
  return Work(batch_size * seq_len, batch_size * seq_len**2, batch_size * positions)


def batch_work(batch: dict[str, np.ndarray], logits_at_masked: bool) -> Work:
  """The work of a host batch's real tokens (its "attention_mask" holds segment ids), logits at
  its masked positions or at every real token; a stacked [runs, rows, length] batch counts once
  per run."""
  segments = batch["attention_mask"].reshape(-1, batch["attention_mask"].shape[-1])
  real = segments > 0
  rows = np.arange(len(segments))[:, None] * (int(segments.max(initial=0)) + 1)
  sizes = np.bincount((rows + segments)[real])
  masked = float(np.sum(batch["labels"] != -100)) if logits_at_masked else float(real.sum())
  return Work(float(real.sum()), float(np.sum(sizes.astype(np.float64) ** 2)), masked)


def forward_flops(config: models.ModelConfig, work: Work) -> float:
  """Matmul FLOPs of a forward pass on `work`: dense layers per token, attention per pair, the
  MLM head at the logit positions."""
  h, i = config.hidden_size, config.intermediate_size
  dense, attention = 2 * (4 * h * h + 2 * h * i), 2 * 2 * h  # Per token; per pair (QK, PV).
  head = 2 * (h * h + h * config.vocab_size)
  return (config.num_layers * (work.tokens * dense + work.attention_pairs * attention)
          + work.logit_positions * head)


def train_step_flops(config: distill_step.StepConfig, work: Work) -> float:
  """Model FLOPs of one update on `work` (a global batch's): the student's forward and backward
  (3x forward, once per run of a fused sweep) and the teacher's forward (once)."""
  flops = 3 * max(config.num_runs, 1) * forward_flops(config.student, work)
  if config.teacher is not None:
    flops += forward_flops(config.teacher, work)
  return flops


def logits_at_masked(config: distill_step.StepConfig) -> bool:
  """Whether the step's losses need logits at the masked positions alone."""
  return config.teacher is None or config.restrict_ce_to_mask


def classify_step_flops(config: models.ModelConfig, work: Work) -> float:
  """Model FLOPs of one fine-tuning update on `work` (every stacked run's batch together): the
  encoder's forward and backward (the classification head is negligible)."""
  return 3 * forward_flops(config, work._replace(logit_positions=0))


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
