r"""Compiles an experiment's train and eval steps for a TPU slice, on any machine with libtpu.

  python -m distil_jax.compile --config=experiments/bert_base.py --slice=v4-32 \
      [--runs=8] [--config.KEY=VALUE ...] [--json_out=FILE]

The real TPU compiler builds the steps that `main` would run on the slice (a fused sweep group of
`--runs` runs with --runs), from the teacher's config.json alone: no weights, no data. Prints, per
chip: the memory the compiler assigns (arguments, outputs, temporaries, code) against the chip's
usable HBM, XLA's FLOPs and bytes of a step (the micro-batch loop counted as many times as it
runs), the roofline bound, the best-case MFU and tokens/s at it (`tpu.Report`: a bound, not a
measurement). A program that does not fit ends in one FATAL line naming the smallest
accum_steps that does. The slices: `distil_jax.tpu.SLICES`; docs/tpu.md.
"""

import json

import jax
import ml_collections
from absl import app, flags
from etils import epath

from distil_jax import cli, perf, sharding, tpu, train

_SLICE = flags.DEFINE_string("slice", None, "The TPU slice, e.g. v4-32, v5e-8, v5p-8, v6e-8.")
_RUNS = flags.DEFINE_integer("runs", 1, "Runs of a fused sweep group stacked in the program.")


def compile_for_slice(config: ml_collections.ConfigDict, slice_name: str, runs: int = 1
                      ) -> dict[str, tpu.Report]:
  """The train and eval steps of `config` (`runs` of them fused) compiled for `slice_name`, as
  `tpu.Report`s; raises `tpu.DoesNotFit` (naming what fits) when the train step does not fit."""
  train.check_config(config)
  model, teacher = train.model_configs(config, train.teacher_shape(config))
  configs = [config] * runs
  mesh = sharding.make_mesh(config.mesh_shape, devices=tpu.devices(slice_name))
  train.check_batch(config, mesh)
  build = lambda program: tpu.compile(program, slice_name)
  compiled_train = train.check_fit(configs, model, teacher, mesh, config.total_steps, build)
  programs = train.lowered(configs, model, teacher, mesh, config.total_steps,
                           programs=("eval", "update"))  # The train step: compiled above.
  step = train.step_config(configs, model, teacher)
  chips = tpu.get_slice(slice_name).chips
  tokens = config.data.batch_size * config.data.max_len
  useful = perf.train_step_flops(step, perf.full_rows(step, config.data.batch_size,
                                                      config.data.max_len)) / chips
  return {
      "train": tpu.analyze(compiled_train, slice_name, loop_trips=step.accum_steps,
                           loop_free_cost=tpu.Cost.of(build(programs["update"])),
                           useful_flops=useful, tokens_per_step=tokens),
      "eval": tpu.analyze(build(programs["eval"]), slice_name, loop_trips=step.accum_steps),
  }


def main(argv) -> None:
  del argv
  jax.config.update("jax_platforms", "cpu")  # The slice's devices are compile-only.
  if cli.CONFIG.value is None or not _SLICE.value:
    raise app.UsageError("--config and --slice are required, e.g. "
                         "--config=experiments/bert_base.py --slice=v4-32")
  reports = compile_for_slice(cli.CONFIG.value, _SLICE.value, _RUNS.value)
  for name, report in reports.items():
    print(f"\n{name} step" + (f", {_RUNS.value} runs fused" if _RUNS.value > 1 else ""))
    print(tpu.format_table([report]))
  if cli.JSON_OUT.value:
    epath.Path(cli.JSON_OUT.value).write_text(json.dumps(
        {name: r.as_dict() for name, r in reports.items()}, indent=2) + "\n")


if __name__ == "__main__":
  cli.run(main)
