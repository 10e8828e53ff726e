"""The distillation step: train and eval steps of teacher and student together.

`train_step` is a pure function of (state, teacher params, batch, hyper-parameters): the loss
weights, temperature, learning-rate scale and dropout seed are arrays, so several runs (the points
of a fused sweep) can be stacked on a leading runs axis and trained by one program, the teacher's
forward computed once for all of them. With no teacher it trains the student on the MLM loss alone
(how a teacher is adapted). The optimizer and the update are `distil_jax.optim`'s.
"""

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from distil_jax import attention, logit_kernel, losses, models, optim, sharding

PyTree = dict
RUNS_AXIS = "runs"  # The vmapped axis of a stack of runs.


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the step computes, fixed at compile time."""
  student: models.ModelConfig
  teacher: models.ModelConfig | None  # None: MLM-only training of `student`.
  restrict_ce_to_mask: bool = False  # L_ce on masked positions only (default: all real tokens).
  gather_logits: bool = True  # Vocabulary projection only where the losses need logits.
  max_predictions: int = 20  # Masked positions per sequence that the gather keeps.
  accum_steps: int = 1  # Micro-batches per update (and per eval batch).
  frozen: tuple[str, ...] = ()  # Regexes of the frozen parameters (as `optim.make_optimizer`'s).
  num_runs: int = 0  # Runs stacked on a leading axis of state and hyper (0: no such axis).
  mse: bool = True  # L_mse computed; False skips it (alpha_mse is 0 in every run), as the original.
  # A stack's updates applied only when every run's is finite (`optim.apply_update`): the runs
  # stop together at one last finite state (the "stop" policy of a non-finite step).
  stop_together: bool = False
  # Positions whose logits (student's and teacher's) are made at a time in the losses, each
  # chunk's recomputed in the backward pass (`losses.logit_sums`); 0: all at once, and stored.
  logit_chunk: int = 0
  # The teacher's and the student's attention by the TPU kernel `attention.flash_attention` when
  # the mesh is TPUs (and the rows' length `attention.fits_blocks`). The student's kernel draws
  # its own dropout masks: another random stream than XLA's attention, the same distribution.
  teacher_flash_attention: bool = True
  student_flash_attention: bool = True
  # Both models' vocabulary projections and the losses that read them by the TPU kernels of
  # `logit_kernel` when the mesh is TPUs they pay on (`logit_kernel.pays_on`: v6e): float32
  # logits, never stored (`logit_chunk` unused).
  logit_kernel: bool = True


class Hyper(NamedTuple):
  """A run's hyper-parameters that are arrays, so that the runs of a fused sweep may differ."""
  weights: losses.LossWeights = losses.DEFAULT_WEIGHTS
  lr_scale: ArrayLike = 1.0  # Multiplies the updates: the run's lr_peak over the optimizer's.
  seed: ArrayLike = 0  # Dropout randomness: fold_in(key(seed), step).


def max_predictions(seq_len: int, mask_prob: float) -> int:
  """Enough gathered positions per sequence for the masking rate, with room for its spread."""
  return min(seq_len, math.ceil(1.5 * mask_prob * seq_len) + 4)


def init_projection(student_hidden: int, teacher_hidden: int, seed: int = 0) -> PyTree:
  """A linear map of student hidden states onto the teacher's, for L_cos across sizes."""
  kernel = jax.nn.initializers.lecun_normal()(jax.random.key(seed),
                                              (student_hidden, teacher_hidden))
  return {"kernel": kernel, "bias": jnp.zeros((teacher_hidden,))}


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


def _logits(model: models.ModelConfig, params: PyTree, out: models.EncoderOutput, lazy: bool
            ) -> jax.Array | losses.LazyLogits:
  """The logits of `out`, or with `lazy` its head features and their projection."""
  if not lazy:
    return out.logits
  return losses.LazyLogits(out.logits, *models.mlm_decoder(model, params))


def _on_tpu(mesh: Mesh | None) -> bool:
  return mesh is not None and mesh.devices.flat[0].platform == "tpu"


def _flash(enabled: bool, batch: PyTree, mesh: Mesh | None) -> bool:
  """Whether a model's attention runs in the TPU kernel: `enabled` on a TPU mesh, for rows that
  split into the kernel's blocks."""
  return enabled and _on_tpu(mesh) and attention.fits_blocks(batch["input_ids"].shape[1])


def _kernel_mesh(config: StepConfig, mesh: Mesh | None) -> Mesh | None:
  """The mesh on which the losses make the logits in `logit_kernel`'s kernels, if they do."""
  return mesh if config.logit_kernel and _on_tpu(mesh) and logit_kernel.pays_on(mesh) else None


def _lazy(config: StepConfig, mesh: Mesh | None) -> bool:
  """Whether the models give their head features for the losses to project (`LazyLogits`)."""
  return config.logit_chunk > 0 or _kernel_mesh(config, mesh) is not None


def _teacher_outputs(config: StepConfig, teacher_params: PyTree | None, batch: PyTree,
                     positions: jax.Array | None, mesh: Mesh | None, lazy: bool = False
                     ) -> losses.Outputs | None:
  """The frozen teacher's outputs at `positions` (deterministic), or None without a teacher."""
  if config.teacher is None:
    return None
  pinned = None if mesh is None else sharding.batch_sharding(mesh)
  flash = _flash(config.teacher_flash_attention, batch, mesh)
  t = jax.lax.stop_gradient(models.Encoder(config.teacher, pinned, flash).apply(
      {"params": teacher_params}, batch["input_ids"], batch["attention_mask"],
      logit_positions=positions, project=not lazy))
  return losses.Outputs(_logits(config.teacher, teacher_params, t, lazy), t.hidden_states[-1])


def _student_outputs(config: StepConfig, params: PyTree, batch: PyTree,
                     positions: jax.Array | None, rng: jax.Array | None,
                     mesh: Mesh | None, lazy: bool = False) -> losses.Outputs:
  """The student's outputs at `positions`, its hidden states projected if it has a projection.

  Dropout is on when `rng` is given; with `lazy`, the logits are `losses.LazyLogits`."""
  pinned = None if mesh is None else sharding.batch_sharding(mesh)
  dropout = {} if rng is None else {"rngs": {"dropout": rng}}
  flash = _flash(config.student_flash_attention, batch, mesh)
  out = models.Encoder(config.student, pinned, flash).apply(
      {"params": params["student"]}, batch["input_ids"], batch["attention_mask"],
      logit_positions=positions, deterministic=rng is None, project=not lazy, **dropout)
  hidden = out.hidden_states[-1]
  if "projection" in params:
    hidden = hidden @ params["projection"]["kernel"] + params["projection"]["bias"]
  return losses.Outputs(_logits(config.student, params["student"], out, lazy), hidden)


def _micro_loss(params, teacher, batch, targets, weights, totals, rng, config, mesh):
  """A micro-batch's share of the full batch's loss, and its metrics as sums."""
  positions, valid, labels = targets
  student = _student_outputs(config, params, batch, positions, rng, mesh,
                             lazy=_lazy(config, mesh))
  counts = _counts(valid, labels, batch["attention_mask"])
  frac = {k: n / jnp.maximum(totals[k], 1.0) for k, n in counts.items()}
  scaled = weights._replace(**{f"alpha_{part}": getattr(weights, f"alpha_{part}") * frac[
      f"loss_{part}"] for part in ("ce", "mlm", "cos", "mse")})
  total, parts = losses.distillation_loss(student, teacher, labels, valid,
                                          batch["attention_mask"], scaled, config.mse,
                                          config.logit_chunk, _kernel_mesh(config, mesh))
  metrics = {k: v * frac[k] for k, v in parts.items() if k.startswith("loss_")}
  metrics["loss"] = total
  metrics["student_correct"], metrics["masked"] = parts["student_correct"], parts["labeled"]
  if teacher is not None:
    metrics["teacher_correct"] = parts["teacher_correct"]
  metrics["tokens"] = jnp.sum(batch["attention_mask"] > 0).astype(jnp.float32)
  # Masked positions beyond max_predictions in a row; they get no logits, so no loss.
  metrics["dropped_predictions"] = (jnp.sum(batch["labels"] != losses.IGNORE_INDEX)
                                    - jnp.sum(labels != losses.IGNORE_INDEX)).astype(jnp.float32)
  return total, metrics


def _per_run(config: StepConfig, fn, num_stacked: int, num_args: int, in_turn: bool = False):
  """`fn` mapped over the runs axis of its first `num_stacked` arguments (the others are
  shared), or `fn` itself when the state has no runs axis.

  Vmapped, with the axis named `RUNS_AXIS` for collectives across runs; or `in_turn`, one run
  after another (`lax.map`): each run's matmuls are then a single run's, and only one run's
  activations are live at a time (`runs_in_turn` says where the models' passes take turns)."""
  if not config.num_runs:
    return fn
  if in_turn:
    return lambda *args: jax.lax.map(lambda run: fn(*run, *args[num_stacked:]),
                                     args[:num_stacked])
  return jax.vmap(fn, in_axes=(0,) * num_stacked + (None,) * (num_args - num_stacked),
                  axis_name=RUNS_AXIS)


def runs_in_turn(mesh: Mesh | None) -> bool:
  """Whether a stack's student passes take turns (on the CPU) or are vmapped (on accelerators).

  On XLA:CPU vmapped matmuls are slower than the runs' one by one: 4 tiny runs' step took 1.05x
  the time of 4 separate steps vmapped, 0.73x in turn (docs/sweeps.md). On a TPU, XLA's count
  for bert_base on a v4-32 gives the opposite (4 runs vmapped 0.99x the HBM bytes of 4 separate
  programs, in turn 1.19x), though in turn needs half the memory (docs/tpu.md)."""
  return mesh is None or mesh.devices.flat[0].platform == "cpu"


def shared_outputs(config: StepConfig, teacher_params: PyTree | None, micro_batch: PyTree,
                   mesh: Mesh | None = None):
  """What a micro-batch gives every run alike: where logits are needed (`_logit_targets`) and
  the teacher's outputs there. Fused runs compute it once."""
  targets = _logit_targets(config, micro_batch)
  return targets, _teacher_outputs(config, teacher_params, micro_batch, targets[0], mesh,
                                   lazy=_lazy(config, mesh))


def _split(config: StepConfig, batch: PyTree, num_micro: int, mesh: Mesh | None) -> PyTree:
  """[num_micro * micro, ...] -> [num_micro, micro, ...]; row r goes to micro-batch r % k, so
  that each micro-batch spans every device."""
  def split(x):
    x = x.reshape(-1, num_micro, *x.shape[1:]).swapaxes(0, 1)
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
  return jax.tree.map(split, batch)


def train_step(state: PyTree, teacher_params: PyTree | None, batch: PyTree, hyper: Hyper,
               proceed: ArrayLike = True, *, config: StepConfig,
               tx: optax.GradientTransformation, mesh: Mesh | None = None
               ) -> tuple[PyTree, dict[str, jax.Array]]:
  """One update on `batch` ([accum_steps * micro, seq] arrays), split into micro-batches.

  Micro-batch losses are weighted by their share of each loss part's positions, so the update
  equals the one on the whole batch at once. With `config.num_runs`, `state`, `hyper` and the
  returned metrics have a leading runs axis: the teacher runs once per micro-batch for all runs,
  the students' forward and backward passes are vmapped or take turns (`runs_in_turn`), and the
  update is vmapped.
  """
  totals = _counts(*_logit_targets(config, batch)[1:], batch["attention_mask"])

  def run_grads(params, step, hyper, teacher, micro_batch, targets, i):
    rng = jax.random.fold_in(jax.random.fold_in(
        jax.random.key(hyper.seed), step), i)
    return jax.grad(_micro_loss, has_aux=True)(params, teacher, micro_batch, targets,
                                               hyper.weights, totals, rng, config, mesh)
  run_grads = _per_run(config, run_grads, 3, 7, in_turn=runs_in_turn(mesh))

  def micro_grads(micro_batch, i):
    targets, teacher = shared_outputs(config, teacher_params, micro_batch, mesh)
    return run_grads(state["params"], state["step"], hyper, teacher, micro_batch, targets, i)

  micro = _split(config, batch, config.accum_steps, mesh)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      micro_grads, jax.tree.map(lambda x: x[0], micro), 0))
  (grads, metrics), _ = jax.lax.scan(
      lambda carry, xs: (jax.tree.map(jnp.add, carry, micro_grads(*xs)), None), zeros,
      (micro, jnp.arange(config.accum_steps)))

  update = functools.partial(optim.apply_update, tx=tx, frozen=config.frozen,
                             stack_axis=RUNS_AXIS if config.num_runs and config.stop_together
                             else None, proceed=proceed)
  new_state, metrics["grad_norm"], metrics["finite"] = _per_run(config, update, 4, 4)(
      state, grads, hyper.lr_scale, metrics["loss"])
  metrics["student_accuracy"] = metrics.pop("student_correct") / jnp.maximum(metrics["masked"], 1)
  if "teacher_correct" in metrics:
    metrics["teacher_accuracy"] = metrics.pop("teacher_correct") / jnp.maximum(
        metrics["masked"], 1)
  return new_state, metrics


def eval_config(config: StepConfig) -> StepConfig:
  """What `eval_step` computes: logits at the masked positions only, all at once."""
  return dataclasses.replace(config, restrict_ce_to_mask=True, gather_logits=True, logit_chunk=0,
                             logit_kernel=False)


def eval_step(params: PyTree, teacher_params: PyTree | None, batch: PyTree, *,
              config: StepConfig, mesh: Mesh | None = None) -> dict[str, jax.Array]:
  """Sums over a batch's masked positions: NLL and correct predictions of student (and teacher),
  and teacher-student top-1 agreement and KL at T=1. `summarize_eval` turns them into metrics.

  The batch is evaluated in `config.accum_steps` micro-batches, as training splits it. With
  `config.num_runs`, `params` and the sums have a leading runs axis.
  """
  config = eval_config(config)

  def run_sums(params, teacher, micro_batch, targets):
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
  run_sums = _per_run(config, run_sums, 1, 4, in_turn=runs_in_turn(mesh))

  def micro_sums(micro_batch):
    targets, teacher = shared_outputs(config, teacher_params, micro_batch, mesh)
    return run_sums(params, teacher, micro_batch, targets)

  micro = _split(config, batch, config.accum_steps, mesh)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      micro_sums, jax.tree.map(lambda x: x[0], micro)))
  sums, _ = jax.lax.scan(lambda carry, b: (jax.tree.map(jnp.add, carry, micro_sums(b)), None),
                         zeros, micro)
  return sums


def evaluate(eval_step, params: PyTree, teacher_params: PyTree | None,
             batches: Iterable[PyTree], num_runs: int = 0) -> list[dict[str, float]]:
  """Held-out metrics of each run (one without `num_runs`) over the global `batches`: sums
  accumulated on device, fetched once, then `summarize_eval`d."""
  sums = None
  for batch in batches:
    batch_sums = eval_step(params, teacher_params, batch)
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
  sums = jax.device_get(sums)
  if not num_runs:
    return [summarize_eval(jax.tree.map(float, sums))]
  return [summarize_eval({k: float(v[i]) for k, v in sums.items()}) for i in range(num_runs)]


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
  train = optim.proceed_optional(jax.jit(
      functools.partial(train_step, config=config, tx=tx, mesh=mesh),
      in_shardings=(state_shardings, teacher_shardings, batch, replicated, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=0), arity=4)
  evaluate = jax.jit(functools.partial(eval_step, config=config, mesh=mesh),
                     in_shardings=(state_shardings["params"], teacher_shardings, batch),
                     out_shardings=replicated)
  return train, evaluate


def _param_shardings(config: StepConfig, mesh: Mesh, projection: PyTree | None) -> PyTree:
  """The shardings of the trained parameters: the student's by the logical-axis rules, a
  projection's replicated, stacked runs on a replicated leading axis."""
  shardings = {"student": sharding.param_shardings(models.abstract_params(config.student), mesh)}
  if projection is not None:
    shardings["projection"] = sharding.follow_params(projection, {}, mesh)
  return sharding.stacked(shardings) if config.num_runs else shardings


def lower(config: StepConfig, tx: optax.GradientTransformation, mesh: Mesh, batch_size: int,
          seq_len: int, projection: bool = False,
          programs: Sequence[str] = ("train", "eval", "update")) -> dict[str, jax.stages.Lowered]:
  """`programs` of the train step ("train"), the eval step ("eval") and the optimizer update
  alone ("update": `optim.apply_update`, what runs outside the micro-batch loop), lowered for
  `mesh` on the shapes of a global batch of `batch_size` rows of `seq_len`: nothing is allocated,
  `.compile()` gives the real programs."""
  student = nn.meta.unbox(models.abstract_params(config.student))
  params = {"student": student}
  if projection:
    params["projection"] = jax.eval_shape(init_projection, config.student.hidden_size,
                                          config.teacher.hidden_size)
  if config.num_runs:
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct((config.num_runs, *x.shape), x.dtype),
                          params)
  state, state_shardings = optim.abstract_state(
      params, tx, _param_shardings(config, mesh, params.get("projection")), mesh,
      config.num_runs)
  teacher = teacher_shardings = None
  if config.teacher is not None:
    teacher_shardings = sharding.param_shardings(models.abstract_params(config.teacher), mesh)
    teacher = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           nn.meta.unbox(models.abstract_params(config.teacher)),
                           teacher_shardings)
  replicated = NamedSharding(mesh, P())
  scalar = lambda dtype: jax.ShapeDtypeStruct((config.num_runs,) if config.num_runs else (),
                                              dtype, sharding=replicated)
  hyper = Hyper(losses.LossWeights(*[scalar(jnp.float32)] * 5), scalar(jnp.float32),
                scalar(jnp.int32))
  batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32,
                                   sharding=sharding.batch_sharding(mesh))
           for k in ("input_ids", "attention_mask", "labels")}
  proceed = jax.ShapeDtypeStruct((), jnp.bool_, sharding=replicated)
  train, evaluate = jit_steps(config, tx, mesh, state_shardings, teacher_shardings)
  update = functools.partial(optim.apply_update, tx=tx, frozen=config.frozen)
  update = jax.jit(_per_run(config, update, 4, 4), donate_argnums=0)
  lowerings = {
      "train": lambda: train.lower(state, teacher, batch, hyper, proceed),
      "eval": lambda: evaluate.lower(state["params"], teacher, batch),
      "update": lambda: update.lower(state, state["params"], hyper.lr_scale,
                                     scalar(jnp.float32))}
  return {name: lowerings[name]() for name in programs}


def prepare(config: StepConfig, params: PyTree, teacher_params: PyTree | None,
            tx: optax.GradientTransformation, mesh: Mesh):
  """Everything a train loop needs, sharded on `mesh` by the logical-axis rules.

  `params` ({"student", ["projection"]}) and `teacher_params` are host arrays, the same on every
  process; with `config.num_runs`, `params` are stacked on a leading runs axis, which stays
  replicated: every device holds every run, so the batch shards exactly as in a single run and
  the teacher's outputs on a device's rows serve all runs. Returns (train state, teacher params
  on the mesh, jitted train step, jitted eval step).
  """
  param_shardings = _param_shardings(config, mesh, params.get("projection"))
  state, state_shardings = optim.create_state(params, tx, param_shardings, mesh, config.num_runs)
  teacher, teacher_shardings = None, None
  if config.teacher is not None:
    teacher_shardings = sharding.param_shardings(models.abstract_params(config.teacher), mesh)
    teacher = sharding.put(teacher_params, teacher_shardings)
  train, evaluate = jit_steps(config, tx, mesh, state_shardings, teacher_shardings)
  return state, teacher, train, evaluate
