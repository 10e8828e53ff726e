"""Distillation, and the teacher's MLM adaptation: one run, or the runs of a fused sweep group.

`run(configs, workdirs)` trains one run, or several runs that share teacher, data, shapes and step
count (they may differ in `FUSABLE_KEYS`) stacked on a runs axis and trained by one compiled step.
Every run has its own workdir, a complete single-run workdir whichever way it was trained. This
file wires teacher, student, data and the distillation step to the loop (`distil_jax.loop`).

Sections: config and workdirs, teacher, models to train, data, mesh and sharded state, training,
export.
"""

import dataclasses
import json
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from distil_jax import (
  checkpoint,
  data,
  distill_step,
  errors,
  hf,
  hosts,
  loop,
  losses,
  models,
  optim,
  perf,
  resources,
  sharding,
  stacked,
  storage,
  student,
  tpu,
  validation,
)
from distil_jax import workdir as workdir_lib

# Keys in which fused runs may differ: the step takes them as arrays, or they only change the
# initial parameters. Any other difference needs a run (or a fused group) of its own.
FUSABLE_KEYS = ("distill.temperature", "distill.alpha_ce", "distill.alpha_mlm",
                "distill.alpha_cos", "distill.alpha_mse", "optim.lr_peak", "seed",
                "student.init", "student.layers", "student.fold_token_type",
                "student.copy_head_transform")


def fusion_key(config: ml_collections.ConfigDict) -> str:
  """Equal for configs whose runs can be fused: everything but `FUSABLE_KEYS`."""
  rest = {k: v for k, v in workdir_lib.flatten(config).items() if k not in FUSABLE_KEYS}
  return json.dumps(rest, sort_keys=True, default=str)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses, in one line, a config that cannot run: every rule of `validation.DISTILL_RULES`,
  then its student and sequences against the teacher's shape (read from its config.json alone;
  an adapted teacher keeps the shape of the one it adapts, whose config is checked too)."""
  validation.check(config, validation.DISTILL_RULES)
  teacher = teacher_shape(config)
  validation.check(config, validation.teacher_rules(teacher.num_layers, teacher.max_positions,
                                                    config.mode))
  if config.adapt_teacher is not None:
    check_config(config.adapt_teacher)


def teacher_shape(config: ml_collections.ConfigDict) -> models.ModelConfig:
  """The teacher's config as its checkpoint's config.json gives it, or as `models.PRESETS`
  knows it (a hub name, here without downloading anything)."""
  adapt = config.adapt_teacher
  name = adapt.teacher if adapt is not None else config.teacher
  if name in models.PRESETS and not epath.Path(name).exists():
    return models.PRESETS[name]
  return hf.read_config(teacher_checkpoint(config))[0]


def teacher_checkpoint(config: ml_collections.ConfigDict) -> epath.Path:
  """The HF directory the teacher's weights come from, before any adaptation (which keeps its
  shape and tokenizer)."""
  adapt = config.adapt_teacher
  name = adapt.teacher if adapt is not None else config.teacher
  return resources.minilm_dir() if name == "minilm" else hf.resolve(name)


def tokenizer_directory(config: ml_collections.ConfigDict) -> epath.Path:
  """The HF directory of the tokenizer: config.tokenizer, or the teacher's."""
  return epath.Path(config.tokenizer) if config.tokenizer else teacher_checkpoint(config)


def teacher_directory(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
  """The teacher's HF directory: adapted first by an MLM-only run into WORKDIR/teacher, if the
  config asks for it."""
  if config.adapt_teacher is not None:
    stage = workdir / "teacher"
    if not hosts.decide((stage / "export" / "config.json").exists):
      logging.info("Adapting the teacher with MLM training into %s.", stage)
      run([config.adapt_teacher], [stage])  # A preemption raises `errors.Preempted`.
    return stage / "export"
  return teacher_checkpoint(config)


def model_configs(config: ml_collections.ConfigDict, teacher: models.ModelConfig
                  ) -> tuple[models.ModelConfig, models.ModelConfig | None]:
  """(the trained model's config, the teacher's or None for an MLM-only run), from the config of
  the teacher's checkpoint (`hf.read_config`): the shapes and dtypes `load_models` gives."""
  teacher = dataclasses.replace(teacher, dtype=config.dtype)
  if config.mode == "mlm":
    return teacher, None
  layers = len(config.student.layers) or config.student.num_layers
  return (student.student_shape(teacher, layers),
          dataclasses.replace(teacher, param_dtype=config.teacher_param_dtype))


def load_models(configs: Sequence[ml_collections.ConfigDict], teacher_dir: epath.Path):
  """(model config, initial params of each run, teacher config or None, teacher params or None).

  The teacher is read once per distinct seed (a checkpoint without an MLM head gets a fresh one,
  seeded); a student is built from its teacher layers, or initialised at random."""
  config = configs[0]
  loaded = {}
  for c in configs:
    if c.seed not in loaded:
      loaded[c.seed] = hf.load_bert(teacher_dir, seed=c.seed)
  checkpoint_config, teacher_params = loaded[config.seed]
  model_config, teacher_config = model_configs(config, checkpoint_config)
  if config.mode == "mlm":
    return model_config, [loaded[c.seed][1] for c in configs], None, None
  students = [_student(c, dataclasses.replace(checkpoint_config, dtype=config.dtype),
                       teacher_params) for c in configs]
  teacher_params = jax.tree.map(lambda x: np.asarray(x, teacher_config.param_dtype),
                                teacher_params)
  return model_config, [params for _, params in students], teacher_config, teacher_params


def _student(config: ml_collections.ConfigDict, teacher_config: models.ModelConfig,
             teacher_params: dict) -> tuple[models.ModelConfig, dict]:
  layers = config.student.layers or student.every_other_layer(teacher_config.num_layers,
                                                              config.student.num_layers)
  student_config, params = student.student_from_teacher(
      teacher_config, teacher_params, layers, config.student.fold_token_type,
      config.student.copy_head_transform, config.seed)
  if config.student.init == "random":
    params = jax.tree.map(np.asarray, models.init_params(student_config, config.seed))
  return student_config, params


def step_config(configs: Sequence[ml_collections.ConfigDict], model: models.ModelConfig,
                teacher: models.ModelConfig | None,
                accum_steps: int | None = None) -> distill_step.StepConfig:
  """What the step of the runs `configs` (fused when several) computes."""
  config = configs[0]
  return distill_step.StepConfig(
      student=model, teacher=teacher, restrict_ce_to_mask=config.distill.restrict_ce_to_mask,
      gather_logits=config.distill.gather_logits,
      max_predictions=config.distill.max_predictions or distill_step.max_predictions(
          config.data.max_len, config.data.mask_prob),
      accum_steps=accum_steps or config.accum_steps, frozen=tuple(config.optim.frozen),
      num_runs=len(configs) if len(configs) > 1 else 0,
      mse=any(c.distill.alpha_mse for c in configs),
      stop_together=config.on_nonfinite == "stop", logit_chunk=config.distill.logit_chunk,
      teacher_flash_attention=config.distill.teacher_flash_attention,
      student_flash_attention=config.distill.student_flash_attention,
      logit_kernel=config.distill.logit_kernel)


def lowered(configs: Sequence[ml_collections.ConfigDict], model: models.ModelConfig,
            teacher: models.ModelConfig | None, mesh: jax.sharding.Mesh,
            steps: int, accum_steps: int | None = None,
            programs: Sequence[str] = ("train", "eval", "update")
            ) -> dict[str, jax.stages.Lowered]:
  """`programs` of the train step, eval step and update of `configs` lowered for `mesh`, on
  shapes alone (`distill_step.lower`)."""
  config = configs[0]
  tx, _ = optimizer(config, steps)
  return distill_step.lower(step_config(configs, model, teacher, accum_steps), tx, mesh,
                            config.data.batch_size, config.data.max_len,
                            projection=bool(config.distill.project_student_hidden and teacher),
                            programs=programs)


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Refuses a batch that the micro-batches and the data-parallel devices do not divide."""
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.data.batch_size % (config.accum_steps * devices):
    raise errors.ConfigError(
        f"data.batch_size={config.data.batch_size} must be a multiple of accum_steps="
        f"{config.accum_steps} times the data-parallel devices ({devices}): change one of them")


def check_fit(configs: Sequence[ml_collections.ConfigDict], model: models.ModelConfig,
              teacher: models.ModelConfig | None, mesh: jax.sharding.Mesh,
              steps: int, compile_fn) -> jax.stages.Compiled:
  """The train step of `configs` compiled for `mesh` (by `compile_fn`, `tpu.compile` for a
  slice or this machine's devices). A program whose buffers the devices cannot hold raises
  `tpu.DoesNotFit`: for a fused group at once (`sweep` splits it), for one run naming the
  smallest accum_steps that fits, found by compiling with twice, four times, ... as many
  micro-batches while they divide the rows."""
  try:
    return compile_fn(lowered(configs, model, teacher, mesh, steps, programs=("train",))["train"])
  except tpu.DoesNotFit as e:
    if len(configs) > 1:
      raise
    failure = e
  config = configs[0]
  rows = config.data.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
  accum = config.accum_steps
  while rows % (accum * 2) == 0:
    accum *= 2
    try:
      compile_fn(lowered(configs, model, teacher, mesh, steps, accum, ("train",))["train"])
    except tpu.DoesNotFit:
      continue
    raise tpu.DoesNotFit(failure.slice_name, failure.compiler_message,
                         f"--config.accum_steps={accum} fits (micro-batches of {rows // accum} "
                         "rows per device)")
  advice = ("not even micro-batches of one row per device fit: use more devices, or a smaller "
            "model or max_len" if rows == accum else
            f"micro-batches of {rows // accum} rows per device do not fit, and {rows // accum} "
            "rows do not halve: make data.batch_size the devices times a power of two, or use "
            "more devices, or a smaller model or max_len")
  raise tpu.DoesNotFit(failure.slice_name, failure.compiler_message, advice)


def loss_weights(config: ml_collections.ConfigDict) -> losses.LossWeights:
  """The run's temperature and loss weights, as float32 arrays."""
  d = config.distill
  return losses.LossWeights(
      temperature=jnp.float32(d.temperature), alpha_ce=jnp.float32(d.alpha_ce),
      alpha_mlm=jnp.float32(d.alpha_mlm), alpha_cos=jnp.float32(d.alpha_cos),
      alpha_mse=jnp.float32(d.alpha_mse))


def hyper(config: ml_collections.ConfigDict, lr_peak: float) -> distill_step.Hyper:
  """The run's step hyper-parameters, for an optimizer built with peak learning rate `lr_peak`."""
  return distill_step.Hyper(loss_weights(config), jnp.float32(config.optim.lr_peak / lr_peak),
                    jnp.int32(config.seed))


def total_steps(config: ml_collections.ConfigDict, train_sequences: int) -> int:
  """config.total_steps, or with config.epochs, the updates that make that many passes over
  the `train_sequences` (rounded up)."""
  if config.epochs:
    return math.ceil(config.epochs * train_sequences / config.data.batch_size)
  return config.total_steps


def optimizer(config: ml_collections.ConfigDict, steps: int):
  o = config.optim
  return optim.make_optimizer(
      total_steps=steps, lr_peak=o.lr_peak,
      warmup_steps=math.ceil(o.warmup_frac * steps), b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, clip_norm=o.clip_norm, frozen=o.frozen,
      lr_multipliers=o.lr_multipliers)


def run(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[epath.PathLike],
        names: Sequence[str] | None = None, allow_config_change: bool = False,
        resume_step: int | None = None) -> list[dict[str, float]]:
  """Trains the runs `configs` in `workdirs`; returns each run's final held-out metrics.

  Several runs must agree on everything but `FUSABLE_KEYS`; they are trained together, the
  teacher's forward computed once per batch for all of them. `names` label their log lines.
  Each workdir is locked while the run trains in it. A run resumes from its latest checkpoint
  that reads back, or from `resume_step` (later checkpoints are set aside: a rewind). Raises
  `errors.Preempted` when a preemption stopped it (it saved: call again to resume). Every config
  is checked (`check_config`) before anything is written.
  """
  for config in configs:
    check_config(config)
  if len({fusion_key(c) for c in configs}) > 1:
    raise errors.ConfigError(
        "runs trained together must differ only in " + ", ".join(FUSABLE_KEYS))
  workdirs = [storage.absolute(w) for w in workdirs]
  with workdir_lib.locked(workdirs):
    return _train(configs, workdirs, list(names) if names else [""] * len(configs),
                  allow_config_change, resume_step)


def _train(configs, workdirs, names, allow_config_change, resume_step) -> list[dict[str, float]]:
  # ---------------------------------------------------------------- Config and workdirs.
  config, num_runs = configs[0], len(configs)
  for c, w in zip(configs, workdirs, strict=True):
    hosts.decide(lambda c=c, w=w: workdir_lib.check_workdir(c, w, allow_config_change))
  workdir_lib.use_compilation_cache(workdirs[0])

  # ---------------------------------------------------------------- Teacher, models to train.
  teacher_dir = teacher_directory(config, workdirs[0])
  tokenizer_dir = tokenizer_directory(config)
  model_config, params, teacher_config, teacher_params = load_models(configs, teacher_dir)
  for w in workdirs:
    hosts.decide(lambda w=w: workdir_lib.check_model(w, model_config))
  logging.info("Training %s%s: %s parameters each (teacher: %s).",
               "a student" if teacher_config else "the teacher on MLM",
               f" x {num_runs} runs fused" if num_runs > 1 else "",
               f"{models.count_params(model_config):,}",
               f"{models.count_params(teacher_config):,}" if teacher_config else "none")

  # ---------------------------------------------------------------- Mesh, the step's fit.
  mesh = sharding.make_mesh(config.mesh_shape)
  check_batch(config, mesh)
  # Before any data: a program the devices cannot hold stops here, naming what fits. The loop
  # runs the program compiled here. With epochs, the steps are not known yet: the schedule's
  # length does not change the program's size, but the step is compiled again once they are.
  compile_here = lambda program: tpu.compile(program, jax.devices()[0].device_kind)
  compiled_step = check_fit(configs, model_config, teacher_config, mesh,
                            config.total_steps if not config.epochs else 1, compile_here)

  # ---------------------------------------------------------------- Data.
  peak_flops = perf.peak_flops_per_device()  # Measured on CPU: before the loader's threads run.
  datasets = data.make_datasets(config.data, tokenizer_dir, model_config.vocab_size)
  steps = total_steps(config, datasets.train_sequences)
  if config.epochs:
    logging.info("%g epochs of %d sequences: %d steps.", config.epochs,
                 datasets.train_sequences, steps)
    compiled_step = check_fit(configs, model_config, teacher_config, mesh, steps, compile_here)
  for w in workdirs:
    latest = hosts.decide(lambda w=w: max(checkpoint.saved_steps(w), default=0))
    if latest > steps:
      raise workdir_lib.WorkdirError(
          f"{w} has a checkpoint at step {latest}, past total_steps={steps}: export it "
          "with distil_jax.export, or use a new --workdir")
  if config.mode == "mlm" and not hf.has_mlm_head(teacher_dir):
    # Adam moves a parameter by about lr per step: a fresh head would need thousands of steps
    # to learn the label frequencies that its bias can simply start from.
    for p in params:
      p["mlm_head"]["bias"] = data.label_log_prior(datasets.token_counts,
                                                   config.data.mlm_smoothing)

  # ---------------------------------------------------------------- Sharded state, steps.
  step = step_config(configs, model_config, teacher_config)
  params = [{"student": p} for p in params]
  if config.distill.project_student_hidden and teacher_config:
    for p, c in zip(params, configs, strict=True):
      p["projection"] = distill_step.init_projection(model_config.hidden_size,
                                                     teacher_config.hidden_size, c.seed)
  tx, schedule = optimizer(config, steps)
  hypers = [hyper(c, config.optim.lr_peak) for c in configs]
  state, teacher, _, eval_step = distill_step.prepare(
      step, stacked.stack(params) if num_runs > 1 else params[0], teacher_params, tx, mesh)
  run_hyper = stacked.stack(hypers) if num_runs > 1 else hypers[0]
  del params, teacher_params
  batch_sharding = sharding.batch_sharding(mesh)
  for c, w in zip(configs, workdirs, strict=True):  # Valid: now the workdir is written.
    workdir_lib.write_config(w, c.to_dict())
    workdir_lib.write_model(w, model_config, tokenizer_dir)

  # ---------------------------------------------------------------- Training.
  place = lambda batch: data.global_batch(batch, batch_sharding)
  eval_batches = datasets.eval[:config.eval_batches or None]
  task = loop.Task(
      train_step=lambda state, batch, proceed: compiled_step(state, teacher, batch, run_hyper,
                                                             proceed),
      batches=datasets.train, place=place,
      evaluate=lambda params: distill_step.evaluate(eval_step, params, teacher,
                                                    map(place, eval_batches), step.num_runs),
      schedule=schedule,
      flops=lambda batch: jax.process_count() * perf.train_step_flops(  # Real tokens only.
          step, perf.batch_work(batch, perf.logits_at_masked(step))),
      peak_flops=peak_flops, num_runs=step.num_runs)
  quiet = lambda c: tuple(f"loss_{part}" for part in ("ce", "mlm", "cos", "mse")
                          if not c.distill[f"alpha_{part}"])
  runs = [loop.Run(name, w, c.optim.lr_peak / config.optim.lr_peak, quiet(c))
          for name, w, c in zip(names, workdirs, configs, strict=True)]
  result = loop.train(task, state, runs, workdirs, loop.Cadence.from_config(config, steps),
                      resume_step)

  # ---------------------------------------------------------------- Export.
  for i, w in enumerate(workdirs):
    if result.eval_metrics[i] and hosts.is_main():
      log_summary(names[i], steps if result.finished else None, result.eval_metrics[i])
    if config.export and result.finished:
      trained = stacked.take(result.state, i) if num_runs > 1 else result.state
      trained = multihost_utils.process_allgather(trained["params"]["student"], tiled=True)
      with hosts.together(f"exporting {w / 'export'}"):  # The others may read it next.
        if hosts.is_main():
          out = hf.export_hf(model_config, trained, w / "export", tokenizer_dir, source=str(w))
          logging.info("Exported to %s.", out)
          if config.fill_mask:
            fill_mask(out, config.fill_mask)
  return result.eval_metrics


def log_summary(name: str, step_index: int | None, eval_metrics: dict[str, float]) -> None:
  """One line comparing the student's held-out metrics with the teacher's."""
  m = eval_metrics
  where = f"at step {step_index}" if step_index is not None else "at the last evaluation"
  line = (f"{name + ': ' if name else ''}Held-out {where}: masked-token accuracy "
          f"{m['student_accuracy']:.3f}, perplexity {m['student_perplexity']:.1f}")
  if "teacher_accuracy" in m:
    ratio = (f"student at {m['student_accuracy'] / m['teacher_accuracy']:.0%} of the teacher's "
             "accuracy" if m["teacher_accuracy"] > 0 else "the teacher predicts nothing right")
    line += (f" (teacher {m['teacher_accuracy']:.3f} and {m['teacher_perplexity']:.1f}; {ratio}; "
             f"top-1 agreement {m['agreement']:.3f}, KL(T=1) {m['kl_t1']:.3f})")
  logging.info("%s", line)


def fill_mask(model_dir: epath.Path, text: str) -> None:
  """Prints the exported model's top completions of `text` (transformers' pipeline, torch)."""
  import transformers
  if not transformers.is_torch_available():
    logging.warning("fill-mask skipped: it runs the export in PyTorch, which is not installed "
                    "(pip install -r requirements-dev.txt)")
    return
  pipeline = transformers.pipeline("fill-mask", model=str(model_dir), device="cpu")
  guesses = ", ".join(f"{g['token_str']} ({g['score']:.2f})" for g in pipeline(text, top_k=5))
  logging.info("fill-mask %r -> %s", text, guesses)

