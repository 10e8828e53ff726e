"""Distillation losses of DistilBERT (Sanh et al., 2019; arXiv 1910.01108).

Pure functions of arrays, computed in float32 whatever the input dtype. Hyper-parameters may be
Python floats or (traced) jax scalars, so the whole step can be vmapped over a sweep of them.
Masks select the positions a loss averages over; selecting none gives 0, not NaN.

The terms that read the logits (L_ce, L_mlm, L_mse, the accuracies) are sums over positions
(`logit_sums`): given `LazyLogits` they are computed a chunk of positions at a time, each chunk's
float32 logits recomputed in the backward pass, or on a TPU in the kernels of
`distil_jax.logit_kernel`, so that no [batch, positions, vocab] array of either model is ever
stored whole.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.typing import ArrayLike

from distil_jax import errors, logit_kernel

IGNORE_INDEX = -100  # Label of the positions the MLM loss skips, as in PyTorch.


class LossWeights(NamedTuple):
  """Softmax temperature and loss weights; the defaults are the original recipe's."""
  temperature: ArrayLike = 2.0
  alpha_ce: ArrayLike = 5.0
  alpha_mlm: ArrayLike = 2.0
  alpha_cos: ArrayLike = 1.0
  alpha_mse: ArrayLike = 0.0


DEFAULT_WEIGHTS = LossWeights()


class LazyLogits(NamedTuple):
  """Logits not computed yet: those of the MLM head's features, `project(features)`."""
  features: jax.Array  # [batch, k, dim]: the MLM head's input to its vocabulary projection.
  embedding: jax.Array  # [vocab, dim]: the tied decoder, in the compute dtype.
  bias: jax.Array  # [vocab].

  def project(self, features: jax.Array) -> jax.Array:
    """Float32 logits of `features` ([batch, n, dim]), as the MLM head computes them."""
    logits = jnp.dot(features.astype(self.embedding.dtype), self.embedding.T)
    return logits.astype(jnp.float32) + self.bias.astype(jnp.float32)


class Outputs(NamedTuple):
  """What the losses need from one model's forward pass."""
  logits: jax.Array | LazyLogits  # [batch, k, vocab]: at all positions (k = seq) or gathered.
  hidden: jax.Array | None = None  # [batch, seq, dim]: last hidden states.


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` over the entries where `mask` is true; 0 when there are none."""
  mask = mask.astype(bool)
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
            temperature: ArrayLike) -> jax.Array:
  """KL(softmax(t / T) || softmax(s / T)) * T², averaged over the positions where `mask` is true.

  Equals `KLDivLoss(reduction="batchmean")(log_softmax(s / T), softmax(t / T)) * T**2` on the
  selected rows. The teacher side carries no gradient.
  """
  return _masked_mean(_kd_terms(student_logits, teacher_logits, temperature), mask)


def _kd_terms(student_logits: jax.Array, teacher_logits: jax.Array, temperature: ArrayLike
              ) -> jax.Array:
  """KL(softmax(t / T) || softmax(s / T)) * T² at each position."""
  student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  teacher_logp = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature)
  kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)
  return kl * temperature**2


def mlm_loss(student_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over the positions whose label is not `IGNORE_INDEX`."""
  return _masked_mean(_nll_terms(student_logits, labels), labels != IGNORE_INDEX)


def _nll_terms(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of the label at each position (of label 0 where there is none).

  The label's logit is picked by comparison, not gathered: vmapped over fused runs, a gather's
  gradient is a scatter into the whole logits that XLA on TPU copies between layouts (about
  16 GB per micro-batch of 4 bert_base runs on a v4-32 chip)."""
  logits = logits.astype(jnp.float32)
  picked = jnp.arange(logits.shape[-1]) == jnp.where(labels != IGNORE_INDEX, labels, 0)[..., None]
  return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(picked, logits, 0.0), axis=-1)


def cosine_loss(student_hidden: jax.Array, teacher_hidden: jax.Array, mask: jax.Array,
                eps: float = 1e-12) -> jax.Array:
  """Mean of 1 - cos(h_s, h_t) over the positions where `mask` is true.

  Equals `CosineEmbeddingLoss()` with target 1 on the selected rows, including its `eps` added to
  the squared norms, which keeps zero vectors (and their gradients) finite.
  """
  if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
    raise errors.ConfigError(
        f"cosine loss needs equal hidden sizes, got student {student_hidden.shape[-1]} and "
        f"teacher {teacher_hidden.shape[-1]}: set distill.project_student_hidden=True to learn "
        "a linear projection")
  s = student_hidden.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32)
  norms = jnp.sqrt((jnp.sum(s * s, axis=-1) + eps) * (jnp.sum(t * t, axis=-1) + eps))
  return _masked_mean(1.0 - jnp.sum(s * t, axis=-1) / norms, mask)


def mse_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Squared error summed over the vocabulary, averaged over the positions where `mask` is true.

  Equals `MSELoss(reduction="sum")(s, t) / s.size(0)` on the selected rows.
  """
  return _masked_mean(_mse_terms(student_logits, teacher_logits), mask)


def _mse_terms(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  diff = student_logits.astype(jnp.float32) - jax.lax.stop_gradient(teacher_logits).astype(
      jnp.float32)
  return jnp.sum(diff * diff, axis=-1)


def _hits(predicted: jax.Array, targets: jax.Array, mask: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
  """Number of positions where `mask` is true and predicted == targets, and of positions."""
  mask = mask.astype(bool)
  hits = jnp.sum(mask & (predicted == targets))
  return hits.astype(jnp.float32), jnp.sum(mask).astype(jnp.float32)


def masked_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Top-1 (correct, count) over the positions whose label is not `IGNORE_INDEX`.

  Counts rather than a mean, so that evaluation can sum them over batches.
  """
  return _hits(jnp.argmax(logits, axis=-1), labels, labels != IGNORE_INDEX)


def top1_agreement(student_logits: jax.Array, teacher_logits: jax.Array,
                   mask: jax.Array) -> jax.Array:
  """Fraction of the positions where `mask` is true at which the two argmaxes agree; 0 if none."""
  hits, count = _hits(jnp.argmax(student_logits, axis=-1), jnp.argmax(teacher_logits, axis=-1),
                      mask)
  return hits / jnp.maximum(count, 1.0)


def classification_loss(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer `labels` over the rows where `weight` is true, as HF's
  `*ForSequenceClassification`; with one logit per row, the mean squared error (a regression)."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    per_row = jnp.square(logits[..., 0] - labels.astype(jnp.float32))
  else:
    per_row = _nll_terms(logits, labels.astype(jnp.int32))
  return _masked_mean(per_row, weight)


def classification_accuracy(logits: jax.Array, labels: jax.Array, weight: jax.Array
                            ) -> jax.Array:
  """Fraction of the rows where `weight` is true whose argmax is the label; 0 if none."""
  hits, count = _hits(jnp.argmax(logits, axis=-1), labels, weight)
  return hits / jnp.maximum(count, 1.0)


def _position_terms(student: jax.Array, teacher: jax.Array | None, labels: jax.Array,
                    temperature: ArrayLike, with_mse: bool) -> dict[str, jax.Array]:
  """The terms at each position, as `logit_kernel.logit_terms` gives them, from the logits."""
  terms = {"nll": _nll_terms(student, labels), "student_argmax": jnp.argmax(student, axis=-1)}
  if teacher is not None:
    terms |= {"kd": _kd_terms(student, teacher, temperature),
              "teacher_argmax": jnp.argmax(teacher, axis=-1)}
    if with_mse:
      terms["mse"] = _mse_terms(student, teacher)
  return terms


def _summed(terms: dict[str, jax.Array], labels: jax.Array, mask: jax.Array
            ) -> dict[str, jax.Array]:
  """`logit_sums` from the terms at each position."""
  labeled = labels != IGNORE_INDEX
  total = lambda name, where: jnp.sum(jnp.where(where, terms[name], 0.0))
  student_correct, labeled_count = _hits(terms["student_argmax"], labels, labeled)
  out = {"mlm": total("nll", labeled), "student_correct": student_correct,
         "labeled": labeled_count}
  if "kd" in terms:
    out |= {"ce": total("kd", mask),
            "teacher_correct": _hits(terms["teacher_argmax"], labels, labeled)[0]}
  if "mse" in terms:
    out["mse"] = total("mse", mask)
  return out


def logit_sums(student_logits: jax.Array | LazyLogits,
               teacher_logits: jax.Array | LazyLogits | None, labels: jax.Array,
               mask: jax.Array, temperature: ArrayLike, with_mse: bool = True, chunk: int = 0,
               kernel_mesh: Mesh | None = None) -> dict[str, jax.Array]:
  """Sums over positions of the terms that read the logits: "mlm" (the labels' cross-entropy),
  "student_correct" and "labeled" (top-1 hits, labels); with a teacher "ce" and "mse" (over the
  positions where `mask` is true) and "teacher_correct".

  Given `LazyLogits`, the logits are made in the TPU kernels of `logit_kernel` over
  `kernel_mesh` if one is given, else `chunk` positions at a time (all at once for 0), each
  chunk's recomputed in the backward pass rather than stored.
  """
  mask = mask.astype(bool)
  sums = lambda student, teacher, labels, mask: _summed(_position_terms(
      student, teacher, labels, temperature, with_mse), labels, mask)
  if not isinstance(student_logits, LazyLogits):
    return sums(student_logits, teacher_logits, labels, mask)
  if kernel_mesh is not None:
    projection = lambda z: None if z is None else logit_kernel.Projection(*z)
    terms = logit_kernel.logit_terms(
        projection(student_logits), projection(teacher_logits),
        jnp.where(labels != IGNORE_INDEX, labels, 0), temperature, kernel_mesh, with_mse)
    return _summed(terms, labels, mask)
  lazy = [student_logits] + ([teacher_logits] if teacher_logits is not None else [])
  k = labels.shape[1]
  size = chunk or k
  pad = -k % size
  cut = lambda x, fill: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2),
                                             constant_values=fill).reshape(
      x.shape[0], (k + pad) // size, size, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk_sums(labels, mask, *features):
    logits = [z.project(f) for z, f in zip(lazy, features, strict=True)]
    return sums(logits[0], logits[1] if len(logits) > 1 else None, labels, mask)

  chunks = jax.lax.map(lambda xs: chunk_sums(*xs), (
      cut(labels, IGNORE_INDEX), cut(mask, False),
      *(cut(z.features, 0) for z in lazy)))
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), chunks)


def distillation_loss(student: Outputs, teacher: Outputs | None, labels: jax.Array,
                      logits_mask: jax.Array, hidden_mask: jax.Array,
                      weights: LossWeights = DEFAULT_WEIGHTS, with_mse: bool = True,
                      chunk: int = 0, kernel_mesh: Mesh | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """alpha_ce * L_ce + alpha_mlm * L_mlm + alpha_cos * L_cos + alpha_mse * L_mse, and its parts.

  Args:
    student: student outputs; `hidden` is only needed with a teacher.
    teacher: teacher outputs at the same positions, or None for MLM-only training, where the
      total is alpha_mlm * L_mlm.
    labels: [batch, k] MLM labels at the logits' positions, `IGNORE_INDEX` where not predicted.
    logits_mask: [batch, k] positions of the logits that L_ce and L_mse average over (the
      attention mask, or the validity of gathered positions).
    hidden_mask: [batch, seq] positions of the hidden states that L_cos averages over (the
      attention mask).
    weights: temperature and alphas; leaves may be jax scalars.
    with_mse: False leaves L_mse out, neither computed nor in the metrics: for when alpha_mse is
      0 (as the original does), since a traced weight of 0 would not spare its work.
    chunk: positions whose logits are made at a time, for `LazyLogits` (`logit_sums`).
    kernel_mesh: a TPU mesh on which `logit_sums` makes `LazyLogits` in its kernels.

  Returns:
    (total, metrics) where metrics holds the total ("loss"), every part ("loss_ce", ...), and
    the counts of `logit_sums` ("student_correct", "teacher_correct", "labeled").
  """
  sums = logit_sums(student.logits, teacher.logits if teacher else None, labels, logits_mask,
                    weights.temperature, with_mse and teacher is not None, chunk, kernel_mesh)
  mean = lambda total, count: total / jnp.maximum(count, 1.0)
  counts = {k: sums.pop(k) for k in ("student_correct", "teacher_correct", "labeled")
            if k in sums}
  parts = {"loss_mlm": mean(sums["mlm"], counts["labeled"])}
  if teacher is not None:
    positions = jnp.sum(logits_mask.astype(bool)).astype(jnp.float32)
    parts["loss_ce"] = mean(sums["ce"], positions)
    parts["loss_cos"] = cosine_loss(student.hidden, teacher.hidden, hidden_mask)
    if with_mse:
      parts["loss_mse"] = mean(sums["mse"], positions)
  total = sum(getattr(weights, name.replace("loss", "alpha")) * value
              for name, value in parts.items())
  return total, {"loss": total, **parts, **counts}
