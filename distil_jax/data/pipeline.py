"""Endless masked train batches and fixed eval batches; each process reads its rows of them.

The rows come from the prepared data (`prepare.py`): the held-out documents' rows for eval, the
others for training. The batches are the same whatever the number of processes: the order of the
train rows and the masks are functions of (seed, step, global row), and process i of n reads rows
[i * b, (i + 1) * b) of each global batch (b = batch_size / n), so a run gives the same batches on
1 process or on N and can resume on another number of hosts.

A batch's "attention_mask" holds segment ids (`packing.segment_ids`): 0 for padding, k for the
k-th document piece of a packed row (1 for every real token of an unpacked row), so that the
models keep the pieces of a packed row apart.

Eval batches are masked the standard way, not as training masks: `mask_prob` of the real
non-special tokens, chosen uniformly, every one replaced by [MASK], from a fixed random stream of
each row's index among the held-out ones, so that every run, seed and eval batch size is
evaluated on the same positions.
"""

import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from distil_jax import errors, validation
from distil_jax.data import prepare, prepared, sources
from distil_jax.data.masking import mask_tokens, smoothed_token_weights
from distil_jax.data.packing import segment_ids
from distil_jax.data.tokens import SpecialIds, load_tokenizer, special_ids

Batch = dict[str, np.ndarray]
_TRAIN_MASKS, _EVAL_MASKS = 0, 1  # Independent random streams for masking.


class Datasets(NamedTuple):
  train: grain.DatasetIterator  # Endless process-local batches; get_state() / set_state(state).
  eval: tuple[Batch, ...]  # Fixed process-local batches, the last padded with empty rows.
  train_sequences: int  # Train rows per epoch (of all processes together).
  train_tokens: int  # Tokens of the train documents, before special tokens.
  token_counts: np.ndarray  # Occurrences of each vocabulary id in the train rows' text.


def make_datasets(config: ml_collections.ConfigDict, tokenizer_dir: str | os.PathLike,
                  vocab_size: int) -> Datasets:
  """Train and eval batches of `config` (see `default_data_config`) for this process, the data
  prepared first if it is not yet (`prepare.prepare`).

  Batches map "input_ids", "attention_mask" (segment ids) and "labels" to int32 arrays of shape
  [batch_size // process_count, length], length = max_len (or a bucket length for train).
  Padding has id 0 ([PAD]) and attention_mask 0; labels are -100 where nothing is predicted.
  """
  bucket_lengths = _check(config, jax.process_count())
  tokenizer = load_tokenizer(tokenizer_dir, vocab_size)
  special = special_ids(tokenizer)
  data = prepare.prepare(config, tokenizer)
  if not len(data):
    raise errors.ConfigError(f"no train row of at least min_len={config.min_len} tokens: add "
                             "documents or lower config.data.min_len")
  eval_batches = _standard_eval(data.eval_rows(), config, special, vocab_size)
  rows = _rows(config.batch_size)
  logging.info("%d train rows (%s tokens of text), %d eval batches; process %d of %d reads rows "
               "%d to %d of each batch.", len(data), f"{data.tokens:,}", len(eval_batches),
               jax.process_index(), jax.process_count(), rows[0], rows[-1])
  counts = data.counts()
  train_masked = functools.partial(
      _masked, vocab_size=vocab_size, special_ids=special, mask_id=special.mask,
      mask_prob=config.mask_prob, rng_seed=_stream_seed(config.seed, _TRAIN_MASKS),
      mask_token_frac=config.mask_token_frac, random_token_frac=config.random_token_frac,
      token_weights=smoothed_token_weights(counts, config.mlm_smoothing))
  read_options = grain.ReadOptions(num_threads=config.read_threads,
                                   prefetch_buffer_size=2 * config.read_threads)
  train = _train_batches(data, bucket_lengths, config.batch_size, config.seed, special)
  return Datasets(train=iter(train.map_with_index(train_masked).to_iter_dataset(read_options)),
                  eval=eval_batches, train_sequences=len(data), train_tokens=data.tokens,
                  token_counts=counts)


def make_eval_batches(config: ml_collections.ConfigDict, tokenizer_dir: str | os.PathLike,
                      vocab_size: int, all_documents: bool = False) -> tuple[Batch, ...]:
  """This process's rows of the standard eval batches of `config` alone: of its held-out
  documents (the eval batches of `make_datasets`), or of all its documents (read here, nothing
  prepared on disk)."""
  _check(config, jax.process_count())
  tokenizer = load_tokenizer(tokenizer_dir, vocab_size)
  if all_documents:
    texts = (text for i, s in enumerate(config.sources)
             for unit in sources.plan(i, s, config.tfds_data_dir).units
             for text in sources.read(unit))
    ids = prepared.rows_of(texts, tokenizer, max_len=config.max_len, min_len=config.min_len,
                           pack=config.pack)[0]
  else:
    ids = prepare.prepare(config, tokenizer).eval_rows()
  return _standard_eval(ids, config, special_ids(tokenizer), vocab_size)


def global_batch(local_batch: Batch, sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """The global batch whose rows are the process-local batches of all processes, in order."""
  return {name: jax.make_array_from_process_local_data(sharding, array)
          for name, array in local_batch.items()}


def _check(config: ml_collections.ConfigDict, process_count: int) -> tuple[int, ...]:
  """Checks `config` (the rules of `validation.DATA_RULES`) and that the processes share its
  batches evenly; returns the bucket lengths, max_len last."""
  validation.check(config, validation.DATA_RULES)
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % process_count:
      raise errors.ConfigError(f"config.data.{key}={config[key]} is not divisible by the "
                               f"{process_count} processes: make it a multiple of {process_count}")
  return (*config.bucket, config.max_len)


def _rows(global_batch_size: int) -> np.ndarray:
  """The global rows of a batch that this process reads."""
  local = global_batch_size // jax.process_count()
  return np.arange(local) + jax.process_index() * local


def _train_batches(data: prepared.Prepared, bucket_lengths: Sequence[int], batch_size: int,
                   seed: int, special: SpecialIds) -> grain.MapDataset:
  """Endless (ids, global rows) of this process's rows of the global batches: each bucket of
  rows (by length; one bucket of all rows without buckets) reshuffled every epoch, buckets mixed
  by their sizes."""
  rows = _rows(batch_size)
  if len(bucket_lengths) == 1:
    buckets = [np.arange(len(data))]
  else:
    of_row = np.searchsorted(bucket_lengths, data.lengths())
    buckets = [np.flatnonzero(of_row == i) for i in range(len(bucket_lengths))]
  read = lambda members, length, batch: (data.read(members[batch[rows]])[:, :length], rows)
  per_bucket = [grain.MapDataset.range(len(members)).shuffle(seed).repeat().batch(batch_size)
                .map(functools.partial(read, members, length))
                for members, length in zip(buckets, bucket_lengths, strict=True) if len(members)]
  return grain.MapDataset.mix(per_bucket, weights=[float(len(b)) for b in buckets if len(b)])


def _standard_eval(ids: np.ndarray, config: ml_collections.ConfigDict, special: SpecialIds,
                   vocab_size: int) -> tuple[Batch, ...]:
  """This process's rows of the eval batches of rows `ids`, in order, the last completed with
  empty rows, masked the standard way (module docstring)."""
  batch_size = config.eval_batch_size or config.batch_size
  num_rows = -(-len(ids) // batch_size) * batch_size
  padded = np.full((num_rows, config.max_len), special.pad, np.int32)
  padded[:len(ids)] = ids
  rows = _rows(batch_size)
  masked = functools.partial(
      _masked, vocab_size=vocab_size, special_ids=special, mask_id=special.mask,
      mask_prob=config.mask_prob, rng_seed=_stream_seed(_EVAL_MASKS), mask_token_frac=1.0,
      random_token_frac=0.0)
  # A row's positions are a function of its index in the eval set alone, whatever the batches.
  return tuple(masked(0, (padded[start + rows], start + rows))
               for start in range(0, num_rows, batch_size))


def _masked(step: int, ids_rows: tuple[np.ndarray, np.ndarray], *, rng_seed: int,
            special_ids: SpecialIds, **mask_options) -> Batch:
  ids, rows = ids_rows
  segments = segment_ids(ids, special_ids.cls, special_ids.pad)
  input_ids, labels = mask_tokens(ids, segments, rng_seed=rng_seed, step=step, rows=rows,
                                  special_ids=special_ids, **mask_options)
  return {"input_ids": input_ids, "attention_mask": segments, "labels": labels}


def _stream_seed(*keys: int) -> int:
  """A seed for the random stream named by `keys`, independent of other keys' streams."""
  return int(np.random.SeedSequence(keys).generate_state(1)[0])
