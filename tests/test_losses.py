"""Tests of distil_jax.losses against numpy references and the original PyTorch formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.experimental.pallas import tpu as pltpu

from distil_jax import losses, sharding

BATCH, SEQ, VOCAB, DIM = 3, 7, 50, 16
LENGTHS = (7, 5, 3)  # Rows 1 and 2 are padded.


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  attention = np.arange(SEQ)[None, :] < np.array(LENGTHS)[:, None]
  labels = rng.integers(0, VOCAB, (BATCH, SEQ))
  labels[~(attention & (rng.random((BATCH, SEQ)) < 0.4))] = losses.IGNORE_INDEX
  assert 0 < (labels != losses.IGNORE_INDEX).sum() < attention.sum()
  return {
      "s": rng.normal(size=(BATCH, SEQ, VOCAB)).astype(np.float32) * 3,
      "t": rng.normal(size=(BATCH, SEQ, VOCAB)).astype(np.float32) * 3,
      "hs": rng.normal(size=(BATCH, SEQ, DIM)).astype(np.float32),
      "ht": rng.normal(size=(BATCH, SEQ, DIM)).astype(np.float32),
      "attention": attention,
      "labels": labels,
  }


def _close(actual, expected, tol=1e-5):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


def _torch(x):
  return torch.from_numpy(np.asarray(x, dtype=np.float64))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss(data, temperature):
  m = data["attention"]
  s, t = data["s"][m] / temperature, data["t"][m] / temperature
  p = _softmax(t)
  numpy_ref = (p * (np.log(p) - _log_softmax(s))).sum(-1).mean() * temperature**2
  torch_ref = torch.nn.KLDivLoss(reduction="batchmean")(
      torch.log_softmax(_torch(s), -1), torch.softmax(_torch(t), -1)) * temperature**2
  actual = losses.kd_loss(data["s"], data["t"], m, temperature)
  _close(actual, numpy_ref)
  _close(actual, torch_ref.item())


@pytest.mark.parametrize("temperature", [1.0, 2.0, 8.0])
def test_kd_loss_gradient_closed_form(data, temperature):
  m = data["attention"]
  grad = jax.grad(losses.kd_loss)(data["s"], data["t"], m, temperature)
  expected = temperature * (_softmax(data["s"] / temperature) - _softmax(data["t"] / temperature))
  _close(grad, np.where(m[..., None], expected, 0.0) / m.sum())


@pytest.mark.parametrize("temperature", [100.0, 1000.0])
def test_kd_loss_gradient_keeps_its_scale_at_high_temperature(data, temperature):
  # Thanks to the T² factor the gradient tends to (s - mean(s) - t + mean(t)) / (V n) as O(1/T).
  m = data["attention"]
  s, t = data["s"], data["t"]
  grad = jax.grad(losses.kd_loss)(s, t, m, temperature)
  centered = (s - s.mean(-1, keepdims=True)) - (t - t.mean(-1, keepdims=True))
  limit = np.where(m[..., None], centered, 0.0) / (VOCAB * m.sum())
  np.testing.assert_allclose(grad, limit, atol=5 / temperature * np.abs(limit).max())


def test_teacher_carries_no_gradient(data):
  m = data["attention"]
  args = (data["s"], data["t"], m)
  for grad in (jax.grad(losses.kd_loss, argnums=1)(*args, 2.0),
               jax.grad(losses.mse_loss, argnums=1)(*args),
               jax.grad(losses.cosine_loss, argnums=1)(data["hs"], data["ht"], m)):
    assert not np.any(grad)


def test_mlm_loss(data):
  labels = data["labels"]
  valid = labels != losses.IGNORE_INDEX
  numpy_ref = -np.mean(np.take_along_axis(_log_softmax(data["s"]), labels[..., None].clip(0),
                                          -1)[..., 0][valid])
  torch_ref = torch.nn.CrossEntropyLoss(ignore_index=-100)(
      _torch(data["s"].reshape(-1, VOCAB)), torch.from_numpy(labels.reshape(-1)))
  actual = losses.mlm_loss(data["s"], labels)
  _close(actual, numpy_ref)
  _close(actual, torch_ref.item())


def test_cosine_loss(data):
  m = data["attention"]
  hs, ht = data["hs"].copy(), data["ht"].copy()
  hs[0, 0] = 0.0  # A zero vector: loss 1, no NaN.
  s, t = hs[m], ht[m]
  cos = (s * t).sum(-1) / np.sqrt(((s * s).sum(-1) + 1e-12) * ((t * t).sum(-1) + 1e-12))
  torch_ref = torch.nn.CosineEmbeddingLoss()(_torch(s), _torch(t), torch.ones(len(s)))
  actual = losses.cosine_loss(hs, ht, m)
  _close(actual, np.mean(1 - cos))
  _close(actual, torch_ref.item())
  assert np.all(np.isfinite(jax.grad(losses.cosine_loss)(hs, ht, m)))


def test_cosine_loss_hidden_size_mismatch(data):
  with pytest.raises(ValueError, match=r"student 8 and teacher 16: set "
                     r"distill\.project_student_hidden=True to learn a linear projection"):
    losses.cosine_loss(data["hs"][..., :8], data["ht"], data["attention"])


def test_mse_loss(data):
  m = data["attention"]
  s, t = data["s"][m], data["t"][m]
  torch_ref = torch.nn.MSELoss(reduction="sum")(_torch(s), _torch(t)) / len(s)
  actual = losses.mse_loss(data["s"], data["t"], m)
  _close(actual, ((s - t) ** 2).sum() / len(s))
  _close(actual, torch_ref.item())


def test_masked_accuracy_and_agreement(data):
  labels, m = data["labels"], data["attention"]
  valid = labels != losses.IGNORE_INDEX
  s_top = data["s"].argmax(-1)
  labels = np.where(valid & (np.arange(SEQ) % 2 == 0), s_top, labels)  # Make some hits.
  correct, count = losses.masked_accuracy(data["s"], labels)
  assert (correct, count) == ((s_top == labels)[valid].sum(), valid.sum())
  assert 0 < correct < count
  t = np.where(m[..., None] & (np.arange(SEQ) % 3 == 0)[:, None], data["s"], data["t"])
  expected = (s_top == t.argmax(-1))[m].mean()
  assert 0 < expected < 1
  _close(losses.top1_agreement(data["s"], t, m), expected)


def test_nothing_selected_gives_zero(data):
  none = np.zeros((BATCH, SEQ), bool)
  ignored = np.full((BATCH, SEQ), losses.IGNORE_INDEX)
  fns = {
      "kd": lambda s: losses.kd_loss(s, data["t"], none, 2.0),
      "mse": lambda s: losses.mse_loss(s, data["t"], none),
      "mlm": lambda s: losses.mlm_loss(s, ignored),
      "cos": lambda h: losses.cosine_loss(h, data["ht"], none),
  }
  for name, fn in fns.items():
    x = data["hs"] if name == "cos" else data["s"]
    value, grad = jax.value_and_grad(fn)(x)
    assert value == 0.0, name
    assert not np.any(grad), name
  assert losses.masked_accuracy(data["s"], ignored) == (0.0, 0.0)
  assert losses.top1_agreement(data["s"], data["t"], none) == 0.0


def _call(data, weights, teacher_logits=None):
  student = losses.Outputs(data["s"], data["hs"])
  t = data["t"] if teacher_logits is None else teacher_logits
  teacher = losses.Outputs(t, data["ht"])
  return losses.distillation_loss(student, teacher, data["labels"], data["attention"],
                                  data["attention"], weights)


def test_distillation_loss_is_the_weighted_sum(data):
  weights = losses.LossWeights(temperature=3.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0,
                               alpha_mse=0.5)
  m = data["attention"]
  parts = {
      "loss_ce": losses.kd_loss(data["s"], data["t"], m, 3.0),
      "loss_mlm": losses.mlm_loss(data["s"], data["labels"]),
      "loss_cos": losses.cosine_loss(data["hs"], data["ht"], m),
      "loss_mse": losses.mse_loss(data["s"], data["t"], m),
  }
  total, metrics = jax.jit(lambda w: _call(data, w))(weights)
  expected = 5 * parts["loss_ce"] + 2 * parts["loss_mlm"] + parts["loss_cos"] + 0.5 * parts[
      "loss_mse"]
  _close(total, expected)
  assert metrics.keys() == {"loss", *parts, "student_correct", "teacher_correct", "labeled"}
  labeled = data["labels"] != losses.IGNORE_INDEX
  _close(metrics["labeled"], labeled.sum())
  _close(metrics["student_correct"], losses.masked_accuracy(data["s"], data["labels"])[0])
  _close(metrics["teacher_correct"], losses.masked_accuracy(data["t"], data["labels"])[0])
  _close(metrics["loss"], total)
  for name, value in parts.items():
    _close(metrics[name], value)


def test_distillation_loss_on_gathered_positions(data):
  # Logits gathered at the labelled positions ([batch, k], padded) give the same losses as all
  # positions with the labels as the logits mask; the hidden states keep the attention mask.
  valid = data["labels"] != losses.IGNORE_INDEX
  k = valid.sum(1).max()
  idx = np.stack([np.pad(np.flatnonzero(row), (0, k - row.sum())) for row in valid])
  gathered_valid = np.arange(k) < valid.sum(1)[:, None]
  gather = lambda x: np.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)
  gathered_labels = np.where(gathered_valid, gather(data["labels"]), losses.IGNORE_INDEX)
  weights = losses.LossWeights(alpha_mse=0.5)
  total, _ = losses.distillation_loss(
      losses.Outputs(gather(data["s"]), data["hs"]), losses.Outputs(gather(data["t"]), data["ht"]),
      gathered_labels, gathered_valid, data["attention"], weights)
  expected, _ = losses.distillation_loss(
      losses.Outputs(data["s"], data["hs"]), losses.Outputs(data["t"], data["ht"]),
      data["labels"], valid, data["attention"], weights)
  assert k < SEQ
  _close(total, expected)


def test_distillation_loss_without_teacher_is_weighted_mlm(data):
  total, metrics = losses.distillation_loss(
      losses.Outputs(data["s"]), None, data["labels"], data["attention"], data["attention"],
      losses.LossWeights(alpha_mlm=3.0))
  _close(metrics["loss_mlm"], losses.mlm_loss(data["s"], data["labels"]))
  _close(total, 3.0 * metrics["loss_mlm"])
  assert sorted(metrics) == ["labeled", "loss", "loss_mlm", "student_correct"]


def test_alpha_ce_zero_ignores_the_teacher_logits(data):
  weights = losses.LossWeights(alpha_ce=0.0)
  total, _ = _call(data, weights)
  other_total, _ = _call(data, weights, teacher_logits=data["t"][::-1] * 10)
  rest = 2.0 * losses.mlm_loss(data["s"], data["labels"]) + losses.cosine_loss(
      data["hs"], data["ht"], data["attention"])
  _close(total, rest)
  _close(other_total, rest)
  grad = jax.grad(lambda s: _call({**data, "s": s}, weights)[0])(data["s"])
  mlm_grad = jax.grad(lambda s: 2.0 * losses.mlm_loss(s, data["labels"]))(data["s"])
  _close(grad, mlm_grad)


def test_vmap_over_weights_equals_separate_calls(data):
  sweep = [losses.LossWeights(temperature=t, alpha_ce=a) for t, a in
           [(1.0, 5.0), (2.0, 0.0), (4.0, 3.0)]]
  stacked = jax.tree.map(lambda *x: jnp.array(x, jnp.float32), *sweep)
  totals, metrics = jax.jit(jax.vmap(lambda w: _call(data, w)))(stacked)
  for i, weights in enumerate(sweep):
    total, parts = _call(data, weights)
    _close(totals[i], total)
    _close(metrics["loss_ce"][i], parts["loss_ce"])


def test_bf16_logits_are_computed_in_fp32(data):
  m = data["attention"]
  fns = {
      "kd": lambda s, t: losses.kd_loss(s, t, m, 2.0),
      "mse": lambda s, t: losses.mse_loss(s, t, m),
      "mlm": lambda s, t: losses.mlm_loss(s, data["labels"]),
      "cos": lambda s, t: losses.cosine_loss(s, t, m),
  }
  s16, t16 = jnp.asarray(data["s"], jnp.bfloat16), jnp.asarray(data["t"], jnp.bfloat16)
  for name, fn in fns.items():
    value = fn(s16, t16)
    assert value.dtype == jnp.float32, name
    # The fp32 loss of the rounded inputs, and close to that of the unrounded ones.
    _close(value, fn(s16.astype(jnp.float32), t16.astype(jnp.float32)), tol=1e-6)
    _close(value, fn(data["s"], data["t"]), tol=1e-2)


@pytest.mark.parametrize("num_labels", [1, 3])
def test_classification_loss_is_torchs_over_the_weighted_rows(num_labels):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(8, num_labels)).astype(np.float32)
  labels = (rng.normal(size=8) if num_labels == 1 else rng.integers(0, 3, 8)).astype(
      np.float32 if num_labels == 1 else np.int32)
  weight = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
  if num_labels == 1:  # HF's regression: MSELoss on the squeezed logits.
    expected = torch.nn.functional.mse_loss(torch.tensor(logits[weight, 0]),
                                            torch.tensor(labels[weight]))
  else:
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits[weight]),
                                                 torch.tensor(labels[weight]).long())
  np.testing.assert_allclose(losses.classification_loss(logits, labels, weight),
                             expected.item(), rtol=1e-6)
  if num_labels > 1:
    hits = (logits.argmax(-1) == labels)[weight]
    assert float(losses.classification_accuracy(logits, labels, weight)) == pytest.approx(
        hits.mean(), rel=1e-6)


@pytest.mark.parametrize("chunk", [0, 3, 4, SEQ, "kernel"])
def test_lazy_logits_in_chunks_equal_the_logits_at_once(data, chunk):
  """The logits as features times an embedding plus a bias, made `chunk` positions at a time (or
  by `logit_kernel`'s kernels, under Pallas' interpreter): the same losses, counts and
  gradients (of the features, the embedding and the bias) as the logits given."""
  rng = np.random.default_rng(5)
  vocab, dim = data["s"].shape[-1], 6
  features = {name: rng.normal(size=(*data[name].shape[:2], dim)).astype(np.float32)
              for name in ("s", "t")}
  decoder = (rng.normal(size=(vocab, dim)).astype(np.float32),
             rng.normal(size=vocab).astype(np.float32))
  weights = losses.LossWeights(temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0,
                               alpha_mse=0.5)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])

  def run(lazy_chunk, features_s, embedding, bias):
    student = losses.LazyLogits(features_s, embedding, bias)
    teacher = losses.LazyLogits(jnp.asarray(features["t"]), *decoder)
    if lazy_chunk is None:
      student, teacher = student.project(student.features), teacher.project(teacher.features)
    return losses.distillation_loss(
        losses.Outputs(student, data["hs"]), losses.Outputs(teacher, data["ht"]),
        data["labels"], data["attention"], data["attention"], weights,
        chunk=0 if lazy_chunk == "kernel" else lazy_chunk or 0,
        kernel_mesh=mesh if lazy_chunk == "kernel" else None)

  grad = lambda c: jax.grad(lambda *args: run(c, *args)[0], argnums=(0, 1, 2))(features["s"],
                                                                              *decoder)
  (total, metrics) = run(None, features["s"], *decoder)
  with pltpu.force_tpu_interpret_mode():
    (lazy_total, lazy_metrics), lazy_grads = run(chunk, features["s"], *decoder), grad(chunk)
  _close(lazy_total, total)
  for name, value in metrics.items():
    _close(lazy_metrics[name], value)
  for ours, theirs in zip(lazy_grads, grad(None), strict=True):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
