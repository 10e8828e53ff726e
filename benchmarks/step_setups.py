"""What the step benchmarks share: their teachers and students, a batch, the compiled step, timing
in alternation, the table."""

import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distil_jax import data, distill_step, hf, models, optim, resources, sharding, stacked, student
from distil_jax.data import masking

SPECIAL_IDS, MASK_ID, FIRST_WORD_ID = (0, 100, 101, 102, 103), 103, 1000  # BERT's uncased vocab.
Models = tuple[models.ModelConfig, dict, models.ModelConfig, dict]  # Teacher's, then student's.


def tiny_models() -> Models:
  """experiments/tiny.py's: the packaged MiniLM teacher (6 x 384), a student of layers 0, 2, 5."""
  teacher_config, teacher_params = hf.load_bert(resources.minilm_dir())
  student_config, student_params = student.student_from_teacher(
      teacher_config, teacher_params, student.every_other_layer(6, 3))
  return teacher_config, teacher_params, student_config, student_params


def bert_base_models(seed: int = 0) -> Models:
  """A randomly initialised bert-base-uncased teacher and its 6-layer student."""
  teacher_config = models.PRESETS["bert-base-uncased"]
  teacher_params = jax.tree.map(np.asarray, models.init_params(teacher_config, seed))
  student_config, student_params = student.student_from_teacher(
      teacher_config, teacher_params, student.every_other_layer(12, 6))
  return teacher_config, teacher_params, student_config, student_params


def compile_step(config: distill_step.StepConfig, student_params: dict,
                 teacher_params: dict | None, batch: Mapping[str, np.ndarray]
                 ) -> tuple[Callable[[], dict], float]:
  """Our train step on `batch` on all devices: (a function that runs one step, carrying the
  state on, and returns its metrics when done; XLA's FLOP count of the step). With
  `config.num_runs`, `student_params` are stacked, and every run has the default `Hyper`."""
  mesh = sharding.make_mesh((-1, 1, 1))
  tx, _ = optim.make_optimizer(total_steps=100, lr_peak=1e-4, warmup_steps=0)
  state, teacher, train, _ = distill_step.prepare(config, {"student": student_params},
                                                   teacher_params, tx, mesh)
  global_batch = data.global_batch(dict(batch), sharding.batch_sharding(mesh))
  hyper = distill_step.Hyper()
  if config.num_runs:
    one = distill_step.Hyper(*jax.tree.map(np.float32, hyper[:2]), np.int32(hyper.seed))
    hyper = stacked.stack([one] * config.num_runs)
  proceed = jnp.asarray(True)  # The step's last argument (`optim.proceed_optional`).
  flops = train.lower(state, teacher, global_batch, hyper, proceed).compile().cost_analysis()[
      "flops"]

  def run() -> dict:
    nonlocal state
    state, metrics = train(state, teacher, global_batch, hyper)
    return jax.block_until_ready(metrics)
  return run, flops


def real_token_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
  """Random word tokens, no padding, 15% of them chosen for MLM as the data pipeline does."""
  ids = np.random.default_rng(seed).integers(FIRST_WORD_ID, vocab_size, (batch_size, seq_len))
  attention_mask = np.ones_like(ids, np.int32)
  input_ids, labels = masking.mask_tokens(ids, attention_mask, rng_seed=seed, step=0,
                                          vocab_size=vocab_size, special_ids=SPECIAL_IDS,
                                          mask_id=MASK_ID)
  return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def alternate(steps: Sequence[Callable[[], object]], repeats: int, warmup: int
              ) -> list[list[float]]:
  """Seconds of each of `steps` in each of `repeats` rounds, the steps run in turn in every
  round (after `warmup` rounds): a machine's drift reaches every step alike."""
  for _ in range(warmup):
    for run in steps:
      run()
  seconds = [[] for _ in steps]
  for _ in range(repeats):
    for run, times in zip(steps, seconds, strict=True):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
  return seconds


def markdown_table(rows: Sequence[dict], formats: Mapping[str, str]) -> str:
  """Rows as a markdown table: the first column as is, then `formats[key].format(row[key])`."""
  first = next(iter(rows[0]))
  cells = [[row[first], *(formats[k].format(row[k]) for k in formats)] for row in rows]
  header = [first, *formats]
  widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
  line = lambda cs: "| " + " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                      for i, (c, w) in enumerate(zip(cs, widths, strict=True)))
  return "\n".join([line(header) + " |", "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                    *(line(c) + " |" for c in cells)])

