"""Tokens/s of the input pipeline on this machine: cold (preparing the rows) and warm (prepared).

  .venv/bin/python -m benchmarks.bench_data --batch_size=256 --steps=200

`measure_data_pipeline` returns the rows of the table, so that other measurements can join it.
"""

import tempfile
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import ml_collections
from absl import app, flags

from distil_jax import resources
from distil_jax.data import default_data_config, make_datasets

_SOURCES = flags.DEFINE_list("sources", ["wiki_offline"], "config.data.sources")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Sequences per batch.")
_MAX_LEN = flags.DEFINE_integer("max_len", 128, "Tokens per sequence.")
_PACK = flags.DEFINE_bool("pack", False, "Pack documents into full sequences.")
_STEPS = flags.DEFINE_integer("steps", 200, "Train batches to time.")

_SETUP = {"cold": "make_datasets: prepare (tokenize, pack, write)",
          "warm": "make_datasets: the prepared rows"}


class Row(NamedTuple):
  stage: str
  tokens: int  # Real (non-padding) tokens made ready.
  seconds: float

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / self.seconds


def measure_data_pipeline(config: ml_collections.ConfigDict, tokenizer_dir: str, vocab_size: int,
                          steps: int) -> list[Row]:
  """Times `make_datasets` and `steps` train batches in an empty data_dir, then again warm."""
  jax.devices()  # Starts the backend outside the timings.
  config = config.copy_and_resolve_references()
  rows = []
  with tempfile.TemporaryDirectory() as data_dir:
    config.data_dir = data_dir
    for run in ("cold", "warm"):
      begin = time.perf_counter()
      datasets = make_datasets(config, tokenizer_dir, vocab_size)
      rows.append(Row(f"{run}: {_SETUP[run]}", datasets.train_tokens, time.perf_counter() - begin))
      begin = time.perf_counter()
      tokens = sum(int((next(datasets.train)["attention_mask"] > 0).sum())
                   for _ in range(steps))
      rows.append(Row(f"{run}: {steps} batches (read, mask)", tokens,
                      time.perf_counter() - begin))
  return rows


def format_table(rows: Sequence[Row]) -> str:
  width = max(len(row.stage) for row in rows)
  lines = [f"| {'stage':<{width}} | {'tokens':>10} | {'seconds':>8} | {'tokens/s':>10} |",
           f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 10}|{'-' * 12}|"]
  lines += [f"| {row.stage:<{width}} | {row.tokens:>10,} | {row.seconds:>8.2f} | "
            f"{row.tokens_per_second:>10,.0f} |" for row in rows]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  config = default_data_config()
  config.update({"sources": tuple(_SOURCES.value), "batch_size": _BATCH_SIZE.value,
                 "max_len": _MAX_LEN.value, "pack": _PACK.value})
  rows = measure_data_pipeline(config, str(resources.minilm_dir()), 30522, _STEPS.value)
  print(format_table(rows))


if __name__ == "__main__":
  app.run(main)
