"""The optimizer, the train state, and the train and eval steps of teacher and student together.

`train_step` is a pure function of (state, teacher params, batch, hyper-parameters): the loss
weights, temperature, learning-rate scale and dropout seed are arrays, so several runs (the points
of a sweep) can be stacked on a leading axis and trained by one program, the teacher's forward
computed once for all of them. With no teacher it trains the student on the MLM loss alone (how a
teacher is adapted).
"""

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from distil_jax import losses, models, sharding

PyTree = dict


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the step computes, fixed at compile time."""
  student: models.ModelConfig
  teacher: models.ModelConfig | None  # None: MLM-only training of `student`.
  restrict_ce_to_mask: bool = False  # L_ce on masked positions only (default: all real tokens).
  gather_logits: bool = True  # Vocabulary projection only where the losses need logits.
  max_predictions: int = 20  # Masked positions per sequence that the gather keeps.
  accum_steps: int = 1  # Micro-batches per update (and per eval batch).
  frozen: tuple[str, ...] = ()  # Regexes of the frozen parameters (as `make_optimizer`'s).
  num_points: int = 0  # Runs stacked on a leading axis of state and hyper (0: no such axis).
  mse: bool = True  # L_mse computed; False skips it (alpha_mse is 0 in every run), as the original.


class Hyper(NamedTuple):
  """A run's hyper-parameters that are arrays, so that the runs of a fused sweep may differ."""
  weights: losses.LossWeights = losses.DEFAULT_WEIGHTS
  lr_scale: ArrayLike = 1.0  # Multiplies the updates: the run's lr_peak over the optimizer's.
  seed: ArrayLike = 0  # Dropout randomness: fold_in(key(seed), step).


def max_predictions(seq_len: int, mask_prob: float) -> int:
  """Enough gathered positions per sequence for the masking rate, with room for its spread."""
  return min(seq_len, math.ceil(1.5 * mask_prob * seq_len) + 4)


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


def init_projection(student_hidden: int, teacher_hidden: int, seed: int = 0) -> PyTree:
  """A linear map of student hidden states onto the teacher's, for L_cos across sizes."""
  kernel = jax.nn.initializers.lecun_normal()(jax.random.key(seed),
                                              (student_hidden, teacher_hidden))
  return {"kernel": kernel, "bias": jnp.zeros((teacher_hidden,))}


def init_state(params: PyTree, tx: optax.GradientTransformation) -> PyTree:
  """The train state: {"step", "params": {"student", ["projection"]}, "opt_state"}."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def create_state(params: PyTree, tx: optax.GradientTransformation, param_shardings: PyTree,
                 mesh: Mesh, num_points: int = 0) -> tuple[PyTree, PyTree]:
  """The state created already sharded: eval_shape, then a jitted init with out_shardings.

  `params` are host arrays, the same on every process; with `num_points`, stacked on a leading
  points axis (and `param_shardings` too), which the state then has in every leaf.
  Returns (state, its shardings).
  """
  init = functools.partial(init_state, tx=tx)
  if num_points:
    init = jax.vmap(init)
  abstract = jax.eval_shape(init, params)
  shardings = {"step": NamedSharding(mesh, P()), "params": param_shardings,
               "opt_state": sharding.follow_params(abstract["opt_state"], param_shardings, mesh)}
  state = jax.jit(init, out_shardings=shardings, donate_argnums=0)(
      sharding.put(params, param_shardings))
  return state, shardings


def _logit_targets(config: StepConfig, batch: PyTree):
  """Where the logits are needed: (positions or None, their validity mask, their labels)."""
  labels = batch["labels"]
  masked = labels != losses.IGNORE_INDEX
  needs_all = config.teacher is not None and not config.restrict_ce_to_mask
  if needs_all or not config.gather_logits:
    return None, (batch["attention_mask"] > 0) if needs_all else masked, labels
  positions = jnp.argsort(~masked, axis=-1, stable=True)[:, :config.max_predictions]
  valid = jnp.take_along_axis(masked, positions, axis=-1)
  return positions, valid, jnp.where(valid, jnp.take_along_axis(labels, positions, axis=-1),
                                     losses.IGNORE_INDEX)


def _counts(valid: jax.Array, labels: jax.Array, attention_mask: jax.Array
            ) -> dict[str, jax.Array]:
  """Positions each loss part averages over (from `_logit_targets`), to weight micro-batches."""
  count = lambda x: jnp.sum(x).astype(jnp.float32)
  n_ce = count(valid)
  return {"loss_ce": n_ce, "loss_mse": n_ce, "loss_mlm": count(labels != losses.IGNORE_INDEX),
          "loss_cos": count(attention_mask > 0)}


def _teacher_outputs(config: StepConfig, teacher_params: PyTree | None, batch: PyTree,
                     positions: jax.Array | None, mesh: Mesh | None) -> losses.Outputs | None:
  """The frozen teacher's outputs at `positions` (deterministic), or None without a teacher."""
  if config.teacher is None:
    return None
  pinned = None if mesh is None else sharding.batch_sharding(mesh)
  t = models.Encoder(config.teacher, pinned).apply(
      {"params": teacher_params}, batch["input_ids"], batch["attention_mask"],
      logit_positions=positions)
  return jax.lax.stop_gradient(losses.Outputs(t.logits, t.hidden_states[-1]))


def _student_outputs(config: StepConfig, params: PyTree, batch: PyTree,
                     positions: jax.Array | None, rng: jax.Array | None,
                     mesh: Mesh | None) -> losses.Outputs:
  """The student's outputs at `positions`, its hidden states projected if it has a projection.

  Dropout is on when `rng` is given."""
  pinned = None if mesh is None else sharding.batch_sharding(mesh)
  dropout = {} if rng is None else {"rngs": {"dropout": rng}}
  out = models.Encoder(config.student, pinned).apply(
      {"params": params["student"]}, batch["input_ids"], batch["attention_mask"],
      logit_positions=positions, deterministic=rng is None, **dropout)
  hidden = out.hidden_states[-1]
  if "projection" in params:
    hidden = hidden @ params["projection"]["kernel"] + params["projection"]["bias"]
  return losses.Outputs(out.logits, hidden)


def _micro_loss(params, teacher, batch, targets, weights, totals, rng, config, mesh):
  """A micro-batch's share of the full batch's loss, and its metrics as sums."""
  positions, valid, labels = targets
  student = _student_outputs(config, params, batch, positions, rng, mesh)
  counts = _counts(valid, labels, batch["attention_mask"])
  frac = {k: n / jnp.maximum(totals[k], 1.0) for k, n in counts.items()}
  scaled = weights._replace(**{f"alpha_{part}": getattr(weights, f"alpha_{part}") * frac[
      f"loss_{part}"] for part in ("ce", "mlm", "cos", "mse")})
  total, parts = losses.distillation_loss(student, teacher, labels, valid,
                                          batch["attention_mask"], scaled, config.mse)
  metrics = {k: v * frac[k] for k, v in parts.items() if k != "loss"}
  metrics["loss"] = total
  metrics["student_correct"], metrics["masked"] = losses.masked_accuracy(student.logits, labels)
  if teacher is not None:
    metrics["teacher_correct"], _ = losses.masked_accuracy(teacher.logits, labels)
  metrics["tokens"] = jnp.sum(batch["attention_mask"] > 0).astype(jnp.float32)
  # Masked positions beyond max_predictions in a row; they get no logits, so no loss.
  metrics["dropped_predictions"] = (jnp.sum(batch["labels"] != losses.IGNORE_INDEX)
                                    - jnp.sum(labels != losses.IGNORE_INDEX)).astype(jnp.float32)
  return total, metrics


def _per_point(config: StepConfig, fn, num_stacked: int, num_args: int):
  """`fn` mapped over the points axis of its first `num_stacked` arguments (the others are
  shared), or `fn` itself when the state has no points axis."""
  if not config.num_points:
    return fn
  return jax.vmap(fn, in_axes=(0,) * num_stacked + (None,) * (num_args - num_stacked))


def _split(config: StepConfig, batch: PyTree, num_micro: int, mesh: Mesh | None) -> PyTree:
  """[num_micro * micro, ...] -> [num_micro, micro, ...]; row r goes to micro-batch r % k, so
  that each micro-batch spans every device."""
  def split(x):
    x = x.reshape(-1, num_micro, *x.shape[1:]).swapaxes(0, 1)
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
  return jax.tree.map(split, batch)


def train_step(state: PyTree, teacher_params: PyTree | None, batch: PyTree, hyper: Hyper, *,
               config: StepConfig, tx: optax.GradientTransformation, mesh: Mesh | None = None
               ) -> tuple[PyTree, dict[str, jax.Array]]:
  """One update on `batch` ([accum_steps * micro, seq] arrays), split into micro-batches.

  Micro-batch losses are weighted by their share of each loss part's positions, so the update
  equals the one on the whole batch at once. With `config.num_points`, `state`, `hyper` and the
  returned metrics have a leading points axis: the teacher runs once per micro-batch and the
  student's forward, backward and update are vmapped over the points.
  """
  totals = _counts(*_logit_targets(config, batch)[1:], batch["attention_mask"])

  def point_grads(params, step, hyper, teacher, micro_batch, targets, i):
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(hyper.seed), step), i)
    return jax.grad(_micro_loss, has_aux=True)(params, teacher, micro_batch, targets,
                                               hyper.weights, totals, rng, config, mesh)
  point_grads = _per_point(config, point_grads, 3, 7)

  def micro_grads(micro_batch, i):
    targets = _logit_targets(config, micro_batch)
    teacher = _teacher_outputs(config, teacher_params, micro_batch, targets[0], mesh)
    return point_grads(state["params"], state["step"], hyper, teacher, micro_batch, targets, i)

  micro = _split(config, batch, config.accum_steps, mesh)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      micro_grads, jax.tree.map(lambda x: x[0], micro), 0))
  (grads, metrics), _ = jax.lax.scan(
      lambda carry, xs: (jax.tree.map(jnp.add, carry, micro_grads(*xs)), None), zeros,
      (micro, jnp.arange(config.accum_steps)))

  update = functools.partial(apply_update, tx=tx, frozen=config.frozen)
  new_state, metrics["grad_norm"], metrics["finite"] = _per_point(config, update, 4, 4)(
      state, grads, hyper.lr_scale, metrics["loss"])
  metrics["student_accuracy"] = metrics.pop("student_correct") / jnp.maximum(metrics["masked"], 1)
  if "teacher_correct" in metrics:
    metrics["teacher_accuracy"] = metrics.pop("teacher_correct") / jnp.maximum(
        metrics["masked"], 1)
  return new_state, metrics


def apply_update(state: PyTree, grads: PyTree, lr_scale: ArrayLike, loss: jax.Array, *,
                 tx: optax.GradientTransformation, frozen: Sequence[str] = ()
                 ) -> tuple[PyTree, jax.Array, jax.Array]:
  """One optimizer update of one run's state, scaled by `lr_scale`; returns (new state, the
  gradient norm that clipping sees, whether it was applied).

  A non-finite loss, gradient or result is not applied: the parameters and optimizer state stay
  (the step counter moves on).
  """
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  updates = jax.tree.map(lambda u: u * jnp.asarray(lr_scale, u.dtype), updates)
  params = optax.apply_updates(state["params"], updates)
  grad_norm = optax.global_norm(jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads,
                                             trainable(grads, frozen)))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(params))
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  return ({"step": state["step"] + 1, "params": keep(params, state["params"]),
           "opt_state": keep(opt_state, state["opt_state"])}, grad_norm, finite)


def eval_step(params: PyTree, teacher_params: PyTree | None, batch: PyTree, *,
              config: StepConfig, mesh: Mesh | None = None) -> dict[str, jax.Array]:
  """Sums over a batch's masked positions: NLL and correct predictions of student (and teacher),
  and teacher-student top-1 agreement and KL at T=1. `summarize_eval` turns them into metrics.

  The batch is evaluated in `config.accum_steps` micro-batches, as training splits it. With
  `config.num_points`, `params` and the sums have a leading points axis.
  """
  config = dataclasses.replace(config, restrict_ce_to_mask=True, gather_logits=True)

  def point_sums(params, teacher, micro_batch, targets):
    positions, valid, labels = targets
    student = _student_outputs(config, params, micro_batch, positions, None, mesh)
    correct, count = losses.masked_accuracy(student.logits, labels)
    sums = {"count": count, "student_correct": correct,
            "student_nll": losses.mlm_loss(student.logits, labels) * count}
    if teacher is not None:
      sums["teacher_correct"], _ = losses.masked_accuracy(teacher.logits, labels)
      sums["teacher_nll"] = losses.mlm_loss(teacher.logits, labels) * count
      sums["agreement"] = losses.top1_agreement(student.logits, teacher.logits, valid) * count
      sums["kl"] = losses.kd_loss(student.logits, teacher.logits, valid, 1.0) * count
    return sums
  point_sums = _per_point(config, point_sums, 1, 4)

  def micro_sums(micro_batch):
    targets = _logit_targets(config, micro_batch)
    teacher = _teacher_outputs(config, teacher_params, micro_batch, targets[0], mesh)
    return point_sums(params, teacher, micro_batch, targets)

  micro = _split(config, batch, config.accum_steps, mesh)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      micro_sums, jax.tree.map(lambda x: x[0], micro)))
  sums, _ = jax.lax.scan(lambda carry, b: (jax.tree.map(jnp.add, carry, micro_sums(b)), None),
                         zeros, micro)
  return sums


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
  """Eval sums accumulated over batches -> accuracy, perplexity, agreement and KL."""
  n = max(float(sums["count"]), 1.0)
  out = {"eval_loss": sums["student_nll"] / n, "positions": float(sums["count"]),
         "student_accuracy": sums["student_correct"] / n,
         "student_perplexity": math.exp(min(sums["student_nll"] / n, 50.0))}
  if "teacher_nll" in sums:
    out.update({"teacher_accuracy": sums["teacher_correct"] / n,
                "teacher_perplexity": math.exp(min(sums["teacher_nll"] / n, 50.0)),
                "agreement": sums["agreement"] / n, "kl_t1": sums["kl"] / n})
  return out


def jit_steps(config: StepConfig, tx: optax.GradientTransformation, mesh: Mesh,
              state_shardings: PyTree, teacher_shardings: PyTree | None):
  """The train and eval steps compiled with their shardings; the train state is donated."""
  batch, replicated = sharding.batch_sharding(mesh), NamedSharding(mesh, P())
  train = jax.jit(functools.partial(train_step, config=config, tx=tx, mesh=mesh),
                  in_shardings=(state_shardings, teacher_shardings, batch, replicated),
                  out_shardings=(state_shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, config=config, mesh=mesh),
                     in_shardings=(state_shardings["params"], teacher_shardings, batch),
                     out_shardings=replicated)
  return train, evaluate


def prepare(config: StepConfig, params: PyTree, teacher_params: PyTree | None,
            tx: optax.GradientTransformation, mesh: Mesh):
  """Everything a train loop needs, sharded on `mesh` by the logical-axis rules.

  `params` ({"student", ["projection"]}) and `teacher_params` are host arrays, the same on every
  process; with `config.num_points`, `params` are stacked on a leading points axis, which stays
  replicated: every device holds every point, so the batch shards exactly as in a single run and
  the teacher's outputs on a device's rows serve all points. Returns (train state, teacher params
  on the mesh, jitted train step, jitted eval step).
  """
  param_shardings = {"student": sharding.param_shardings(
      models.abstract_params(config.student), mesh)}
  if "projection" in params:
    param_shardings["projection"] = sharding.follow_params(params["projection"], {}, mesh)
  if config.num_points:
    param_shardings = sharding.stacked(param_shardings)
  state, state_shardings = create_state(params, tx, param_shardings, mesh, config.num_points)
  teacher, teacher_shardings = None, None
  if config.teacher is not None:
    teacher_shardings = sharding.param_shardings(models.abstract_params(config.teacher), mesh)
    teacher = sharding.put(teacher_params, teacher_shardings)
  train, evaluate = jit_steps(config, tx, mesh, state_shardings, teacher_shardings)
  return state, teacher, train, evaluate
