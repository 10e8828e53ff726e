"""A stack of runs: several runs' trees on a leading runs axis, trained by one compiled step.

The runs of a fused sweep group, or the seeds and learning rates of a fine-tuning, are stacked:
every leaf holds R runs' arrays ([R, ...]) and one compiled step trains all of them
(`distill_step.StepConfig.num_runs`). Each run is still saved, resumed and exported on its own, as
the single-run tree that `take` cuts out of the stack; `put_back` stacks such trees again.
"""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Host trees of equal structure -> one host tree with a leading runs axis."""
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *trees)


def one_run_shardings(stacked_shardings: PyTree) -> PyTree:
  """The shardings of one run's tree, from those of the stacked tree (its axis 0 dropped)."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(*s.spec[1:])), stacked_shardings)


@jax.jit
def take(stacked: PyTree, index: int) -> PyTree:
  """Run `index`'s tree, on the mesh (a jitted slice: no host copy; compiled once)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), stacked)


def put_back(trees: Sequence[PyTree], stacked_shardings: PyTree) -> PyTree:
  """One-run trees on the mesh -> the stacked tree with `stacked_shardings`."""
  return jax.jit(lambda *t: jax.tree.map(lambda *x: jax.numpy.stack(x), *t),
                 out_shardings=stacked_shardings)(*trees)
