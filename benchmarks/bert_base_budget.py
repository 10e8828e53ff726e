r"""What experiments/bert_base.py costs: TPU time by the FLOP count, and memory per device.

  .venv/bin/python -m benchmarks.bert_base_budget [--devices=16 --mfu=0.4]

Time: the step's FLOPs (`perf.train_step_flops`: teacher forward, student forward and backward,
L_ce over every token as configured) times the steps of 3 epochs over the original's corpus
(3.3B words, about 1.3 WordPiece tokens each, in sequences of 512 filled to 100% or 70%), at an
assumed MFU on a v4-32 (16 chips of 275 TFLOP/s in bf16).

bert_base.py trains on 4096 sequences of 512 per update, in 16 micro-batches, bf16, on a slice
of `devices` data-parallel devices: each device holds 4096 / devices rows per step. This
compiles, for one device's share (abstract arrays: nothing is allocated), the train step and the
eval step, the eval both in micro-batches as training splits the batch (what the program does)
and at once (what it did before), and prints XLA's memory analysis of each (CPU backend: the
sizes of arguments, outputs and temporaries; a TPU's differ, the ratios are what to read).
"""

import dataclasses

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import linen as nn

from distil_jax import distill_step, losses, models, optim, perf
from experiments import bert_base

_DEVICES = flags.DEFINE_integer("devices", 16, "Data-parallel devices of the slice.")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilisation.")
CORPUS_TOKENS = 3.3e9 * 1.3  # The original's Wikipedia + Toronto Books, in WordPiece tokens.


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def main(argv) -> None:
  del argv
  config = bert_base.get_config()
  rows = config.data.batch_size // _DEVICES.value
  teacher = dataclasses.replace(models.PRESETS["bert-base-uncased"], dtype=config.dtype,
                                param_dtype=config.teacher_param_dtype)
  student_config = dataclasses.replace(teacher, num_layers=6, type_vocab_size=0,
                                       param_dtype="float32")
  teacher_params = nn.meta.unbox(models.abstract_params(teacher))
  student_params = nn.meta.unbox(models.abstract_params(student_config))
  tx, _ = optim.make_optimizer(total_steps=10, lr_peak=1e-4, warmup_steps=1)
  state = jax.eval_shape(lambda p: optim.init_state({"student": p}, tx), student_params)
  seq = config.data.max_len
  batch = {name: jax.ShapeDtypeStruct((rows, seq), jnp.int32)
           for name in ("input_ids", "attention_mask", "labels")}
  hyper = abstract(distill_step.Hyper(losses.LossWeights(*[jnp.float32(1)] * 5),
                                      jnp.float32(1), jnp.int32(0)))
  make = lambda accum: distill_step.StepConfig(
      student=dataclasses.replace(student_config, dtype=config.dtype), teacher=teacher,
      max_predictions=distill_step.max_predictions(seq, config.data.mask_prob), accum_steps=accum,
      mse=bool(config.distill.alpha_mse))
  flops = perf.train_step_flops(make(config.accum_steps), config.data.batch_size, seq)
  print(f"{flops / 1e15:.2f} PFLOP per step of {config.data.batch_size} x {seq}")
  for fill in (1.0, 0.7):
    steps = config.epochs * CORPUS_TOKENS / ((seq - 2) * fill) / config.data.batch_size
    hours = flops * steps / (16 * perf.PEAK_FLOPS["TPU v4"] * _MFU.value) / 3600
    print(f"{config.epochs:g} epochs, sequences {fill:.0%} full: {steps:,.0f} steps, "
          f"{hours:.1f} h on a v4-32 at {_MFU.value:.0%} MFU ({16 * hours:.0f} chip-hours)")
  print(f"\nbert_base.py on {_DEVICES.value} devices: {rows} rows of {seq} per device per step, "
        f"{config.accum_steps} micro-batches of {rows // config.accum_steps}\n")
  print("| compiled step | arguments (GiB) | outputs (GiB) | temporaries (GiB) |")
  print("|---|---|---|---|")
  compiled = {
      "train, micro-batches": jax.jit(lambda s, t, b, h: distill_step.train_step(
          s, t, b, h, config=make(config.accum_steps), tx=tx)).lower(
              state, teacher_params, batch, hyper),
      "eval, micro-batches (now)": jax.jit(lambda p, t, b: distill_step.eval_step(
          p, t, b, config=make(config.accum_steps))).lower(
              state["params"], teacher_params, batch),
      "eval, whole batch (before)": jax.jit(lambda p, t, b: distill_step.eval_step(
          p, t, b, config=make(1))).lower(state["params"], teacher_params, batch),
  }
  for name, lowered in compiled.items():
    memory = lowered.compile().memory_analysis()
    gib = lambda n: f"{n / 2**30:.2f}"
    print(f"| {name} | {gib(memory.argument_size_in_bytes)} | "
          f"{gib(memory.output_size_in_bytes)} | {gib(memory.temp_size_in_bytes)} |")


if __name__ == "__main__":
  app.run(main)
