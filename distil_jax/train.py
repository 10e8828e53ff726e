"""The train loop of `main` (one run) and of `sweep` (the fused points of a sweep group).

`run(configs, workdirs)` trains one run, or several runs that share teacher, data, shapes and step
count (they may differ in `FUSABLE_KEYS`) stacked on a points axis and trained by one compiled
step. Every run has its own workdir, a complete single-run workdir whichever way it was trained.

Sections: config and workdirs, teacher, models to train, data, mesh and sharded state, resume,
train loop with evaluation and checkpoints, export.
"""

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

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
    errors,
    hf,
    hosts,
    losses,
    metrics,
    models,
    perf,
    points,
    resources,
    sharding,
    step,
    storage,
    student,
)

# Keys in which fused runs may differ: the step takes them as arrays, or they only change the
# initial parameters. Any other difference needs a run (or a fused group) of its own.
FUSABLE_KEYS = ("distill.temperature", "distill.alpha_ce", "distill.alpha_mlm",
                "distill.alpha_cos", "distill.alpha_mse", "optim.lr_peak", "seed",
                "student.init", "student.layers", "student.fold_token_type",
                "student.copy_head_transform")


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every leaf of `config` by its dotted key, e.g. {"distill.temperature": 2.0, ...}."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
    else:
      flat[key] = value
  return flat


def saved_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir` (its lists back to tuples, as config files write them)."""
  as_tuples = lambda v: ({k: as_tuples(x) for k, x in v.items()} if isinstance(v, dict)
                         else tuple(map(as_tuples, v)) if isinstance(v, list) else v)
  return ml_collections.ConfigDict(as_tuples(checkpoint.read_config(workdir)))


def fusion_key(config: ml_collections.ConfigDict) -> str:
  """Equal for configs whose runs can be fused: everything but `FUSABLE_KEYS`."""
  rest = {k: v for k, v in flatten(config).items() if k not in FUSABLE_KEYS}
  return json.dumps(rest, sort_keys=True, default=str)


def teacher_directory(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
  """The teacher's HF directory: adapted first by an MLM-only run into WORKDIR/teacher, if the
  config asks for it."""
  if config.adapt_teacher is not None:
    stage = workdir / "teacher"
    exported = lambda: hosts.decide((stage / "export" / "config.json").exists)
    if not exported():
      logging.info("Adapting the teacher with MLM training into %s.", stage)
      run([config.adapt_teacher], [stage])
    if not exported():  # Preempted: it saved a checkpoint.
      logging.info("The teacher adaptation in %s stopped early; start again to resume.", stage)
      sys.exit(0)
    return stage / "export"
  return resources.minilm_dir() if config.teacher == "minilm" else hf.resolve(config.teacher)


def load_models(configs: Sequence[ml_collections.ConfigDict], teacher_dir: epath.Path):
  """(model config, initial params of each run, teacher config or None, teacher params or None).

  The teacher is read once per distinct seed (a checkpoint without an MLM head gets a fresh one,
  seeded); a student is built from its teacher layers, or initialised at random."""
  config = configs[0]
  if config.mode not in ("distill", "mlm"):
    raise errors.ConfigError(f"config.mode={config.mode!r} is unknown: use 'distill' or 'mlm'")
  loaded = {}
  for c in configs:
    if c.seed not in loaded:
      loaded[c.seed] = hf.load_bert(teacher_dir, seed=c.seed)
  teacher_config, teacher_params = loaded[config.seed]
  teacher_config = dataclasses.replace(teacher_config, dtype=config.dtype)
  if config.mode == "mlm":
    return teacher_config, [loaded[c.seed][1] for c in configs], None, None
  students = [_student(c, teacher_config, teacher_params) for c in configs]
  student_config = students[0][0]
  teacher_config = dataclasses.replace(teacher_config, param_dtype=config.teacher_param_dtype)
  teacher_params = jax.tree.map(lambda x: np.asarray(x, teacher_config.param_dtype),
                                teacher_params)
  if (student_config.hidden_size != teacher_config.hidden_size and config.distill.alpha_cos
      and not config.distill.project_student_hidden):
    raise errors.ConfigError(f"student hidden size {student_config.hidden_size} differs from the "
                             f"teacher's {teacher_config.hidden_size}: set "
                             "distill.project_student_hidden=True or distill.alpha_cos=0")
  return student_config, [params for _, params in students], teacher_config, teacher_params


def _student(config: ml_collections.ConfigDict, teacher_config: models.ModelConfig,
             teacher_params: dict) -> tuple[models.ModelConfig, dict]:
  layers = config.student.layers or student.every_other_layer(teacher_config.num_layers,
                                                              config.student.num_layers)
  student_config, params = student.student_from_teacher(
      teacher_config, teacher_params, layers, config.student.fold_token_type,
      config.student.copy_head_transform, config.seed)
  if config.student.init == "random":
    params = jax.tree.map(np.asarray, models.init_params(student_config, config.seed))
  elif config.student.init != "teacher":
    raise errors.ConfigError(
        f"config.student.init={config.student.init!r} is unknown: use 'teacher' "
        "(the paper's initialisation from teacher layers) or 'random'")
  return student_config, params


def loss_weights(config: ml_collections.ConfigDict) -> losses.LossWeights:
  """The run's temperature and loss weights, as float32 arrays."""
  d = config.distill
  return losses.LossWeights(
      temperature=jnp.float32(d.temperature), alpha_ce=jnp.float32(d.alpha_ce),
      alpha_mlm=jnp.float32(d.alpha_mlm), alpha_cos=jnp.float32(d.alpha_cos),
      alpha_mse=jnp.float32(d.alpha_mse))


def hyper(config: ml_collections.ConfigDict, lr_peak: float) -> step.Hyper:
  """The run's step hyper-parameters, for an optimizer built with peak learning rate `lr_peak`."""
  return step.Hyper(loss_weights(config), jnp.float32(config.optim.lr_peak / lr_peak),
                    jnp.int32(config.seed))


def total_steps(config: ml_collections.ConfigDict, train_sequences: int) -> int:
  """config.total_steps, or with config.epochs, the updates that make that many passes over
  the `train_sequences` (rounded up)."""
  if config.epochs:
    return math.ceil(config.epochs * train_sequences / config.data.batch_size)
  return config.total_steps


def optimizer(config: ml_collections.ConfigDict, steps: int):
  o = config.optim
  return step.make_optimizer(
      total_steps=steps, lr_peak=o.lr_peak,
      warmup_steps=math.ceil(o.warmup_frac * steps), b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, clip_norm=o.clip_norm, frozen=o.frozen,
      lr_multipliers=o.lr_multipliers)


def evaluate(eval_step, params, teacher, batches, batch_sharding, num_runs: int
             ) -> list[dict[str, float]]:
  """Held-out metrics of each run over `batches` (sums accumulated on device, fetched once)."""
  sums = None
  for batch in batches:
    batch_sums = eval_step(params, teacher, data.global_batch(batch, batch_sharding))
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
  sums = jax.device_get(sums)
  if num_runs == 1:
    return [step.summarize_eval(jax.tree.map(float, sums))]
  return [step.summarize_eval({k: float(v[i]) for k, v in sums.items()})
          for i in range(num_runs)]


# Keys that may change when a run resumes: they change what is logged, saved or how the work is
# split, not the run's trajectory. Any other change is refused unless allow_config_change.
RESUMABLE_CHANGES = ("log_every_steps", "eval_every_steps", "eval_batches",
                     "checkpoint_every_steps", "keep_checkpoints", "export", "fill_mask",
                     "mesh_shape", "accum_steps", "on_nonfinite", "max_skipped_steps",
                     "data.read_threads", "data.data_dir", "data.tfds_data_dir",
                     "data.eval_batch_size")


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """The keys of `config` that differ from the `saved` config and alter the trajectory, each as
  "key: old -> new"."""
  as_json = lambda flat: {k: json.dumps(v, sort_keys=True) for k, v in flat.items()}
  old = as_json(flatten(ml_collections.ConfigDict(saved)))
  new = as_json(flatten(ml_collections.ConfigDict(json.loads(json.dumps(config.to_dict())))))
  return [f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
          for key in sorted(old.keys() | new.keys())
          if old.get(key) != new.get(key) and key not in RESUMABLE_CHANGES]


def check_workdir(config: ml_collections.ConfigDict, workdir: epath.Path,
                  allow_config_change: bool) -> None:
  """Refuses to resume a run in `workdir` with a config that changes its trajectory."""
  if not (workdir / "config.json").exists():
    return
  changes = config_changes(checkpoint.read_config(workdir), config)
  if changes and not allow_config_change:
    raise checkpoint.CheckpointError(
        f"{workdir} holds a run with another config ({'; '.join(changes[:4])}"
        f"{f'; and {len(changes) - 4} more' if len(changes) > 4 else ''}): use a new --workdir, "
        "or resume with the saved config (omit --config), or pass --allow_config_change")
  if changes:
    logging.warning("Resuming %s with a changed config: %s.", workdir, "; ".join(changes))


def check_model(workdir: epath.Path, model_config: models.ModelConfig) -> None:
  """Refuses a workdir whose checkpoints hold a model of another shape."""
  if not (workdir / "model.json").exists():
    return
  saved, _, _ = checkpoint.read_model(workdir)
  shape = lambda c: dataclasses.replace(c, dtype="", param_dtype="", hidden_dropout=0,
                                        attention_dropout=0)
  if shape(saved) != shape(model_config):
    raise checkpoint.CheckpointError(
        f"{workdir} holds a {_describe(saved)}, this config makes a {_describe(model_config)}: "
        "use a new --workdir")


def _describe(c: models.ModelConfig) -> str:
  kind = "DistilBERT student" if c.is_distilbert else "BERT"
  return (f"{c.num_layers}-layer {kind} (hidden {c.hidden_size}, {c.num_heads} heads, mlp "
          f"{c.intermediate_size}, vocab {c.vocab_size}, {c.max_positions} positions)")


def run(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[epath.PathLike],
        names: Sequence[str] | None = None, allow_config_change: bool = False,
        resume_step: int | None = None) -> list[dict[str, float]]:
  """Trains the runs `configs` in `workdirs`; returns each run's final held-out metrics.

  Several runs must agree on everything but `FUSABLE_KEYS`; they are trained together, the
  teacher's forward computed once per batch for all of them. `names` label their log lines.
  Each workdir is locked while the run trains in it. A run resumes from its latest checkpoint
  that reads back, or from `resume_step` (later checkpoints are set aside: a rewind).
  """
  if len({fusion_key(c) for c in configs}) > 1:
    raise errors.ConfigError(
        "runs trained together must differ only in " + ", ".join(FUSABLE_KEYS))
  workdirs = [storage.absolute(w) for w in workdirs]
  with checkpoint.locked(workdirs) as locks:
    return _train(configs, workdirs, list(names) if names else [""] * len(configs), locks,
                  allow_config_change, resume_step)


def _train(configs, workdirs, names, locks, allow_config_change, resume_step
           ) -> list[dict[str, float]]:
  # ---------------------------------------------------------------- Config and workdirs.
  config, num_runs = configs[0], len(configs)
  for c, workdir in zip(configs, workdirs, strict=True):
    hosts.decide(lambda c=c, workdir=workdir: check_workdir(c, workdir, allow_config_change))

  # ---------------------------------------------------------------- Teacher, models to train.
  teacher_dir = teacher_directory(config, workdirs[0])
  tokenizer_dir = epath.Path(config.tokenizer) if config.tokenizer else teacher_dir
  model_config, params, teacher_config, teacher_params = load_models(configs, teacher_dir)
  for workdir in workdirs:
    hosts.decide(lambda workdir=workdir: check_model(workdir, model_config))
  logging.info("Training %s%s: %s parameters each (teacher: %s).",
               "a student" if teacher_config else "the teacher on MLM",
               f" x {num_runs} runs fused" if num_runs > 1 else "",
               f"{models.count_params(model_config):,}",
               f"{models.count_params(teacher_config):,}" if teacher_config else "none")

  # ---------------------------------------------------------------- Data.
  peak_flops = perf.peak_flops_per_device()  # Measured on CPU: before the loader's threads run.
  datasets = data.make_datasets(config.data, tokenizer_dir, model_config.vocab_size)
  eval_batches = datasets.eval[:config.eval_batches or None]
  steps = total_steps(config, datasets.train_sequences)
  if config.epochs:
    logging.info("%g epochs of %d sequences: %d steps.", config.epochs,
                 datasets.train_sequences, steps)
  for workdir in workdirs:
    latest = hosts.decide(lambda workdir=workdir: max(checkpoint.saved_steps(workdir), default=0))
    if latest > steps:
      raise checkpoint.CheckpointError(
          f"{workdir} has a checkpoint at step {latest}, past total_steps={steps}: export it "
          "with distil_jax.export, or use a new --workdir")
  if config.mode == "mlm" and not hf.has_mlm_head(teacher_dir):
    # Adam moves a parameter by about lr per step: a fresh head would need thousands of steps
    # to learn the label frequencies that its bias can simply start from.
    for p in params:
      p["mlm_head"]["bias"] = data.label_log_prior(datasets.token_counts,
                                                   config.data.mlm_smoothing)

  # ---------------------------------------------------------------- Mesh, sharded state, steps.
  mesh = sharding.make_mesh(config.mesh_shape)
  if config.data.batch_size % (config.accum_steps * mesh.shape["data"] * mesh.shape["fsdp"]):
    raise errors.ConfigError(
        f"data.batch_size={config.data.batch_size} must be a multiple of accum_steps="
        f"{config.accum_steps} times the data-parallel devices "
        f"({mesh.shape['data'] * mesh.shape['fsdp']}): change one of them")
  step_config = step.StepConfig(
      student=model_config, teacher=teacher_config,
      restrict_ce_to_mask=config.distill.restrict_ce_to_mask,
      gather_logits=config.distill.gather_logits,
      max_predictions=config.distill.max_predictions or step.max_predictions(
          config.data.max_len, config.data.mask_prob),
      accum_steps=config.accum_steps, frozen=tuple(config.optim.frozen),
      num_points=num_runs if num_runs > 1 else 0,
      mse=any(c.distill.alpha_mse for c in configs))
  params = [{"student": p} for p in params]
  if config.distill.project_student_hidden and teacher_config:
    for p, c in zip(params, configs, strict=True):
      p["projection"] = step.init_projection(model_config.hidden_size,
                                             teacher_config.hidden_size, c.seed)
  tx, schedule = optimizer(config, steps)
  hypers = [hyper(c, config.optim.lr_peak) for c in configs]
  state, teacher, train_step, eval_step = step.prepare(
      step_config, points.stack(params) if num_runs > 1 else params[0], teacher_params, tx,
      mesh)
  run_hyper = points.stack(hypers) if num_runs > 1 else hypers[0]
  del params, teacher_params
  batch_sharding = sharding.batch_sharding(mesh)
  flops_per_step = perf.train_step_flops(step_config, config.data.batch_size,
                                         config.data.max_len)
  one_run = (lambda tree, i: tree) if num_runs == 1 else points.take

  for c, workdir in zip(configs, workdirs, strict=True):  # Valid: now the workdir is written.
    checkpoint.write_config(workdir, c.to_dict())
    checkpoint.write_model(workdir, model_config, tokenizer_dir)

  # ---------------------------------------------------------------- Resume.
  ckpts = [checkpoint.Checkpointer(w, save_every_steps=config.checkpoint_every_steps,
                                   keep_last=config.keep_checkpoints) for w in workdirs]
  first_step, restored = restore(ckpts, state, one_run, num_runs, resume_step)
  if restored:
    states = [s for s, _ in restored]
    state = states[0] if num_runs == 1 else points.put_back(
        states, jax.tree.map(lambda x: x.sharding, state))
    datasets.train.set_state(restored[0][1])
    logging.info("Resumed from step %d of %s.", first_step, ", ".join(map(str, workdirs)))

  # ---------------------------------------------------------------- Train loop.
  quiet = lambda c: [f"loss_{part}" for part in ("ce", "mlm", "cos", "mse")
                     if not c.distill[f"alpha_{part}"]]
  writers = [metrics.MetricWriter(w, steps, name, first_step, quiet(c))
             for w, name, c in zip(workdirs, names, configs, strict=True)]
  run_evaluate = lambda: evaluate(eval_step, state["params"], teacher, eval_batches,
                                  batch_sharding, num_runs)
  eval_metrics = [{}] * num_runs
  if first_step == 0:  # Where the students start, to see them close on the teacher.
    for writer, m in zip(writers, run_evaluate(), strict=True):
      writer.eval(0, m)
  elif first_step == steps:
    logging.info("The run is at its last step already.")
  tokens, skipped, diverged = 0.0, np.zeros(num_runs, int), None
  with checkpoint.PreemptionWatcher() as watcher:
    for step_index in range(first_step + 1, steps + 1):
      batch = data.global_batch(next(datasets.train), batch_sharding)
      state, train_metrics = train_step(state, teacher, batch, run_hyper)
      tokens = tokens + train_metrics["tokens"]  # Stays on device until the next log.
      for ckpt in ckpts:
        ckpt.check()  # A failed asynchronous save stops the run now.
      # Read every step (a few bytes): a non-finite update was not applied; say which part.
      finite = np.asarray(jax.device_get(train_metrics["finite"])).reshape(-1)
      if not finite.all():
        skipped += ~finite
        diverged = _nonfinite(config, step_index, train_metrics, finite, names, skipped)
      if step_index % config.log_every_steps == 0 or step_index == steps:
        fetched = jax.device_get((train_metrics, tokens))
        for i, writer in enumerate(writers):
          scalars = {k: float(np.asarray(v).reshape(-1)[i]) for k, v in fetched[0].items()}
          # The learning rate of this step's update (the schedule counts updates from 0).
          lr = float(schedule(step_index - 1)) * configs[i].optim.lr_peak / config.optim.lr_peak
          writer.train(step_index, {**scalars, "lr": lr, "skipped_steps": float(skipped[i])},
                       float(np.asarray(fetched[1]).reshape(-1)[i]), flops_per_step, peak_flops)
        tokens = 0.0
        if hosts.is_main():
          for lock in locks:
            lock.refresh()
      with metrics.paused(writers):
        eval_losses = [None] * num_runs
        if step_index % config.eval_every_steps == 0 or step_index == steps:
          eval_metrics = run_evaluate()
          for writer, m in zip(writers, eval_metrics, strict=True):
            writer.eval(step_index, m)
          eval_losses = [m["eval_loss"] for m in eval_metrics]
        stop = watcher.should_stop(step_index) or diverged is not None
        data_state = datasets.train.get_state()
        for i, ckpt in enumerate(ckpts):
          ckpt.save(step_index, one_run(state, i), data_state, eval_losses[i],
                    force=step_index == steps or stop)
        if stop:
          for ckpt in ckpts:
            ckpt.wait()
          if diverged is None:
            logging.info("Preempted: saved step %d; start again to resume.", step_index)
          break
  for ckpt in ckpts:
    ckpt.close()
  for writer in writers:
    writer.close()
  if diverged is not None:
    raise errors.Diverged(diverged)

  # ---------------------------------------------------------------- Export.
  finished = int(np.asarray(jax.device_get(state["step"])).reshape(-1)[0]) == steps
  for i, workdir in enumerate(workdirs):
    if eval_metrics[i] and hosts.is_main():
      log_summary(names[i], steps if finished else None, eval_metrics[i])
    if config.export and finished:
      trained = multihost_utils.process_allgather(one_run(state, i)["params"]["student"],
                                                  tiled=True)
      if hosts.is_main():
        out = hf.export_hf(model_config, trained, workdir / "export", tokenizer_dir,
                           source=str(workdir))
        logging.info("Exported to %s.", out)
        if config.fill_mask:
          fill_mask(out, config.fill_mask)
  hosts.barrier("exported")  # The others may read the export next (an adapted teacher).
  return eval_metrics


def restore(ckpts: Sequence[checkpoint.Checkpointer], state, one_run, num_runs: int,
             resume_step: int | None):
  """(step, [(state, data state) per run]) of the latest step that every run saved and every
  process reads back, or of `resume_step`; (0, None) for none.

  A corrupt or partial step is skipped with a warning. Steps after the one resumed from (corrupt,
  rewound to `resume_step`, or saved by some runs only) are set aside, not deleted, so that the
  run saves them again."""
  steps = hosts.decide(lambda: sorted(set.intersection(*(set(c.all_steps()) for c in ckpts)),
                                      reverse=True))
  if resume_step is not None:
    if resume_step not in steps:
      raise checkpoint.CheckpointError(
          f"--resume_step={resume_step} is not a checkpoint of {ckpts[0].directory} (every "
          f"run has steps {sorted(steps)}): pick one of them")
    steps = [resume_step]
  shardings = jax.tree.map(lambda x: x.sharding, state)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(one_run, state, 0),
      shardings if num_runs == 1 else points.one_point_shardings(shardings))
  resumed = None
  for step_index in steps:
    try:
      restored, ok = [c.restore(abstract, step_index) for c in ckpts], True
    except checkpoint.CorruptCheckpoint as e:
      logging.warning("%s: resuming from the previous checkpoint instead.", e)
      ok = False
    if hosts.all_true(ok):
      resumed = (step_index, restored)
      break
  if steps and resumed is None:
    raise checkpoint.CheckpointError(
        f"no checkpoint of {ckpts[0].directory} can be read back (steps {steps}): move them out "
        "of the way to start afresh, or use a new --workdir")
  first_step = resumed[0] if resumed else 0
  for ckpt in ckpts:
    for later in hosts.decide(lambda ckpt=ckpt: [s for s in ckpt.all_steps() if s > first_step]):
      where = ckpt.set_aside(later, f"after-{first_step}")
      logging.warning("Set checkpoint %d aside in %s: the run resumes from step %d.", later,
                      where, first_step)
  return resumed or (0, None)


def _nonfinite(config, step_index: int, train_metrics, finite: np.ndarray,
               names: Sequence[str], skipped: np.ndarray) -> str | None:
  """Logs the runs whose update at `step_index` was not finite (naming the offending part);
  returns why training must stop, or None to go on."""
  values = jax.device_get(train_metrics)
  for i in np.flatnonzero(~finite):
    value = lambda key, i=i: float(np.asarray(values[key]).reshape(-1)[i])
    parts = [f"{k}={value(k)}" for k in sorted(values) if k.startswith("loss")
             and not math.isfinite(value(k))]
    if not parts:
      parts = ([f"grad_norm={value('grad_norm')}"] if not math.isfinite(value("grad_norm"))
               else ["the updated parameters"])
    what = (f"{names[i] + ': ' if names[i] else ''}step {step_index} is not finite "
            f"({', '.join(parts)}); its update was not applied")
    if config.on_nonfinite == "stop":
      return (f"{what}; saved the last finite state as checkpoint {step_index}: lower "
              "optim.lr_peak and rewind to an earlier checkpoint (--resume_step=N "
              "--allow_config_change) or start a new --workdir")
    if config.on_nonfinite != "skip":
      raise errors.ConfigError(f"config.on_nonfinite={config.on_nonfinite!r} is unknown: use "
                               "'stop' or 'skip'")
    logging.warning("%s (skipped %d of at most %d).", what, skipped[i], config.max_skipped_steps)
    if skipped[i] > config.max_skipped_steps:
      return (f"{what}: {skipped[i]} steps skipped, more than max_skipped_steps="
              f"{config.max_skipped_steps}; saved the last good state as checkpoint "
              f"{step_index}: lower optim.lr_peak or check the data")
  return None


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

