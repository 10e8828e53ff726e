"""The PyTorch reference step of benchmarks/bench_vs_torch.py computes what our step computes."""

import jax
import numpy as np
import pytest
from helpers import fresh_state, random_batch, setup

from benchmarks import torch_reference
from distil_jax import distill_step, hf, losses

pytestmark = pytest.mark.slow  # PyTorch models and steps beside ours: the benchmark's parity.

WEIGHTS = losses.LossWeights(alpha_mse=0.5)  # Every part counts in the total.


def _reference(run: dict, restrict: bool, **optimizer) -> torch_reference.Distiller:
  student_params = jax.tree.map(np.asarray, run["state"]["params"]["student"])
  return torch_reference.Distiller(
      torch_reference.from_flax(run["config"].teacher, run["teacher_params"]),
      torch_reference.from_flax(run["config"].student, student_params),
      restrict_ce_to_mask=restrict, weights=WEIGHTS, **optimizer)


@pytest.mark.parametrize("restrict", [False, True])  # L_ce on every real token, on masked ones.
def test_losses_and_gradients_equal_ours(restrict):
  run = setup(sgd=True, lr=1.0, restrict_ce_to_mask=restrict)
  batch = random_batch(8, seed=7)  # Padded rows; at most 3 masked positions per row.
  state, ours = run["train"](fresh_state(run), run["teacher"], batch, distill_step.Hyper(WEIGHTS))
  reference = _reference(run, restrict)
  theirs = reference.losses(batch)
  for name in ("loss", "loss_ce", "loss_mlm", "loss_cos", "loss_mse"):
    np.testing.assert_allclose(float(theirs[name]), ours[name], rtol=1e-4, err_msg=name)
  assert float(theirs["loss_ce"]) > 0.1 and float(theirs["loss_cos"]) > 0.01

  theirs["loss"].backward()  # SGD with lr 1: our update is minus our gradient.
  ours_grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                            run["state"]["params"]["student"], state["params"]["student"])
  expected = hf.to_hf_state_dict(run["config"].student, ours_grads, "distilbert")
  grads = {n: p.grad.numpy() for n, p in reference.student.named_parameters()}
  scale = max(np.abs(g).max() for g in expected.values())
  for name, grad in expected.items():
    np.testing.assert_allclose(grads[name], grad, atol=1e-4 * scale, err_msg=name)


def test_one_step_of_adamw_with_clipping_equals_ours():
  run = setup(weight_decay=0.5, restrict_ce_to_mask=True)
  batch = random_batch(8, seed=8)
  state, _ = run["train"](fresh_state(run), run["teacher"], batch, distill_step.Hyper(WEIGHTS))
  reference = _reference(run, True, lr=1e-2, weight_decay=0.5)
  reference.step(batch)
  expected = hf.to_hf_state_dict(run["config"].student, state["params"]["student"], "distilbert")
  for name, param in reference.student.named_parameters():
    if "k_lin.bias" in name:  # Its gradient is 0 (softmax ignores q.b_k): Adam's step is noise.
      continue
    # Adam's first step is lr * g / (|g| + eps): 1e-4 is 1% of it, for tiny gradients' rounding.
    np.testing.assert_allclose(param.detach().numpy(), expected[name], atol=1e-4, err_msg=name)
