"""Endless masked train batches and fixed eval batches; each process reads its rows of them.

Per source, the first `eval_examples` documents (split between sources by size) are held out for
eval; the rest are for training. The batches are the same whatever the number of processes: the
order of the train sequences and the masks are functions of (seed, step, global row), and process
i of n reads rows [i * b, (i + 1) * b) of each global batch (b = batch_size / n), so a run gives
the same batches on 1 process or on N and can resume on another number of hosts. Every process
tokenizes every document (once: the ids are cached in data_dir).

Eval batches are masked the standard way, not as training masks: `mask_prob` of the real
non-special tokens, chosen uniformly, every one replaced by [MASK], from a fixed random stream of
each sequence's index among the held-out ones, so that every run, seed and eval batch size is
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
import tokenizers
from absl import logging

from distil_jax import errors, validation
from distil_jax.data import files
from distil_jax.data.masking import mask_tokens, smoothed_token_weights
from distil_jax.data.sequences import Sequences, make_sequences, split_by_length
from distil_jax.data.sources import open_documents
from distil_jax.data.tokens import (
    SpecialIds,
    TokenIds,
    load_tokenizer,
    special_ids,
    tokenize,
)

Batch = dict[str, np.ndarray]
_TRAIN_MASKS, _EVAL_MASKS = 0, 1  # Independent random streams for masking.


class Datasets(NamedTuple):
  train: grain.DatasetIterator  # Endless process-local batches; get_state() / set_state(state).
  eval: tuple[Batch, ...]  # Fixed process-local batches, the last padded with empty rows.
  train_sequences: int  # Train sequences per epoch (of all processes together).
  train_tokens: int  # Their tokens, [CLS] and [SEP] included.
  token_counts: np.ndarray  # Occurrences of each vocabulary id in the train documents.


def make_datasets(config: ml_collections.ConfigDict, tokenizer_dir: str | os.PathLike,
                  vocab_size: int) -> Datasets:
  """Train and eval batches of `config` (see `default_data_config`) for this process.

  Batches map "input_ids", "attention_mask" and "labels" to int32 arrays of shape
  [batch_size // process_count, length], length = max_len (or a bucket length for train).
  Padding has id 0 ([PAD]) and attention_mask 0; labels are -100 where nothing is predicted.
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  bucket_lengths = _check(config, process_count)
  tokenizer = load_tokenizer(tokenizer_dir, vocab_size)
  special = special_ids(tokenizer)
  train_ids, eval_ids = _token_ids(config, tokenizer)
  train = _cut(train_ids, config, special)
  if not len(train):
    raise errors.ConfigError(f"no train sequence of at least min_len={config.min_len} tokens: add "
                             "documents or lower config.data.min_len")
  rows = _rows(config.batch_size)
  eval_batches = _standard_eval(eval_ids, config, special, vocab_size)
  logging.info("%d train sequences (%d tokens), %d eval batches; process %d of %d reads rows "
               "%d to %d of each batch.", len(train), train.lengths.sum(), len(eval_batches),
               process_index, process_count, rows[0], rows[-1])
  train_masked = functools.partial(
      _masked, vocab_size=vocab_size, special_ids=special, mask_id=special.mask,
      mask_prob=config.mask_prob, rng_seed=_stream_seed(config.seed, _TRAIN_MASKS),
      mask_token_frac=config.mask_token_frac, random_token_frac=config.random_token_frac,
      token_weights=smoothed_token_weights(train_ids.counts, config.mlm_smoothing))
  train_batches = _train_batches(split_by_length(train, bucket_lengths), bucket_lengths,
                                 config.batch_size, config.seed, special.pad)
  read_options = grain.ReadOptions(num_threads=config.read_threads,
                                   prefetch_buffer_size=2 * config.read_threads)
  return Datasets(
      train=iter(train_batches.map_with_index(train_masked).to_iter_dataset(read_options)),
      eval=eval_batches,
      train_sequences=len(train),
      train_tokens=int(train.lengths.sum()),
      token_counts=train_ids.counts)


def make_eval_batches(config: ml_collections.ConfigDict, tokenizer_dir: str | os.PathLike,
                      vocab_size: int, all_documents: bool = False) -> tuple[Batch, ...]:
  """This process's rows of the standard eval batches of `config` alone: of its held-out
  documents (the eval batches of `make_datasets`), or of all its documents."""
  _check(config, jax.process_count())
  tokenizer = load_tokenizer(tokenizer_dir, vocab_size)
  _, eval_ids = _token_ids(config, tokenizer, all_documents)
  return _standard_eval(eval_ids, config, special_ids(tokenizer), vocab_size)


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


def _token_ids(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
               all_eval: bool = False) -> tuple[TokenIds | None, TokenIds]:
  """Token ids of the train documents and of the eval documents (the first eval_examples ones,
  split between the sources by their sizes); with `all_eval`, (None, ids of every document)."""
  data_dir = files.local_dir(config.data_dir)
  documents = [open_documents(source, data_dir, config.tfds_data_dir) for source in config.sources]
  if all_eval:
    return None, tokenize([(d, 0, len(d)) for d in documents], tokenizer, data_dir / "token_ids")
  sizes = np.array([len(d) for d in documents])
  if not 0 <= config.eval_examples < sizes.sum():
    raise errors.ConfigError(
        f"config.data.eval_examples={config.eval_examples} leaves no train document "
        f"of {sizes.sum()}: lower eval_examples")
  eval_sizes = np.diff(config.eval_examples * np.cumsum(sizes) // sizes.sum(), prepend=0)
  eval_parts = [(d, 0, int(e)) for d, e in zip(documents, eval_sizes, strict=True)]
  train_parts = [(d, int(e), int(n)) for d, n, e in zip(documents, sizes, eval_sizes, strict=True)]
  return (tokenize(train_parts, tokenizer, data_dir / "token_ids"),
          tokenize(eval_parts, tokenizer, data_dir / "token_ids"))


def _rows(global_batch_size: int) -> np.ndarray:
  """The global rows of a batch that this process reads."""
  local = global_batch_size // jax.process_count()
  return np.arange(local) + jax.process_index() * local


def _train_batches(buckets: Sequence[Sequences], bucket_lengths: Sequence[int],
                   batch_size: int, seed: int, pad_id: int) -> grain.MapDataset:
  """Endless (ids, lengths, global rows) of this process's rows of the global batches: each
  bucket reshuffled every epoch, buckets mixed by their sizes."""
  rows = _rows(batch_size)
  read = lambda sequences, length, indices: (*sequences.padded(indices[rows], length, pad_id),
                                             rows)
  per_bucket = [grain.MapDataset.range(len(sequences)).shuffle(seed).repeat().batch(batch_size)
                .map(functools.partial(read, sequences, length))
                for sequences, length in zip(buckets, bucket_lengths, strict=True)
                if len(sequences)]
  return grain.MapDataset.mix(per_bucket, weights=[float(len(b)) for b in buckets if len(b)])


def _cut(ids: TokenIds, config: ml_collections.ConfigDict, special: SpecialIds) -> Sequences:
  return make_sequences(ids, max_len=config.max_len, min_len=config.min_len, pack=config.pack,
                        cls_id=special.cls, sep_id=special.sep)


def _standard_eval(ids: TokenIds, config: ml_collections.ConfigDict, special: SpecialIds,
                   vocab_size: int) -> tuple[Batch, ...]:
  """This process's rows of the eval batches of `ids`, in corpus order, the last completed
  with empty rows, masked the standard way (module docstring)."""
  sequences = _cut(ids, config, special)
  batch_size, max_len = config.eval_batch_size or config.batch_size, config.max_len
  num_rows = -(-len(sequences) // batch_size) * batch_size
  padded = np.full((num_rows, max_len), special.pad, np.int32)
  lengths = np.zeros(num_rows, np.int32)
  padded[:len(sequences)], lengths[:len(sequences)] = sequences.padded(
      np.arange(len(sequences)), max_len, special.pad)
  rows = _rows(batch_size)
  masked = functools.partial(
      _masked, vocab_size=vocab_size, special_ids=special, mask_id=special.mask,
      mask_prob=config.mask_prob, rng_seed=_stream_seed(_EVAL_MASKS), mask_token_frac=1.0,
      random_token_frac=0.0)
  # A row's positions are a function of its index in the eval set alone, whatever the batches.
  return tuple(masked(0, (padded[start + rows], lengths[start + rows], start + rows))
               for start in range(0, num_rows, batch_size))


def _masked(step: int, ids_lengths_rows: tuple[np.ndarray, np.ndarray, np.ndarray], *,
            rng_seed: int, **mask_options) -> Batch:
  ids, lengths, rows = ids_lengths_rows
  attention_mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int32)
  input_ids, labels = mask_tokens(ids, attention_mask, rng_seed=rng_seed, step=step, rows=rows,
                                  **mask_options)
  return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _stream_seed(*keys: int) -> int:
  """A seed for the random stream named by `keys`, independent of other keys' streams."""
  return int(np.random.SeedSequence(keys).generate_state(1)[0])
