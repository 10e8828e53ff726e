"""Attention in one TPU kernel: Pallas flash attention within segments, over a device mesh.

`models.SelfAttention` computes softmax(q k^T / sqrt(d)) v with XLA, which writes the scores and
the probabilities ([batch, heads, len, len]) to HBM and reads them back, the largest traffic of a
step at 512 tokens (docs/tpu.md). `flash_attention` does it blockwise in VMEM instead (JAX's
`pallas.ops.tpu.flash_attention`, segment ids as documents), each device on its own rows and
heads. It has no dropout, so it serves the deterministic forward passes: the frozen teacher's.
Off a TPU it runs only under Pallas' interpreter (`pltpu.force_tpu_interpret_mode`), as tests do.
"""

import math

import jax
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from distil_jax import sharding

BLOCK = 128  # Query and key positions per block of the kernel.


def fits_blocks(length: int) -> bool:
  """Whether rows of `length` positions split into the kernel's blocks."""
  return length % BLOCK == 0


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, mesh: Mesh
                    ) -> jax.Array:
  """Self-attention of `q`, `k`, `v` ([batch, len, heads, head_dim]) within `segments`
  ([batch, len] ids, 0 for padding): a real token attends to its segment's tokens, padding to
  padding. Rows shard over the mesh's data-parallel axes, heads over its tensor axis.
  The length must `fits_blocks`."""
  sizes = pallas_flash.BlockSizes(
      block_q=BLOCK, block_k_major=BLOCK, block_k=BLOCK, block_b=1, block_q_major_dkv=BLOCK,
      block_k_major_dkv=BLOCK, block_k_dkv=BLOCK, block_q_dkv=BLOCK, block_k_major_dq=BLOCK,
      block_k_dq=BLOCK, block_q_dq=BLOCK)
  heads_first = P(sharding.BATCH_AXES, "tensor", None, None)

  def local(q, k, v, segments):
    ids = pallas_flash.SegmentIds(q=segments, kv=segments)
    return pallas_flash.flash_attention(q, k, v, segment_ids=ids, block_sizes=sizes,
                                        sm_scale=1 / math.sqrt(q.shape[-1]))

  to_heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out = jax.shard_map(local, mesh=mesh, in_specs=(heads_first,) * 3 + (P(sharding.BATCH_AXES),),
                      out_specs=heads_first, check_vma=False)(
                          to_heads_first(q), to_heads_first(k), to_heads_first(v), segments)
  return to_heads_first(out)
