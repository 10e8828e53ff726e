"""Attention in one TPU kernel: within segments, with dropout, over a device mesh.

`models.SelfAttention` computes softmax(q k^T / sqrt(d)) v with XLA, which writes the scores and
the probabilities ([batch, heads, len, len]) to HBM and reads them back, the largest traffic of a
step at 512 tokens (docs/tpu.md). `flash_attention` does it in VMEM instead: a Pallas kernel per
block of queries against all the row's keys, so the scores never leave the chip's VMEM, each
device on its own rows and heads. Attention dropout is drawn inside the kernel from a counter
hash of (seed, row, head, query, key) (`dropout_keep`), so the backward kernel redraws the same
mask instead of reading it, and the mask does not depend on how the mesh splits rows and heads.
Off a TPU it runs only under Pallas' interpreter (`pltpu.force_tpu_interpret_mode`), as tests do.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distil_jax import sharding

_LANES, _SUBLANES = 128, 8
_MAX_BLOCK = 512  # Query positions per block at most: a block's scores are [block, len] float32.
_MASKED = float(jnp.finfo(jnp.float32).min)


def fits_blocks(length: int) -> bool:
  """Whether rows of `length` positions split into the kernel's blocks (of lanes)."""
  return length % _LANES == 0


def attends(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
  """Whether a query attends to a key, by their segment ids (broadcast against each other): a
  real query to the keys of its segment, a padding query (0) to every real key."""
  return (key_segments > 0) & ((query_segments == key_segments) | (query_segments == 0))


def _block(length: int) -> int:
  """Query positions per block: the whole row up to `_MAX_BLOCK` (then the segment ids and the
  keys are read once per row), else the largest multiple of 128 that divides it."""
  return max(b for b in range(_LANES, _MAX_BLOCK + 1, _LANES) if length % b == 0)


def _int32(value: int) -> np.int32:
  return np.uint32(value).view(np.int32)


def _mix(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (Wellons' lowbias32) on int32 lanes, wrapping."""
  shift = jax.lax.shift_right_logical
  x = (x ^ shift(x, 16)) * _int32(0x7FEB352D)
  x = (x ^ shift(x, 15)) * _int32(0x846CA68B)
  return x ^ shift(x, 16)


def dropout_key(seed: jax.Array, cell: jax.Array) -> jax.Array:
  """The dropout key of `cell` (row * heads + head) for the int32 `seed`."""
  return _mix(seed + _mix(cell))


def dropout_keep(key: jax.Array, index: jax.Array, rate: float) -> jax.Array:
  """Whether dropout keeps attention probability `index` (query * length + key position) of the
  cell of `key` (`dropout_key`): two rounds of `_mix` keyed by it."""
  bits = _mix(_mix(index ^ key) ^ (key + _int32(0x9E3779B9)))
  return jax.lax.shift_right_logical(bits, 1) >= round(rate * 2**31)


def _probabilities(q, k, seg_q, seg_k, key, scale: float, rate: float):
  """Softmax of a block's scores within segments (float32, [block, len]) and, with `rate`, the
  dropout's keep mask from the cell's `key` tile."""
  scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32) * scale
  scores = jnp.where(attends(jnp.tile(seg_q, (1, k.shape[0] // _LANES)), seg_k), scores, _MASKED)
  exp = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  probs = exp / jnp.sum(exp, axis=-1, keepdims=True)
  if not rate:
    return probs, None
  query = jax.lax.broadcasted_iota(jnp.int32, probs.shape, 0) + pl.program_id(2) * len(probs)
  index = query * probs.shape[1] + jax.lax.broadcasted_iota(jnp.int32, probs.shape, 1)
  return probs, dropout_keep(jnp.tile(key[:1], (1, probs.shape[1] // _LANES)), index, rate)


def _dropped(x: jax.Array, kept: jax.Array | None, rate: float) -> jax.Array:
  """`x` where dropout keeps it, scaled by 1 / (1 - rate); 0 elsewhere."""
  return x if not rate else jnp.where(kept, x / (1 - rate), 0.0)


def _forward_kernel(q, k, v, seg_q, seg_k, *refs, scale: float, rate: float):
  """One block of queries: `refs` are (the cell's dropout key tile, with `rate`;) the output."""
  key, out = refs if rate else (None, *refs)
  probs, kept = _probabilities(q[...], k[...], seg_q[...], seg_k[:1], key, scale, rate)
  out[...] = jnp.dot(_dropped(probs, kept, rate).astype(v.dtype), v[...],
                     preferred_element_type=jnp.float32).astype(out.dtype)


def _backward_kernel(q, k, v, seg_q, seg_k, *refs, scale: float, rate: float):
  """One block of queries, the gradients of the keys and values summed over the blocks: `refs`
  are (the key tile;) the output's gradient, the three gradients, and two float32 sums."""
  key, d_out, dq, dk, dv, dk_sum, dv_sum = refs if rate else (None, *refs)
  block = pl.program_id(2)

  @pl.when(block == 0)
  def _():
    dk_sum[...] = jnp.zeros_like(dk_sum)
    dv_sum[...] = jnp.zeros_like(dv_sum)

  q_, k_, v_, d_out_ = q[...], k[...], v[...], d_out[...]
  probs, kept = _probabilities(q_, k_, seg_q[...], seg_k[:1], key, scale, rate)
  dv_sum[...] += jnp.dot(_dropped(probs, kept, rate).astype(d_out_.dtype).T, d_out_,
                         preferred_element_type=jnp.float32)
  d_dropped = jax.lax.dot_general(d_out_, v_, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
  d_probs = _dropped(d_dropped, kept, rate)
  d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True)) * scale
  d_scores = d_scores.astype(q_.dtype)
  dq[...] = jnp.dot(d_scores, k_, preferred_element_type=jnp.float32).astype(dq.dtype)
  dk_sum[...] += jnp.dot(d_scores.T, q_, preferred_element_type=jnp.float32)

  @pl.when(block == pl.num_programs(2) - 1)
  def _():
    dk[...] = dk_sum[...].astype(dk.dtype)
    dv[...] = dv_sum[...].astype(dv.dtype)


def _specs(shape: tuple[int, ...], block: int, rate: float) -> tuple[list, pl.BlockSpec]:
  """The inputs' block specs (a block of queries, the row's keys and values, segments by query
  and by key, with `rate` the cell's key tile), and a query block's."""
  _, _, length, head_dim = shape
  query = pl.BlockSpec((None, None, block, head_dim), lambda b, h, i: (b, h, i, 0))
  keys = pl.BlockSpec((None, None, length, head_dim), lambda b, h, i: (b, h, 0, 0))
  specs = [query, keys, keys, pl.BlockSpec((None, block, _LANES), lambda b, h, i: (b, i, 0)),
           pl.BlockSpec((None, _SUBLANES, length), lambda b, h, i: (b, 0, 0))]
  if rate:
    specs.append(pl.BlockSpec((None, None, _SUBLANES, _LANES), lambda b, h, i: (b, h, 0, 0)))
  return specs, query


def _inputs(q, k, v, segments, keys) -> list[jax.Array]:
  """The kernel's inputs (`_specs`): segment ids by query along lanes, by key along sublanes;
  each cell's dropout key as a tile."""
  rows, length = segments.shape
  inputs = [q, k, v, jnp.broadcast_to(segments[:, :, None], (rows, length, _LANES)),
            jnp.broadcast_to(segments[:, None, :], (rows, _SUBLANES, length))]
  if keys is not None:
    inputs.append(jnp.broadcast_to(keys[:, :, None, None], (*keys.shape, _SUBLANES, _LANES)))
  return inputs


def _cost(shape: tuple[int, ...], block: int, matmuls: int, arrays: int, itemsize: int
          ) -> pl.CostEstimate:
  """FLOPs of `matmuls` [len, len, head_dim] products; bytes of `arrays` q-sized arrays read or
  written once, and of the `_inputs` tiles as often as the grid fetches them."""
  rows, heads, length, head_dim = shape
  segment_tiles = rows * length * (_LANES * (heads if length > block else 1) + _SUBLANES) * 4
  return pl.CostEstimate(
      flops=2 * matmuls * rows * heads * length * length * head_dim,
      transcendentals=rows * heads * length * length,
      bytes_accessed=(arrays * rows * heads * length * head_dim * itemsize + segment_tiles
                      + rows * heads * _SUBLANES * _LANES * 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend(q, k, v, segments, keys, rate: float, block: int):
  """The kernel on heads-first arrays ([rows, heads, len, head_dim]); `keys` [rows, heads]."""
  in_specs, query = _specs(q.shape, block, rate)
  return pl.pallas_call(
      functools.partial(_forward_kernel, scale=1 / math.sqrt(q.shape[-1]), rate=rate),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(q.shape[0], q.shape[1], q.shape[2] // block), in_specs=in_specs, out_specs=query,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
      cost_estimate=_cost(q.shape, block, 2, 4, q.dtype.itemsize),
  )(*_inputs(q, k, v, segments, keys))


def _attend_forward(q, k, v, segments, keys, rate, block):
  return _attend(q, k, v, segments, keys, rate, block), (q, k, v, segments, keys)


def _attend_backward(rate, block, residuals, d_out):
  q, k, v, segments, keys = residuals
  in_specs, query = _specs(q.shape, block, rate)
  _, _, length, head_dim = q.shape
  grads = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
  dq, dk, dv = pl.pallas_call(
      functools.partial(_backward_kernel, scale=1 / math.sqrt(head_dim), rate=rate),
      out_shape=grads, grid=(q.shape[0], q.shape[1], length // block),
      in_specs=[*in_specs, query], out_specs=(query, in_specs[1], in_specs[1]),
      scratch_shapes=[pltpu.VMEM((length, head_dim), jnp.float32)] * 2,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=_cost(q.shape, block, 5, 7, q.dtype.itemsize),
  )(*_inputs(q, k, v, segments, keys), d_out)
  return dq, dk, dv, None, None


_attend.defvjp(_attend_forward, _attend_backward)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, mesh: Mesh,
                    rate: float = 0.0, seed: jax.Array | None = None) -> jax.Array:
  """Self-attention of `q`, `k`, `v` ([batch, len, heads, head_dim]) within `segments`
  ([batch, len] ids, 0 for padding): a real token attends to its segment's tokens, a padding
  token to every real one (`attends`). With `rate`, attention dropout from the
  int32 `seed` (`dropout_keep`). Rows shard over the mesh's data-parallel axes, heads over its
  tensor axis. The length must `fits_blocks`."""
  rows, _, heads, _ = q.shape
  heads_first = P(sharding.BATCH_AXES, "tensor")
  keys = None
  if rate:
    keys = dropout_key(seed, jnp.arange(rows * heads, dtype=jnp.int32).reshape(rows, heads))
  local = lambda q, k, v, segments, keys: _attend(q, k, v, segments, keys, rate,
                                                  _block(q.shape[2]))
  to_heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out = jax.shard_map(local, mesh=mesh,
                      in_specs=(heads_first,) * 3 + (P(sharding.BATCH_AXES), heads_first),
                      out_specs=heads_first, check_vma=False)(
                          to_heads_first(q), to_heads_first(k), to_heads_first(v), segments, keys)
  return to_heads_first(out)
