r"""Fine-tunes a teacher or a student on a GLUE task: several seeds (and learning rates) stacked
in one compiled program.

  python -m distil_jax.finetune --config=experiments/glue.py --workdir=DIR \
      --config.task=sst2 --config.init=HF_DIR_OR_WORKDIR [--config.KEY=VALUE ...]

Every run (a seed, and a learning rate from `lr_peaks`) has its own classification head
initialisation, dropout and data order; all of them share one compiled step, one data pipeline
and one program (`distil_jax.classify_step`), trained by the loop of every command
(`distil_jax.loop`). The workdir holds `config.json`, `model.json`,
`checkpoints/` (every run, stacked; resumed like a distillation run), `<run>/metrics.jsonl` and
`<run>/tensorboard/` for each run (e.g. `seed0_lr2e-05`), and `results.json`: each run's final dev
metrics with their median, mean and spread. `python -m distil_jax.export --workdir=DIR
--out=HF_DIR --seed=K` writes a run as a HuggingFace sequence-classification directory.
"""

import dataclasses
import functools
import itertools
import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, logging
from etils import epath

from distil_jax import (
  classify_step,
  cli,
  errors,
  glue_metrics,
  hf,
  hosts,
  loop,
  models,
  optim,
  perf,
  sharding,
  stacked,
  storage,
  validation,
)
from distil_jax import workdir as workdir_lib
from distil_jax.data import glue, load_tokenizer


@dataclasses.dataclass(frozen=True)
class Run:
  seed: int
  lr_peak: float

  @property
  def name(self) -> str:
    return f"seed{self.seed}_lr{self.lr_peak:g}"


def runs_of(config: ml_collections.ConfigDict) -> list[Run]:
  """The stacked runs: every seed with every learning rate."""
  return [Run(seed, lr) for lr, seed in itertools.product(config.lr_peaks, config.seeds)]


def summarize(per_run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
  """Median, mean, sample standard deviation, min and max of each metric over the runs."""
  names = next(iter(per_run.values())).keys()
  summary = {}
  for name in names:
    values = [m[name] for m in per_run.values()]
    summary[name] = {"median": statistics.median(values), "mean": statistics.fmean(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "min": min(values), "max": max(values), "runs": len(values)}
  return summary


def finetune(config: ml_collections.ConfigDict, workdir: epath.PathLike,
             allow_config_change: bool = False) -> dict[str, Any]:
  """Fine-tunes every run of `config` in `workdir`; returns results.json's content ({} if it
  stopped early). Raises `errors.Preempted` when a preemption stopped it (it saved)."""
  validation.check(config, validation.FINETUNE_RULES)
  workdir = storage.absolute(workdir)
  with workdir_lib.locked([workdir]):
    return _finetune(config, workdir, allow_config_change)


def _finetune(config, workdir: epath.Path, allow_config_change: bool) -> dict[str, Any]:
  # ---------------------------------------------------------------- Config, model, data.
  hosts.decide(lambda: workdir_lib.check_workdir(config, workdir, allow_config_change))
  workdir_lib.use_compilation_cache(workdir)
  if not config.init:
    raise errors.ConfigError("config.init is empty: give the model to fine-tune, a HuggingFace "
                             "directory or a distil_jax workdir (--config.init=DIR)")
  runs = runs_of(config)
  init_dir = workdir_lib.model_directory(config.init)
  task = glue.get_task(config.task)
  loaded = [hf.load_bert(init_dir, seed=r.seed, num_labels=task.num_labels) for r in runs]
  model_config = dataclasses.replace(loaded[0][0], dtype=config.dtype)
  validation.check(config, [validation.integer("max_len", 3, model_config.max_positions)])
  tokenizer = load_tokenizer(init_dir, model_config.vocab_size)
  load = functools.partial(glue.load_split, task, tokenizer=tokenizer, max_len=config.max_len,
                           glue_dir=config.data_dir or None, tfds_data_dir=config.tfds_data_dir)
  peak_flops = perf.peak_flops_per_device()
  train_data = load("train", max_examples=config.max_train_examples or None)
  eval_data = {split: load(split) for split in task.eval_splits}
  total_steps = math.ceil(config.epochs * glue.steps_per_epoch(len(train_data),
                                                                config.batch_size))
  logging.info("Fine-tuning %s (%s parameters) on %s: %d train examples, %d runs stacked (%s), "
               "%d steps.", init_dir, f"{models.count_params(model_config):,}", config.task,
               len(train_data), len(runs), ", ".join(r.name for r in runs), total_steps)

  # ---------------------------------------------------------------- Mesh, sharded state, steps.
  mesh = sharding.make_mesh(config.mesh_shape)
  step_config = classify_step.ClassifyConfig(
      model=model_config, num_labels=task.num_labels, stop_together=config.on_nonfinite == "stop")
  tx, schedule = optim.make_optimizer(
      total_steps=total_steps, lr_peak=runs[0].lr_peak,
      warmup_steps=math.ceil(config.warmup_frac * total_steps), b1=config.b1, b2=config.b2,
      eps=config.eps, weight_decay=config.weight_decay, clip_norm=config.clip_norm)
  shardings = sharding.stacked(sharding.param_shardings(
      models.abstract_params(model_config, task.num_labels), mesh))
  state, state_shardings = optim.create_state(
      stacked.stack([params for _, params in loaded]), tx, shardings, mesh, num_runs=len(runs))
  hyper = stacked.stack([classify_step.Hyper(lr_scale=np.float32(r.lr_peak / runs[0].lr_peak),
                                             seed=np.int32(r.seed)) for r in runs])
  train_step, predict = classify_step.jit_steps(step_config, tx, mesh, state_shardings)
  workdir_lib.write_config(workdir, config.to_dict())
  workdir_lib.write_model(workdir, model_config, init_dir, task=config.task,
                          num_labels=task.num_labels, labels=list(task.label_names),
                          runs=[{**dataclasses.asdict(r), "name": r.name} for r in runs])

  # ---------------------------------------------------------------- Training.
  runs_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      None, sharding.BATCH_AXES))
  local = config.batch_size // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)

  def place(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    batch = {**batch, "weights": np.ones(batch["labels"].shape, np.float32)}
    return {name: jax.make_array_from_process_local_data(runs_batch, x[:, rows])
            for name, x in batch.items()}

  fit = loop.Task(
      train_step=lambda state, batch, proceed: train_step(state, batch, hyper, proceed),
      batches=glue.TrainBatches(train_data, config.batch_size, [r.seed for r in runs],
                                config.buckets),
      place=place,
      evaluate=lambda params: evaluate(predict, params, eval_data, task, config, mesh),
      schedule=schedule,
      flops=lambda batch: perf.classify_step_flops(model_config, perf.batch_work(batch, False)),
      peak_flops=peak_flops, num_runs=len(runs))
  result = loop.train(
      fit, state,
      [loop.Run(r.name, workdir / r.name, r.lr_peak / runs[0].lr_peak) for r in runs],
      [workdir], loop.Cadence.from_config(config, total_steps, keep_best=False,
                                          eval_at_start=False))

  # ---------------------------------------------------------------- Results.
  if not result.finished:
    return {}
  per_run = {r.name: m for r, m in zip(runs, result.eval_metrics, strict=True)}
  results = {"task": config.task, "init": str(init_dir), "steps": total_steps,
             "train_examples": len(train_data), "runs": per_run, "summary": summarize(per_run)}
  if hosts.is_main():
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, s in results["summary"].items():
      logging.info("%s dev %s: median %.4f, mean %.4f, std %.4f, min %.4f, max %.4f over %d runs",
                   config.task, name, s["median"], s["mean"], s["std"], s["min"], s["max"],
                   s["runs"])
  return results


def evaluate(predict, params, eval_data: dict[str, glue.Encoded], task: glue.Task, config,
             mesh) -> list[dict[str, float]]:
  """Each run's GLUE metrics on the eval splits (prefixed by the split when there are several,
  as MNLI's matched and mismatched)."""
  per_run = [{} for _ in range(jax.tree.leaves(params)[0].shape[0])]
  local = config.batch_size // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  for split, data in eval_data.items():
    logits = []
    for batch in glue.eval_batches(data, config.batch_size, config.buckets):
      keep = batch.pop("weights") > 0
      on_mesh = {name: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh),
                                                              x[rows])
                 for name, x in batch.items() if name != "labels"}
      logits.append(np.asarray(jax.device_get(predict(params, on_mesh)))[:, keep])
    logits = np.concatenate(logits, axis=1)
    prefix = f"{split}_" if len(eval_data) > 1 else ""
    for run_metrics, run_logits in zip(per_run, logits, strict=True):
      run_metrics.update({prefix + k: v for k, v in glue_metrics.task_metrics(
          task, run_logits, data.labels).items()})
  return per_run


def main(argv: Sequence[str]) -> None:
  del argv
  if cli.WORKDIR.value is None or cli.CONFIG.value is None:
    raise app.UsageError("--config and --workdir are required, e.g. "
                         "--config=experiments/glue.py --workdir=DIR --config.init=HF_DIR")
  finetune(cli.CONFIG.value, cli.WORKDIR.value, cli.ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
  cli.run(main)
