"""The optimizer, the train state and the update: shared by the distillation and fine-tuning steps.

The train state is `{"step", "params", "opt_state"}`. `create_state` builds it already sharded on
a mesh (with `num_runs`, stacked on a leading runs axis, `distil_jax.stacked`); `apply_update`
applies one update, and refuses a non-finite one.
"""

import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from distil_jax import sharding

PyTree = dict


def make_optimizer(*, total_steps: int, lr_peak: float, warmup_steps: int, b1: float = 0.9,
                   b2: float = 0.98, eps: float = 1e-6, weight_decay: float = 0.0,
                   clip_norm: float = 5.0, frozen: Sequence[str] = (),
                   lr_multipliers: Sequence[tuple[str, float]] = ()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup then linear decay to 0, global-norm clipping, and no weight decay
  on biases and LayerNorm.

  Parameters are named by their path, e.g. "student/embeddings/position_embeddings/embedding".
  Those matching a regex in `frozen` are not updated and get no optimizer state; those matching
  the regex of an (regex, factor) pair of `lr_multipliers` (the first that matches) train with
  factor times the learning rate, e.g. a freshly initialised MLM head.
  """
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, lr_peak, max(warmup_steps, 1)),
       optax.linear_schedule(lr_peak, 0.0, max(total_steps - warmup_steps, 1))], [warmup_steps])

  def group(path: tuple[str, ...]) -> str:
    name = "/".join(path)
    return next((f"lr_x{factor:g}" for pattern, factor in lr_multipliers
                 if re.search(pattern, name)), "lr_x1")

  groups = lambda params: jax.tree.map(
      lambda g, t: g if t else "frozen",
      traverse_util.path_aware_map(lambda path, _: group(path), params),
      trainable(params, frozen))
  decay_mask = lambda params: traverse_util.path_aware_map(
      lambda path, _: path[-1] in ("kernel", "embedding"), params)
  adamw = lambda factor: optax.adamw(lambda count: factor * schedule(count), b1, b2, eps,
                                     weight_decay=weight_decay, mask=decay_mask)
  transforms = {f"lr_x{factor:g}": adamw(factor) for factor in {1.0, *dict(lr_multipliers)
                                                                .values()}}
  transforms["frozen"] = optax.set_to_zero()
  return optax.chain(
      optax.masked(optax.clip_by_global_norm(clip_norm), lambda p: trainable(p, frozen)),
      optax.multi_transform(transforms, groups)), schedule


def trainable(params: PyTree, frozen: Sequence[str]) -> PyTree:
  """True for the parameters whose path ("student/embeddings/...") matches no `frozen` regex."""
  return traverse_util.path_aware_map(
      lambda path, _: not any(re.search(pattern, "/".join(path)) for pattern in frozen), params)


def init_state(params: PyTree, tx: optax.GradientTransformation) -> PyTree:
  """The train state: {"step", "params", "opt_state"}."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def create_state(params: PyTree, tx: optax.GradientTransformation, param_shardings: PyTree,
                 mesh: Mesh, num_runs: int = 0) -> tuple[PyTree, PyTree]:
  """The state created already sharded: eval_shape, then a jitted init with out_shardings.

  `params` are host arrays, the same on every process; with `num_runs`, stacked on a leading
  runs axis (and `param_shardings` too), which the state then has in every leaf.
  Returns (state, its shardings).
  """
  init = _init(tx, num_runs)
  _, shardings = abstract_state(params, tx, param_shardings, mesh, num_runs)
  state = jax.jit(init, out_shardings=shardings, donate_argnums=0)(
      sharding.put(params, param_shardings))
  return state, shardings


def abstract_state(params: PyTree, tx: optax.GradientTransformation, param_shardings: PyTree,
                   mesh: Mesh, num_runs: int = 0) -> tuple[PyTree, PyTree]:
  """(the state of `params` (arrays or shapes) as shapes with their shardings, its shardings):
  what `create_state` makes, without making it."""
  abstract = jax.eval_shape(_init(tx, num_runs), params)
  shardings = {"step": NamedSharding(mesh, P()), "params": param_shardings,
               "opt_state": sharding.follow_params(abstract["opt_state"], param_shardings, mesh)}
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                      shardings), shardings


def _init(tx: optax.GradientTransformation, num_runs: int):
  init = functools.partial(init_state, tx=tx)
  return jax.vmap(init) if num_runs else init


def apply_update(state: PyTree, grads: PyTree, lr_scale: ArrayLike, loss: jax.Array, *,
                 tx: optax.GradientTransformation, frozen: Sequence[str] = (),
                 stack_axis: str | None = None, proceed: ArrayLike = True
                 ) -> tuple[PyTree, jax.Array, jax.Array]:
  """One optimizer update of one run's state, scaled by `lr_scale`; returns (new state, the
  gradient norm that clipping sees, whether the loss, gradient and result are finite).

  A non-finite loss, gradient or result is not applied: the parameters and optimizer state stay
  (the step counter moves on). Called under `vmap(..., axis_name=stack_axis)` over a stack of
  runs with `stack_axis`, no run's update is applied when any run's is not finite: the stack
  stops as one, every run at the same last finite state. With `proceed` false (a step after a
  non-finite one, when the run stops), nothing changes, not even the step counter.
  """
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  updates = jax.tree.map(lambda u: u * jnp.asarray(lr_scale, u.dtype), updates)
  params = optax.apply_updates(state["params"], updates)
  grad_norm = optax.global_norm(jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads,
                                             trainable(grads, frozen)))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(params))
  applied = finite
  if stack_axis is not None:
    applied = jax.lax.psum((~finite).astype(jnp.int32), stack_axis) == 0
  proceed = jnp.asarray(proceed, bool)
  applied = applied & proceed
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, old)
  return ({"step": state["step"] + proceed.astype(state["step"].dtype),
           "params": keep(params, state["params"]),
           "opt_state": keep(opt_state, state["opt_state"])}, grad_norm, finite)


def proceed_optional(jitted, arity: int):
  """A jitted step whose last argument is `proceed` (`apply_update`), callable without it (as
  True) with its `arity` other arguments; `lower` still takes them all."""
  @functools.wraps(jitted)
  def step(*args):
    return jitted(*args, *([] if len(args) > arity else [jnp.asarray(True)]))
  step.lower = jitted.lower
  return step
