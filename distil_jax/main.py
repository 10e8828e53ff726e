r"""Distils a BERT teacher into a DistilBERT student (or trains a teacher on MLM alone).

  python -m distil_jax.main --config=experiments/tiny.py --workdir=workdirs/tiny \
      [--config.distill.temperature=4 ...]

Sections: config and workdir, teacher, model to train, mesh and sharded state, data, steps,
resume, train loop with evaluation and checkpoints, export. Starting again on a workdir with a
checkpoint resumes from it; SIGTERM (a TPU preemption) saves and exits cleanly.
"""

import dataclasses
import logging as std_logging
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from distil_jax import (
    checkpoint,
    data,
    hf,
    losses,
    metrics,
    models,
    perf,
    resources,
    sharding,
    step,
    student,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host pods).")


def teacher_directory(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """The teacher's HF directory: adapted first by an MLM-only run, if the config asks for it."""
  if config.adapt_teacher is not None:
    stage = workdir / "teacher"
    exported = lambda: (stage / "export" / "config.json").exists()
    if not exported():
      logging.info("Adapting the teacher with MLM training into %s.", stage)
      train_and_evaluate(config.adapt_teacher, stage)
    if not exported():  # Preempted: it saved a checkpoint.
      logging.info("The teacher adaptation in %s stopped early; start again to resume.", stage)
      sys.exit(0)
    return stage / "export"
  return resources.minilm_dir() if config.teacher == "minilm" else hf.resolve(config.teacher)


def load_models(config: ml_collections.ConfigDict, teacher_dir: pathlib.Path):
  """(model config, initial params, teacher config or None, teacher params or None)."""
  teacher_config, teacher_params = hf.load_bert(teacher_dir, seed=config.seed)
  teacher_config = dataclasses.replace(teacher_config, dtype=config.dtype)
  if config.mode == "mlm":
    return teacher_config, teacher_params, None, None
  if config.mode != "distill":
    raise ValueError(f"config.mode={config.mode!r} is unknown: use 'distill' or 'mlm'")
  layers = config.student.layers or student.every_other_layer(teacher_config.num_layers,
                                                              config.student.num_layers)
  student_config, student_params = student.student_from_teacher(
      teacher_config, teacher_params, layers, config.student.fold_token_type)
  teacher_config = dataclasses.replace(teacher_config, param_dtype=config.teacher_param_dtype)
  teacher_params = jax.tree.map(lambda x: np.asarray(x, teacher_config.param_dtype),
                                teacher_params)
  if (student_config.hidden_size != teacher_config.hidden_size and config.distill.alpha_cos
      and not config.distill.project_student_hidden):
    raise ValueError(f"student hidden size {student_config.hidden_size} differs from the "
                     f"teacher's {teacher_config.hidden_size}: set "
                     "distill.project_student_hidden=True or distill.alpha_cos=0")
  return student_config, student_params, teacher_config, teacher_params


def loss_weights(config: ml_collections.ConfigDict) -> losses.LossWeights:
  d = config.distill
  return losses.LossWeights(*(jnp.float32(x) for x in (
      d.temperature, d.alpha_ce, d.alpha_mlm, d.alpha_cos, d.alpha_mse)))


def optimizer(config: ml_collections.ConfigDict):
  o = config.optim
  return step.make_optimizer(
      total_steps=config.total_steps, lr_peak=o.lr_peak,
      warmup_steps=int(o.warmup_frac * config.total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, clip_norm=o.clip_norm, frozen=o.frozen,
      lr_multipliers=o.lr_multipliers)


def evaluate(eval_step, params, teacher, batches, batch_sharding) -> dict[str, float]:
  """Held-out metrics over `batches` (sums accumulated on device, fetched once)."""
  sums = None
  for batch in batches:
    batch_sums = eval_step(params, teacher, data.global_batch(batch, batch_sharding))
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
  return step.summarize_eval(jax.tree.map(float, jax.device_get(sums)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, float]:
  """Runs the experiment `config` in `workdir`; returns the final held-out metrics."""
  # ---------------------------------------------------------------- Config and workdir.
  workdir = pathlib.Path(workdir)
  checkpoint.write_config(workdir, config.to_dict())

  # ---------------------------------------------------------------- Teacher, model to train.
  teacher_dir = teacher_directory(config, workdir)
  tokenizer_dir = pathlib.Path(config.tokenizer) if config.tokenizer else teacher_dir
  model_config, params, teacher_config, teacher_params = load_models(config, teacher_dir)
  logging.info("Training %s: %s parameters (teacher: %s).",
               "a student" if teacher_config else "the teacher on MLM",
               f"{models.count_params(model_config):,}",
               f"{models.count_params(teacher_config):,}" if teacher_config else "none")
  checkpoint.write_model(workdir, model_config, tokenizer_dir)

  # ---------------------------------------------------------------- Data.
  peak_flops = perf.peak_flops_per_device()  # Measured on CPU: before the loader's threads run.
  datasets = data.make_datasets(config.data, tokenizer_dir, model_config.vocab_size)
  eval_batches = datasets.eval[:config.eval_batches or None]
  if config.mode == "mlm" and not hf.has_mlm_head(teacher_dir):
    # Adam moves a parameter by about lr per step: a fresh head would need thousands of steps
    # to learn the label frequencies that its bias can simply start from.
    params["mlm_head"]["bias"] = data.label_log_prior(datasets.token_counts,
                                                      config.data.mlm_smoothing)

  # ---------------------------------------------------------------- Mesh, sharded state, steps.
  mesh = sharding.make_mesh(config.mesh_shape)
  if config.data.batch_size % (config.accum_steps * mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"data.batch_size={config.data.batch_size} must be a multiple of "
                     f"accum_steps={config.accum_steps} times the data-parallel devices "
                     f"({mesh.shape['data'] * mesh.shape['fsdp']}): change one of them")
  step_config = step.StepConfig(
      student=model_config, teacher=teacher_config,
      restrict_ce_to_mask=config.distill.restrict_ce_to_mask,
      gather_logits=config.distill.gather_logits,
      max_predictions=config.distill.max_predictions or step.max_predictions(
          config.data.max_len, config.data.mask_prob),
      accum_steps=config.accum_steps)
  params = {"student": params}
  if config.distill.project_student_hidden and teacher_config:
    params["projection"] = step.init_projection(model_config.hidden_size,
                                                teacher_config.hidden_size, config.seed)
  tx, schedule = optimizer(config)
  state, teacher, train_step, eval_step = step.prepare(step_config, params, teacher_params, tx,
                                                        mesh)
  del params, teacher_params
  batch_sharding = sharding.batch_sharding(mesh)
  hyper = step.Hyper(loss_weights(config), jnp.float32(1.0), jnp.int32(config.seed))
  flops_per_step = perf.train_step_flops(step_config, config.data.batch_size,
                                         config.data.max_len)

  # ---------------------------------------------------------------- Resume.
  ckpt = checkpoint.Checkpointer(workdir, save_every_steps=config.checkpoint_every_steps,
                                 keep_last=config.keep_checkpoints)
  first_step = 0
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    state, data_state = ckpt.restore(abstract)
    datasets.train.set_state(data_state)
    first_step = int(state["step"])
    logging.info("Resumed from step %d of %s.", first_step, workdir)

  # ---------------------------------------------------------------- Train loop.
  writer = metrics.MetricWriter(workdir, config.total_steps)
  eval_metrics = {}
  if first_step == 0:  # Where the student starts, to see it close on the teacher.
    writer.eval(0, evaluate(eval_step, state["params"], teacher, eval_batches, batch_sharding))
  tokens = 0.0
  with checkpoint.PreemptionWatcher() as watcher:
    for step_index in range(first_step + 1, config.total_steps + 1):
      batch = data.global_batch(next(datasets.train), batch_sharding)
      state, train_metrics = train_step(state, teacher, batch, hyper)
      tokens = tokens + train_metrics["tokens"]  # Stays on device until the next log.
      if step_index % config.log_every_steps == 0 or step_index == config.total_steps:
        scalars = {k: float(v) for k, v in jax.device_get(train_metrics).items()}
        if not math.isfinite(scalars["loss"]):
          raise FloatingPointError(f"loss is {scalars['loss']} at step {step_index}: lower "
                                   "optim.lr_peak or check the data; the last checkpoint is safe")
        writer.train(step_index, {**scalars, "lr": float(schedule(step_index))}, float(tokens),
                     flops_per_step, peak_flops)
        tokens = 0.0
      with writer.paused():
        eval_loss = None
        if step_index % config.eval_every_steps == 0 or step_index == config.total_steps:
          eval_metrics = evaluate(eval_step, state["params"], teacher, eval_batches,
                                  batch_sharding)
          writer.eval(step_index, eval_metrics)
          eval_loss = eval_metrics["eval_loss"]
        ckpt.save(step_index, state, datasets.train.get_state(), eval_loss,
                  force=step_index == config.total_steps)
        if watcher.should_stop(step_index):
          ckpt.save(step_index, state, datasets.train.get_state(), force=True)
          ckpt.wait()
          logging.info("Preempted: saved step %d; start again to resume.", step_index)
          break
  ckpt.close()
  writer.close()

  # ---------------------------------------------------------------- Export.
  finished = int(state["step"]) == config.total_steps
  if eval_metrics:
    log_summary(int(state["step"]), eval_metrics)
  if config.export and finished:
    trained = multihost_utils.process_allgather(state["params"]["student"], tiled=True)
    if jax.process_index() == 0:
      out = hf.export_hf(model_config, trained, workdir / "export", tokenizer_dir)
      logging.info("Exported to %s.", out)
      if config.fill_mask:
        fill_mask(out, config.fill_mask)
  return eval_metrics


def log_summary(step_index: int, eval_metrics: dict[str, float]) -> None:
  """One line comparing the student's held-out metrics with the teacher's."""
  m = eval_metrics
  line = (f"Held-out at step {step_index}: masked-token accuracy {m['student_accuracy']:.3f}, "
          f"perplexity {m['student_perplexity']:.1f}")
  if "teacher_accuracy" in m:
    line += (f" (teacher {m['teacher_accuracy']:.3f} and {m['teacher_perplexity']:.1f}; student "
             f"at {m['student_accuracy'] / max(m['teacher_accuracy'], 1e-9):.0%} of the "
             f"teacher's accuracy; top-1 agreement {m['agreement']:.3f}, KL(T=1) "
             f"{m['kl_t1']:.3f})")
  logging.info("%s", line)


def fill_mask(model_dir: pathlib.Path, text: str) -> None:
  """Prints the exported model's top completions of `text` (transformers' pipeline, torch)."""
  import transformers
  if not transformers.is_torch_available():
    logging.warning("fill-mask skipped: it runs the export in PyTorch, which is not installed "
                    "(pip install -r requirements-dev.txt)")
    return
  pipeline = transformers.pipeline("fill-mask", model=str(model_dir), device="cpu")
  guesses = ", ".join(f"{g['token_str']} ({g['score']:.2f})" for g in pipeline(text, top_k=5))
  logging.info("fill-mask %r -> %s", text, guesses)


class _OwnLogs(std_logging.Filter):
  """Keeps this package's INFO lines and every warning; libraries' INFO chatter is dropped."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "distil_jax" in record.pathname


def main(argv) -> None:
  del argv
  logging.get_absl_handler().addFilter(_OwnLogs())
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required: the directory for checkpoints and exports")
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for an unknown --config.KEY override."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # How ml_collections refuses an unknown key.
    key = (re.findall(r"\w+", str(e).split("Did you mean")[0]) or ["?"])[0]
    hint = re.search(r'Did you mean "(\w+)"', str(e))
    sys.exit(f"FATAL unknown config key {key!r} in the overrides"
             + (f': did you mean "{hint[1]}"?' if hint else "")
             + " (the keys are in experiments/common.py)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
