"""The train and eval steps rebuilt from their parts, to test `distil_jax.distill_step` against.

Full forwards (logits at every position, no gather, no micro-batches), masks read off the batch
(the attention mask, and the MLM labels != -100), the `losses` functions, and `jax.grad` of the
weighted total.
"""

import functools

import jax
import jax.numpy as jnp

from distil_jax import distill_step, losses, models


def forward(model: models.ModelConfig, params: dict, batch: dict, rng: jax.Array | None = None
            ) -> losses.Outputs:
  """Logits at every position and the last hidden states; dropout on when `rng` is given."""
  out = models.Encoder(model).apply(
      {"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=rng is None,
      rngs={} if rng is None else {"dropout": rng})
  return losses.Outputs(out.logits, out.hidden_states[-1])


def student_outputs(config: distill_step.StepConfig, params: dict, batch: dict,
                    rng: jax.Array | None = None) -> losses.Outputs:
  """The student's forward, its hidden states mapped by the projection (kernel, bias) if any."""
  out = forward(config.student, params["student"], batch, rng)
  if "projection" not in params:
    return out
  projection = params["projection"]
  return out._replace(hidden=out.hidden @ projection["kernel"] + projection["bias"])


def loss(params: dict, teacher_params: dict | None, batch: dict, weights: losses.LossWeights, *,
         config: distill_step.StepConfig, rng: jax.Array | None = None
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted total, and metrics: its parts ("loss_ce", "loss_mlm", "loss_cos", "loss_mse")
  and the masked-token accuracies ("student_accuracy", "teacher_accuracy")."""
  student = student_outputs(config, params, batch, rng)
  labels = batch["labels"]
  accuracy = lambda logits: jnp.divide(*losses.masked_accuracy(logits, labels))
  parts = {"loss_mlm": losses.mlm_loss(student.logits, labels)}
  if config.teacher is not None:
    teacher = forward(config.teacher, teacher_params, batch)
    real = batch["attention_mask"] > 0
    logits_mask = labels != losses.IGNORE_INDEX if config.restrict_ce_to_mask else real
    parts["loss_ce"] = losses.kd_loss(student.logits, teacher.logits, logits_mask,
                                      weights.temperature)
    parts["loss_mse"] = losses.mse_loss(student.logits, teacher.logits, logits_mask)
    parts["loss_cos"] = losses.cosine_loss(student.hidden, teacher.hidden, real)
  total = sum(getattr(weights, name.replace("loss", "alpha")) * value
              for name, value in parts.items())
  metrics = {**parts, "student_accuracy": accuracy(student.logits)}
  if config.teacher is not None:
    metrics["teacher_accuracy"] = accuracy(teacher.logits)
  return total, metrics


@functools.partial(jax.jit, static_argnames="config")  # Compiled once: eager takes 3x longer.
def gradient(params: dict, teacher_params: dict | None, batch: dict, weights: losses.LossWeights,
             *, config: distill_step.StepConfig, rng: jax.Array | None = None
             ) -> tuple[dict, dict[str, jax.Array]]:
  """(gradient of the total with respect to `params`, {"loss": total, metrics...})."""
  (total, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
      params, teacher_params, batch, weights, config=config, rng=rng)
  return grads, {"loss": total, **metrics}


def eval_sums(params: dict, teacher_params: dict | None, batch: dict, *,
              config: distill_step.StepConfig) -> dict[str, jax.Array]:
  """What `distill_step.eval_step` sums over the masked positions, from full forwards."""
  labels = batch["labels"]
  masked = labels != losses.IGNORE_INDEX
  count = jnp.sum(masked).astype(jnp.float32)
  student = student_outputs(config, params, batch)
  sums = {"count": count, "student_correct": losses.masked_accuracy(student.logits, labels)[0],
          "student_nll": losses.mlm_loss(student.logits, labels) * count}
  if config.teacher is not None:
    teacher = forward(config.teacher, teacher_params, batch)
    sums.update(
        teacher_correct=losses.masked_accuracy(teacher.logits, labels)[0],
        teacher_nll=losses.mlm_loss(teacher.logits, labels) * count,
        agreement=losses.top1_agreement(student.logits, teacher.logits, masked) * count,
        kl=losses.kd_loss(student.logits, teacher.logits, masked, 1.0) * count)
  return sums
