"""Device mesh, logical-axis rules, and the shardings of parameters, optimizer state and batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with the
parameters and optimizer state sharded over it) and `tensor` (tensor parallelism). Models name
their parameter axes (`vocab`, `embed`, `mlp`, `heads`, `kv`); `RULES` maps those names onto
mesh axes. An axis whose size the mesh axes do not divide is replicated instead.
"""

from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from distil_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes. Batches shard over every data-parallel axis.
RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (all by default); one -1 entry fills in."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1:
    raise errors.ConfigError(
        f"mesh shape {tuple(shape)} must give sizes for {MESH_AXES}, at most one "
        "of them -1: e.g. config.mesh_shape=(-1, 1, 1)")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // rest if len(devices) % rest == 0 else -1
  if int(np.prod(shape)) != len(devices) or min(shape) < 1:
    raise errors.ConfigError(
        f"mesh shape {tuple(shape)} does not fit {len(devices)} devices: make the "
        "product of config.mesh_shape equal the device count")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _mesh_axes(logical: str | None, rules) -> tuple[str, ...]:
  axes = dict(rules).get(logical) if logical else None
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def mesh_spec(logical_spec: Sequence[str | None], shape: Sequence[int],
              mesh_shape: dict[str, int], rules=RULES) -> P:
  """The mesh PartitionSpec for logical axis names; axes the mesh does not divide replicate."""
  spec = []
  for name, size in zip(logical_spec, shape, strict=True):
    axes = _mesh_axes(name, rules)
    n = int(np.prod([mesh_shape[a] for a in axes]))
    if axes and size % n:
      logging.info("axis %r of size %d is not divisible by mesh axes %s (%d): replicated",
                   name, size, axes, n)
      axes = ()
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def mesh_sharding(logical_spec: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                  rules=RULES) -> NamedSharding:
  """The sharding of an array with these logical axis names on `mesh`."""
  return NamedSharding(mesh, mesh_spec(logical_spec, shape, dict(mesh.shape), rules))


def param_shardings(abstract_params, mesh: Mesh, rules=RULES):
  """Shardings of a parameter tree from its `nn.LogicallyPartitioned` abstract values."""
  specs = nn.get_partition_spec(abstract_params)
  shapes = nn.meta.unbox(abstract_params)
  return jax.tree.map(lambda spec, x: mesh_sharding(tuple(spec), x.shape, mesh, rules),
                      specs, shapes, is_leaf=lambda x: isinstance(x, P))


def _dict_path(path) -> tuple[str, ...]:
  """The trailing dictionary keys of a key path: the parameter an optimizer leaf mirrors."""
  keys = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    keys.append(str(entry.key))
  return tuple(reversed(keys))


def follow_params(abstract_tree, shardings_of_params, mesh: Mesh):
  """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

  A leaf whose trailing dictionary path names a parameter gets that parameter's sharding
  (Adam's moments); every other leaf (step counts) is replicated.
  """
  by_path = traverse_util.flatten_dict(shardings_of_params)
  replicated = NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(
      lambda path, _: by_path.get(_dict_path(path), replicated), abstract_tree)


def stacked(shardings):
  """Shardings of the same arrays stacked on a new leading axis, which is replicated."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches shard their leading axis over the data-parallel mesh axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def put(tree, shardings):
  """Places host arrays (the same on every process) onto a possibly multi-host mesh."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
      tree, shardings)
