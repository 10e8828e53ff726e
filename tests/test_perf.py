"""Model FLOPs for MFU: counted on a batch's real tokens, by hand on tiny shapes."""

import numpy as np

from distil_jax import distill_step, models, perf

MODEL = models.ModelConfig(vocab_size=10, hidden_size=4, num_layers=2, num_heads=2,
                           intermediate_size=8)


def test_a_batch_counts_its_real_tokens_pairs_within_segments_and_masked_positions():
  batch = {"attention_mask": np.array([[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]]),
           "labels": np.array([[-100, 5, -100, 6, -100, -100], [7, -100, -100, -100, -100, -100]])}
  assert perf.batch_work(batch, logits_at_masked=True) == perf.Work(7, 3**2 + 2**2 + 2**2, 3)
  assert perf.batch_work(batch, logits_at_masked=False).logit_positions == 7


def test_flops_by_hand():
  work = perf.Work(tokens=7, attention_pairs=17, logit_positions=3)
  # Per layer and token: 2 (4 h^2 + 2 h i) = 2 (64 + 64); per pair 4 h = 16; head 2 (h^2 + h v).
  forward = 2 * (7 * 256 + 17 * 16) + 3 * 2 * (16 + 40)
  assert perf.forward_flops(MODEL, work) == forward
  config = distill_step.StepConfig(student=MODEL, teacher=MODEL, num_runs=3)
  assert perf.train_step_flops(config, work) == 3 * 3 * forward + forward
  assert perf.classify_step_flops(MODEL, work) == 3 * 2 * (7 * 256 + 17 * 16)
  full = perf.full_rows(distill_step.StepConfig(student=MODEL, teacher=None, max_predictions=2),
                        batch_size=4, seq_len=5)
  assert full == perf.Work(20, 100, 8)  # MLM only: logits at the 2 gathered positions per row.
