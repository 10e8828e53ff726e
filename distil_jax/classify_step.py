"""The fine-tuning step: sequence classification (or regression) of runs stacked on a leading axis.

The runs (seeds, learning rates) of a fine-tuning job are stacked like the runs of a fused sweep
(`distil_jax.stacked`): every leaf of the state, of the `Hyper` and of the train batch has a
leading runs axis, so each run has its own head initialisation, dropout and data order, and one
compiled step trains all of them. The update is `optim.apply_update`, as in distillation.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from distil_jax import losses, models, optim, sharding

PyTree = dict


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
  """What the fine-tuning step computes, fixed at compile time."""
  model: models.ModelConfig
  num_labels: int  # 1 for a regression (STS-B).
  frozen: tuple[str, ...] = ()
  stop_together: bool = False  # As `distill_step.StepConfig.stop_together`.

  @property
  def regression(self) -> bool:
    return self.num_labels == 1


class Hyper(NamedTuple):
  """A run's hyper-parameters that are arrays, so that the stacked runs may differ."""
  lr_scale: ArrayLike = 1.0  # Multiplies the updates: the run's lr_peak over the optimizer's.
  seed: ArrayLike = 0  # Dropout randomness: fold_in(key(seed), step).


def _logits(config: ClassifyConfig, params: PyTree, batch: PyTree, rng: jax.Array | None):
  dropout = {} if rng is None else {"rngs": {"dropout": rng}}
  return models.Classifier(config.model, config.num_labels).apply(
      {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
      deterministic=rng is None, **dropout)


def train_step(state: PyTree, batch: PyTree, hyper: Hyper, proceed: ArrayLike = True, *,
               config: ClassifyConfig, tx: optax.GradientTransformation
               ) -> tuple[PyTree, dict[str, jax.Array]]:
  """One update of every stacked run on its own batch ([runs, batch, seq] arrays; "weights"
  [runs, batch] marks the rows that count)."""
  def one_run(state, batch, hyper):
    rng = jax.random.fold_in(jax.random.key(hyper.seed), state["step"])

    def loss_fn(params):
      logits = _logits(config, params, batch, rng)
      return losses.classification_loss(logits, batch["labels"], batch["weights"]), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new_state, grad_norm, finite = optim.apply_update(
        state, grads, hyper.lr_scale, loss, tx=tx, frozen=config.frozen,
        stack_axis="runs" if config.stop_together else None, proceed=proceed)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
               "tokens": jnp.sum(batch["attention_mask"] > 0).astype(jnp.float32)}
    if not config.regression:
      metrics["accuracy"] = losses.classification_accuracy(logits, batch["labels"],
                                                           batch["weights"])
    return new_state, metrics
  return jax.vmap(one_run, axis_name="runs")(state, batch, hyper)


def predict(params: PyTree, batch: PyTree, *, config: ClassifyConfig) -> jax.Array:
  """Every stacked run's logits [runs, batch, num_labels] on one shared batch (no dropout)."""
  return jax.vmap(lambda p: _logits(config, p, batch, None))(params)


def jit_steps(config: ClassifyConfig, tx: optax.GradientTransformation, mesh: Mesh,
              state_shardings: PyTree):
  """The train step and the prediction, compiled with their shardings; the state is donated.

  The runs axis is replicated, the rows of every batch sharded over the data-parallel axes."""
  runs_batch = NamedSharding(mesh, P(None, sharding.BATCH_AXES))
  replicated = NamedSharding(mesh, P())
  train = optim.proceed_optional(jax.jit(
      functools.partial(train_step, config=config, tx=tx),
      in_shardings=(state_shardings, runs_batch, replicated, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=0), arity=3)
  evaluate = jax.jit(functools.partial(predict, config=config),
                     in_shardings=(state_shardings["params"], sharding.batch_sharding(mesh)),
                     out_shardings=replicated)
  return train, evaluate
