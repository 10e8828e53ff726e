"""The vocabulary projection and the softmax terms that read it, in TPU kernels, over a mesh.

Made by XLA, each model's [positions, vocab] logits are written to HBM and read back by every
reduction over them (the log-softmax statistics, L_ce, L_mlm, the argmaxes) and by the backward
pass: the largest traffic of a step after the attention (docs/tpu.md). `logit_terms` makes a
block of positions' logits one block of the vocabulary at a time in VMEM, for the student and
the teacher together, and keeps only running statistics per position (an online softmax): no
logits reach HBM. The backward pass makes each block's logits again, in two kernels: one sums the
features' gradient over the vocabulary, the other the embedding's (and the bias') over the
positions. Off a TPU it runs only under Pallas' interpreter (`pltpu.force_tpu_interpret_mode`).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distil_jax import sharding

_LANES = 128
_MASKED = float(jnp.finfo(jnp.float32).min)
_NO_INDEX = 2.0**30  # Above any vocabulary index: the first argmax is a minimum of indices.

# Lanes of the per-position tile that goes in: the label and the temperature, then (backward)
# the three terms' gradients and the forward's log-sum-exps.
_LABEL, _TEMPERATURE, _D_NLL, _D_KD, _D_MSE, _LSE, _LSE_T, _TEACHER_LSE_T = range(8)
# Lanes of the tile that comes out: the terms, the argmaxes, and the log-sum-exps again.
TERMS = ("nll", "student_argmax", "kd", "teacher_argmax", "mse")
_OUT_LSE = len(TERMS)
# Running statistics per position, in a VMEM scratch.
(_MAX, _SUM, _SUM_T, _LABEL_LOGIT, _ARGMAX, _TEACHER_MAX, _TEACHER_SUM_T, _CROSS,
 _TEACHER_ARGMAX, _SQUARES) = range(10)


class Projection(NamedTuple):
  """A model's MLM projection: logits = features @ embedding^T (float32 sums) + bias."""
  features: jax.Array  # [batch, k, dim], the compute dtype.
  embedding: jax.Array  # [vocab, dim], the compute dtype.
  bias: jax.Array  # [vocab].


class Blocks(NamedTuple):
  """Block sizes: positions x vocabulary for the forward and the features' gradient (the
  embedding streamed once per block of positions), vocabulary x positions for the embedding's
  gradient (the features streamed once per block of the vocabulary); and the VMEM they may use.
  The defaults fit a core of 128 MiB of VMEM (v6e)."""
  positions: int = 2048
  vocab: int = 512
  embedding_vocab: int = 2048
  embedding_positions: int = 512
  vmem_bytes: int = 64 * 2**20


DEFAULT_BLOCKS = Blocks()


def pays_on(mesh: Mesh) -> bool:
  """Whether the kernels lower the bert_base step's roofline bound on the mesh's chips, by XLA's
  count (docs/tpu.md): on v6e only. They make 8 vocabulary products per micro-batch where XLA
  makes 4, which costs more than the bytes they save on a chip bound by its FLOPs (v5e, v5p), and
  a v4's 16 MiB of VMEM per core holds blocks too small to save bytes (v4-32: 600 -> 640 GB)."""
  return mesh.devices.flat[0].device_kind in ("TPU v6 lite", "TPU v6e")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _logits(features, embedding, bias) -> jax.Array:
  """A block's float32 logits."""
  return jax.lax.dot_general(features, embedding, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32) + bias


def _columns(shape, vocab_block: int, vocab: int) -> tuple[jax.Array, jax.Array]:
  """A logits block's vocabulary indices, and which are real (not padding)."""
  column = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + vocab_block * shape[1]
  return column, column < vocab


def _first_argmax(x, column, block_max) -> jax.Array:
  """The first index of each row's maximum `block_max`, as float32."""
  return jnp.min(jnp.where(x == block_max, column.astype(jnp.float32), _NO_INDEX), axis=1,
                 keepdims=True)


def _forward_kernel(*refs, vocab: int, teacher: bool, with_mse: bool):
  """A block of positions against a block of the vocabulary: updates the running statistics,
  and at the last block of the vocabulary writes the terms (`TERMS`) and log-sum-exps."""
  if teacher:
    position, fs, es, bs, ft, et, bt, out, acc = refs
  else:
    position, fs, es, bs, out, acc = refs
  v = pl.program_id(1)
  shape = (fs.shape[0], es.shape[0])
  get = lambda i: acc[i][:, :1]

  def put(i: int, x: jax.Array):
    acc[i] = jnp.broadcast_to(x, acc.shape[1:])

  @pl.when(v == 0)
  def _():
    for i in range(acc.shape[0]):
      put(i, jnp.full((acc.shape[1], 1), _MASKED if i in (_MAX, _TEACHER_MAX) else 0.0))

  tile = position[...]
  label, temperature = tile[:, _LABEL:_LABEL + 1], tile[:, _TEMPERATURE:_TEMPERATURE + 1]
  column, real = _columns(shape, v, vocab)
  s = jnp.where(real, _logits(fs[...], es[...], bs[...]), _MASKED)
  old, block_max = get(_MAX), jnp.max(s, axis=1, keepdims=True)
  new = jnp.maximum(old, block_max)
  put(_SUM, get(_SUM) * jnp.exp(old - new) + jnp.sum(jnp.exp(s - new), axis=1, keepdims=True))
  put(_SUM_T, get(_SUM_T) * jnp.exp((old - new) / temperature)
      + jnp.sum(jnp.exp((s - new) / temperature), axis=1, keepdims=True))
  put(_ARGMAX, jnp.where(block_max > old, _first_argmax(s, column, block_max), get(_ARGMAX)))
  put(_MAX, new)
  put(_LABEL_LOGIT, get(_LABEL_LOGIT) + jnp.sum(
      jnp.where(column == label.astype(jnp.int32), s, 0.0), axis=1, keepdims=True))
  if teacher:
    t = jnp.where(real, _logits(ft[...], et[...], bt[...]), _MASKED)
    old, block_max = get(_TEACHER_MAX), jnp.max(t, axis=1, keepdims=True)
    new = jnp.maximum(old, block_max)
    decay, weight = jnp.exp((old - new) / temperature), jnp.exp((t - new) / temperature)
    put(_TEACHER_SUM_T, get(_TEACHER_SUM_T) * decay + jnp.sum(weight, axis=1, keepdims=True))
    put(_CROSS, get(_CROSS) * decay + jnp.sum(weight * (t - s), axis=1, keepdims=True))
    put(_TEACHER_ARGMAX, jnp.where(block_max > old, _first_argmax(t, column, block_max),
                                   get(_TEACHER_ARGMAX)))
    put(_TEACHER_MAX, new)
    if with_mse:
      put(_SQUARES, get(_SQUARES) + jnp.sum(jnp.where(real, jnp.square(s - t), 0.0), axis=1,
                                            keepdims=True))

  @pl.when(v == pl.num_programs(1) - 1)
  def _():
    lse = get(_MAX) + jnp.log(get(_SUM))
    lse_t = get(_MAX) / temperature + jnp.log(get(_SUM_T))
    lanes = {0: lse - get(_LABEL_LOGIT), 1: get(_ARGMAX), _OUT_LSE: lse, _OUT_LSE + 1: lse_t}
    if teacher:  # KL = T² (sum p_t (t - s) / T - lse(t / T) + lse(s / T)).
      teacher_lse_t = get(_TEACHER_MAX) / temperature + jnp.log(get(_TEACHER_SUM_T))
      lanes |= {2: temperature * (get(_CROSS) / get(_TEACHER_SUM_T)
                                  - temperature * (teacher_lse_t - lse_t)),
                3: get(_TEACHER_ARGMAX), 4: get(_SQUARES), _OUT_LSE + 2: teacher_lse_t}
    lane = jax.lax.broadcasted_iota(jnp.int32, out.shape, 1)
    out[...] = sum(jnp.where(lane == i, x, 0.0) for i, x in lanes.items())


def _d_logits(position, fs, es, bs, teacher_refs, v: int, vocab: int, with_mse: bool):
  """The gradient of a block's student logits, made again from the features (float32)."""
  tile = position[...]
  lane = lambda i: tile[:, i:i + 1]
  temperature = lane(_TEMPERATURE)
  column, real = _columns((fs.shape[0], es.shape[0]), v, vocab)
  s = _logits(fs[...], es[...], bs[...])
  one_hot = (column == lane(_LABEL).astype(jnp.int32)).astype(jnp.float32)
  ds = lane(_D_NLL) * (jnp.exp(s - lane(_LSE)) - one_hot)
  if teacher_refs:
    t = _logits(*(ref[...] for ref in teacher_refs))
    ds += lane(_D_KD) * temperature * (jnp.exp(s / temperature - lane(_LSE_T))
                                       - jnp.exp(t / temperature - lane(_TEACHER_LSE_T)))
    if with_mse:
      ds += 2.0 * lane(_D_MSE) * (s - t)
  return jnp.where(real, ds, 0.0)


def _features_grad_kernel(*refs, vocab: int, with_mse: bool):
  """A block of positions: the features' gradient summed over the blocks of the vocabulary."""
  position, fs, es, bs, *teacher_refs, d_features, acc = refs
  v = pl.program_id(1)

  @pl.when(v == 0)
  def _():
    acc[...] = jnp.zeros_like(acc)

  ds = _d_logits(position, fs, es, bs, teacher_refs, v, vocab, with_mse)
  acc[...] += jnp.dot(ds.astype(es.dtype), es[...], preferred_element_type=jnp.float32)

  @pl.when(v == pl.num_programs(1) - 1)
  def _():
    d_features[...] = acc[...].astype(d_features.dtype)


def _embedding_grad_kernel(*refs, vocab: int, with_mse: bool):
  """A block of the vocabulary: the embedding's and the bias' gradients summed over the blocks
  of positions."""
  position, fs, es, bs, *teacher_refs, d_embedding, d_bias, acc, acc_bias = refs
  p = pl.program_id(1)

  @pl.when(p == 0)
  def _():
    acc[...] = jnp.zeros_like(acc)
    acc_bias[...] = jnp.zeros_like(acc_bias)

  ds = _d_logits(position, fs, es, bs, teacher_refs, pl.program_id(0), vocab, with_mse)
  acc[...] += jnp.dot(ds.astype(fs.dtype).T, fs[...], preferred_element_type=jnp.float32)
  acc_bias[...] += jnp.sum(ds, axis=0, keepdims=True)

  @pl.when(p == pl.num_programs(1) - 1)
  def _():
    d_embedding[...] = acc[...].astype(d_embedding.dtype)
    d_bias[...] = acc_bias[...].astype(d_bias.dtype)


def _specs(dim: int, rows: int, columns: int, positions_first: bool, teacher: bool) -> list:
  """Block specs of (position tile, features, embedding, bias) for each model: a block of `rows`
  positions and one of `columns` of the vocabulary, the grid's first axis over positions or
  over the vocabulary."""
  order = (lambda i, j: (i, j)) if positions_first else (lambda i, j: (j, i))
  position = pl.BlockSpec((rows, _LANES), lambda i, j: (order(i, j)[0], 0))
  features = pl.BlockSpec((rows, dim), lambda i, j: (order(i, j)[0], 0))
  embedding = pl.BlockSpec((columns, dim), lambda i, j: (order(i, j)[1], 0))
  bias = pl.BlockSpec((1, columns), lambda i, j: (0, order(i, j)[1]))
  return [position, features, embedding, bias] + [features, embedding, bias] * teacher


def _cost(n: int, dim: int, vocab: int, matmuls: int, streamed: int, itemsize: int
          ) -> pl.CostEstimate:
  """FLOPs of `matmuls` [n, vocab, dim] products, an exponential per logit and model, and bytes
  of `streamed` bytes plus the position tiles and features read once."""
  return pl.CostEstimate(flops=2 * matmuls * n * vocab * dim, transcendentals=2 * n * vocab,
                         bytes_accessed=streamed + n * (2 * _LANES * 4 + 2 * dim * itemsize))


def _params(blocks: Blocks) -> pltpu.CompilerParams:
  """A grid of a parallel axis, then the one its kernel sums over."""
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                              vmem_limit_bytes=blocks.vmem_bytes)


def _position_grid(models, blocks: Blocks) -> tuple[tuple[int, int], int]:
  """The grid of the forward and features' gradient kernels (blocks of positions, then of the
  vocabulary), and the bytes of the embeddings, which they stream once per block of positions."""
  fs, es, _ = models[0]
  grid = (fs.shape[0] // blocks.positions, es.shape[0] // blocks.vocab)
  return grid, sum(m[1].size * m[1].dtype.itemsize for m in models)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _terms(position, models, vocab: int, with_mse: bool, blocks: Blocks) -> jax.Array:
  """The [n, 128] output tile (`TERMS`, then the log-sum-exps) of flattened positions; `models`
  is the student's (features, padded embedding, bias [1, padded vocab]) and maybe the
  teacher's."""
  teacher = len(models) > 1
  fs, es, _ = models[0]
  n, dim = fs.shape
  grid, weights = _position_grid(models, blocks)
  return pl.pallas_call(
      functools.partial(_forward_kernel, vocab=vocab, teacher=teacher, with_mse=with_mse),
      out_shape=jax.ShapeDtypeStruct((n, _LANES), jnp.float32), grid=grid,
      in_specs=_specs(dim, blocks.positions, blocks.vocab, True, teacher),
      out_specs=pl.BlockSpec((blocks.positions, _LANES), lambda i, j: (i, 0)),
      scratch_shapes=[pltpu.VMEM((10, blocks.positions, _LANES), jnp.float32)],
      compiler_params=_params(blocks),
      cost_estimate=_cost(n, dim, es.shape[0], len(models), grid[0] * weights, fs.dtype.itemsize),
  )(position, *(x for m in models for x in m))


def _terms_forward(position, models, vocab, with_mse, blocks):
  out = _terms(position, models, vocab, with_mse, blocks)
  return out, (position, models, out)


def _terms_backward(vocab, with_mse, blocks, residuals, d_out):
  position, models, out = residuals
  teacher = len(models) > 1
  fs, es, bs = models[0]
  n, dim = fs.shape
  for lane, source in [(_D_NLL, 0), (_D_KD, 2), (_D_MSE, 4)]:
    position = position.at[:, lane].set(d_out[:, source])
  for i, lane in enumerate([_LSE, _LSE_T, _TEACHER_LSE_T]):
    position = position.at[:, lane].set(out[:, _OUT_LSE + i])
  inputs = (position, *(x for m in models for x in m))
  kernel_args = dict(vocab=vocab, with_mse=with_mse)
  matmuls = len(models) + 1  # The logits made again, and the gradient's product.
  grid, weights = _position_grid(models, blocks)
  d_features = pl.pallas_call(
      functools.partial(_features_grad_kernel, **kernel_args),
      out_shape=jax.ShapeDtypeStruct(fs.shape, fs.dtype), grid=grid,
      in_specs=_specs(dim, blocks.positions, blocks.vocab, True, teacher),
      out_specs=pl.BlockSpec((blocks.positions, dim), lambda i, j: (i, 0)),
      scratch_shapes=[pltpu.VMEM((blocks.positions, dim), jnp.float32)],
      compiler_params=_params(blocks),
      cost_estimate=_cost(n, dim, es.shape[0], matmuls, grid[0] * weights, fs.dtype.itemsize),
  )(*inputs)
  streamed = es.shape[0] // blocks.embedding_vocab * n * (
      _LANES * 4 + len(models) * dim * fs.dtype.itemsize)
  d_embedding, d_bias = pl.pallas_call(
      functools.partial(_embedding_grad_kernel, **kernel_args),
      out_shape=(jax.ShapeDtypeStruct(es.shape, es.dtype), jax.ShapeDtypeStruct(bs.shape,
                                                                                jnp.float32)),
      grid=(es.shape[0] // blocks.embedding_vocab, n // blocks.embedding_positions),
      in_specs=_specs(dim, blocks.embedding_positions, blocks.embedding_vocab, False, teacher),
      out_specs=(pl.BlockSpec((blocks.embedding_vocab, dim), lambda i, j: (i, 0)),
                 pl.BlockSpec((1, blocks.embedding_vocab), lambda i, j: (0, i))),
      scratch_shapes=[pltpu.VMEM((blocks.embedding_vocab, dim), jnp.float32),
                      pltpu.VMEM((1, blocks.embedding_vocab), jnp.float32)],
      compiler_params=_params(blocks),
      cost_estimate=_cost(n, dim, es.shape[0], matmuls, streamed + weights, fs.dtype.itemsize),
  )(*inputs)
  no_teacher_grads = [(None, None, None)] * (len(models) - 1)
  return None, [(d_features, d_embedding, d_bias.astype(bs.dtype)), *no_teacher_grads]


_terms.defvjp(_terms_forward, _terms_backward)


def logit_terms(student: Projection, teacher: Projection | None, labels: jax.Array,
                temperature: jax.Array | float, mesh: Mesh, with_mse: bool = True,
                blocks: Blocks = DEFAULT_BLOCKS) -> dict[str, jax.Array]:
  """Per position ([batch, k], float32) of the logits `student` and `teacher` project: "nll"
  (the cross-entropy of `labels`, int in [0, vocab)) and "student_argmax"; with a teacher "kd"
  (KL(softmax(t / T) || softmax(s / T)) * T²), "teacher_argmax" and, `with_mse`, "mse" (the
  squared error summed over the vocabulary). Only the student's features, embedding and bias
  get gradients. Rows shard over the mesh's data-parallel axes; the first argmax is taken."""
  vocab = student.embedding.shape[0]
  batch, k = labels.shape
  padded_vocab = _round_up(vocab, max(blocks.vocab, blocks.embedding_vocab))

  def weights(m: Projection):
    pad = padded_vocab - vocab
    return (jnp.pad(m.embedding, ((0, pad), (0, 0))),
            jnp.pad(m.bias.astype(jnp.float32), (0, pad))[None])

  position = jnp.zeros((batch, k, _LANES), jnp.float32)
  position = position.at[..., _LABEL].set(labels.astype(jnp.float32))
  position = position.at[..., _TEMPERATURE].set(jnp.asarray(temperature, jnp.float32))

  def local(position, features, shared):
    rows = position.shape[0] * k
    n = _round_up(rows, max(blocks.positions, blocks.embedding_positions))
    # Padding positions repeat the last one (a temperature of 0 would make NaNs of no use).
    flat = lambda x: jnp.pad(x.reshape(rows, x.shape[-1]), ((0, n - rows), (0, 0)), mode="edge")
    out = _terms(flat(position), [(flat(f), *w) for f, w in zip(features, shared, strict=True)],
                 vocab, with_mse, blocks)
    return out[:rows].reshape(position.shape)

  models = [student] + ([jax.tree.map(jax.lax.stop_gradient, teacher)] if teacher else [])
  rows = P(sharding.BATCH_AXES)
  out = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P()), out_specs=rows,
                      check_vma=False)(position, [m.features.astype(m.embedding.dtype)
                                                  for m in models],
                                       [weights(m) for m in models])
  names = TERMS if teacher is not None else TERMS[:2]
  return {name: out[..., i] for i, name in enumerate(names) if name != "mse" or with_mse}
