"""The corpus prepared once: every source tokenized by every core and packed into rows, written
into `data.data_dir` (local or gs://) under a key of everything that changes the rows.

The key is made of the sources' fingerprints, the tokenizer's hash and the settings that change
the rows (max_len, min_len, pack, eval_examples): a run whose prepared data exist (a restart, on
fresh VMs too when data_dir is a bucket) reads them and prepares nothing. The held-out documents
are the first `eval_examples` of the sources (split evenly between them), read first, in one
process; then the units of every source (`sources.plan`) are tokenized in `processes` processes,
each writing its own files, so that an interrupted preparation resumes unit by unit. On several
hosts sharing a bucket, host i prepares units i, i + H, ... and all wait for all; on local disks
each host prepares every unit (processes that share a disk write the same files, each through a
temporary file of its own). The rows do not depend on the number of processes or hosts.
"""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import time

import jax
import ml_collections
import numpy as np
import tokenizers
from absl import logging
from etils import epath

from distil_jax import errors, hosts, storage
from distil_jax.data import prepared, sources

PROGRESS_EVERY_S = 10.0


def directory(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
              plans: list[sources.Source]) -> epath.Path:
  """Where the rows of `config` (the data config) and `tokenizer` are prepared."""
  facts = {"sources": [p.fingerprint for p in plans],
           "tokenizer": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
           **{k: config[k] for k in ("max_len", "min_len", "pack", "eval_examples")}}
  key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]
  return epath.Path(storage.absolute(config.data_dir)) / "prepared" / key


def prepare(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
            processes: int | None = None) -> prepared.Prepared:
  """The prepared rows of data config `config`, prepared now if they are not (in `processes`
  processes, default one per core)."""
  plans = [sources.plan(i, s, config.tfds_data_dir) for i, s in enumerate(config.sources)]
  where = directory(config, tokenizer, plans)
  shared = storage.is_remote(where)  # Local disks: every host prepares its own copy.
  exists = (where / prepared.INDEX).exists
  if hosts.decide(exists) if shared else exists():
    return prepared.Prepared(where)
  started = time.perf_counter()
  with hosts.together("preparing the data"):
    held_out, skips = _held_out(plans, config.eval_examples)
    units = [u for p in plans for u in p.units]
    jobs = [prepared.Job(u, skips.get(i, 0), f"unit-{i:05d}", str(where), tokenizer.to_str(),
                         config.max_len, config.min_len, config.pack)
            for i, u in enumerate(units)]
    mine = jobs[jax.process_index()::jax.process_count()] if shared else jobs
    where.mkdir(parents=True, exist_ok=True)
    _run([j for j in mine if not prepared.done(where, j.name)], processes or os.cpu_count() or 1)
    if hosts.is_main() or not shared:
      prepared.write_rows(held_out, tokenizer, where, "eval", max_len=config.max_len,
                          min_len=config.min_len, pack=config.pack)
  with hosts.together("writing the prepared data's index"):
    if hosts.is_main() or not shared:
      _write_index(where, jobs, tokenizer, config)
  result = prepared.Prepared(where)
  logging.info("Prepared %d documents (%s tokens) into %d rows of %d in %s, in %.0f s.",
               sum(u["documents"] for u in result.index["units"]), f"{result.tokens:,}",
               len(result), config.max_len, where, time.perf_counter() - started)
  return result


def _held_out(plans: list[sources.Source], eval_examples: int
              ) -> tuple[list[str], dict[int, int]]:
  """The held-out documents (the first of each source, `eval_examples` split evenly between
  them) and, by unit index, how many of a unit's first documents they are. A source with no
  text, or whose every document is held out, is refused."""
  held_out, skips, first = [], {}, 0
  for number, plan in enumerate(plans):
    wanted = eval_examples // len(plans) + (number < eval_examples % len(plans))
    taken, more = 0, False
    for offset, unit in enumerate(plan.units):
      for text in sources.read(unit):
        if taken == wanted:
          more = True  # A document past the held-out ones: the source trains too.
          break
        held_out.append(text)
        taken += 1
        skips[first + offset] = skips.get(first + offset, 0) + 1
      if more:
        break
    if not more:
      where = ", ".join(sorted({u.path for u in plan.units}))
      raise errors.ConfigError(
          f"no text in {where}: add documents to the files or remove them from "
          "config.data.sources" if not taken else
          f"config.data.eval_examples={eval_examples} holds out all {taken} documents of "
          f"{where}: lower eval_examples")
    first += len(plan.units)
  return held_out, skips


def _run(jobs: list[prepared.Job], processes: int) -> None:
  """Prepares the units of `jobs`, in `processes` processes (here, for one), with progress."""
  if not jobs:
    return
  progress = _Progress(jobs)
  if processes == 1:
    for job in jobs:
      progress.done(job, prepared.prepare_unit(job))
    return
  context = multiprocessing.get_context("spawn")  # Not fork: this process runs JAX's threads.
  with concurrent.futures.ProcessPoolExecutor(min(processes, len(jobs)), mp_context=context,
                                              initializer=_quiet_tokenizer) as pool:
    futures = {pool.submit(prepared.prepare_unit, job): job for job in jobs}
    for future in concurrent.futures.as_completed(futures):
      progress.done(futures[future], future.result())


def _quiet_tokenizer() -> None:
  """One core per preparing process: the tokenizer's own threads would compete for them."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"


class _Progress:
  """Logs documents/s, tokens/s and the time left, every PROGRESS_EVERY_S seconds."""

  def __init__(self, jobs: list[prepared.Job]):
    self._weights = {j.name: _weight(j.unit) for j in jobs}
    self._total, self._done = sum(self._weights.values()), 0.0
    self._documents = self._tokens = 0
    self._start = self._last = time.perf_counter()

  def done(self, job: prepared.Job, facts: dict[str, int]) -> None:
    self._done += self._weights[job.name]
    self._documents += facts["documents"]
    self._tokens += facts["tokens"]
    now = time.perf_counter()
    if now - self._last < PROGRESS_EVERY_S and self._done < self._total:
      return
    self._last, seconds = now, now - self._start
    left = seconds * (self._total - self._done) / max(self._done, 1e-9)
    logging.info("Preparing: %.0f%% of the units, %s documents/s, %s tokens/s, %.0f s left.",
                 100 * self._done / self._total, f"{self._documents / seconds:,.0f}",
                 f"{self._tokens / seconds:,.0f}", left)


def _weight(unit: sources.Unit) -> float:
  """A unit's share of the work: its bytes, where known."""
  return float(unit.stop - unit.start) if unit.kind in ("text", "jsonl") else sources.UNIT_BYTES


def _write_index(where: epath.Path, jobs: list[prepared.Job], tokenizer: tokenizers.Tokenizer,
                 config: ml_collections.ConfigDict) -> None:
  units = [{"name": j.name, **prepared.done(where, j.name)} for j in jobs]
  counts = sum((np.load((where / f"{j.name}.counts.npy").open("rb")) for j in jobs),
               np.zeros(tokenizer.get_vocab_size(), np.int64))
  storage.write_atomic(where / "counts.npy", prepared.npy(counts))
  index = {"max_len": config.max_len, "min_len": config.min_len, "pack": config.pack,
           "dtype": np.dtype(prepared.dtype(tokenizer.get_vocab_size())).name,
           "sources": list(config.sources), "units": units,
           "eval": prepared.done(where, "eval")}
  storage.write_atomic(where / prepared.INDEX, json.dumps(index, indent=1))
