"""GLUE tasks: examples from GLUE's TSV files or TFDS, tokenised as HuggingFace does, batched.

Two sources of a task's examples:
  GLUE_DIR  a local (or gs://) directory laid out as GLUE's distribution: `SST-2/train.tsv`,
            `SST-2/dev.tsv`, `MNLI/dev_matched.tsv`, ... (https://gluebenchmark.com/tasks);
  TFDS      `glue/<task>` through `tfds.data_source`, downloaded and prepared (array_record,
            no TensorFlow needed) where the internet is reachable; the same examples in TFDS's
            fixed shuffled order.
Labels are TFDS's class ids (`Task.label_names` in order); STS-B's are float32 scores. Sentences
are `[CLS] a [SEP]`, pairs `[CLS] a [SEP] b [SEP]` with token types 0 then 1, truncated to
max_len as HuggingFace's default `longest_first` does. A DistilBERT simply ignores the token
types. Batches are numpy dicts: input_ids, attention_mask, token_type_ids (int32, [..., L]) and
labels; L is max_len, or the smallest of `buckets` that holds the batch.
"""

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tensorflow_datasets.text.glue  # Registers the glue/* builders.
import tokenizers
from etils import epath

from distil_jax import errors
from distil_jax.data import tokens

GLUE_URL = "https://gluebenchmark.com/tasks"


@dataclasses.dataclass(frozen=True)
class Task:
  """A GLUE task: where its texts and labels are, its classes and its metrics."""

  name: str
  directory: str  # in GLUE's distribution, e.g. "SST-2"
  columns: tuple[str, ...] | tuple[int, ...]  # TSV text columns: header names, or indices
  label_column: str | int  # (indices: CoLA's train and dev files have no header)
  features: tuple[str, ...]  # text features of TFDS glue/<name>
  label_names: tuple[str, ...]  # classes in label-id order; () for a regression (STS-B)
  metrics: tuple[str, ...]  # GLUE's metrics of the task (names in distil_jax.glue_metrics)
  eval_splits: tuple[str, ...] = ("validation",)

  @property
  def num_labels(self) -> int:
    return len(self.label_names) or 1

  @property
  def is_regression(self) -> bool:
    return not self.label_names


_PAIR = ("sentence1", "sentence2")
_NLI = ("entailment", "not_entailment")
TASKS = {task.name: task for task in [
    Task("cola", "CoLA", (3,), 1, ("sentence",), ("unacceptable", "acceptable"), ("mcc",)),
    Task("sst2", "SST-2", ("sentence",), "label", ("sentence",), ("negative", "positive"),
         ("accuracy",)),
    Task("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _PAIR,
         ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    Task("qqp", "QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"),
         ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    Task("stsb", "STS-B", _PAIR, "score", _PAIR, (), ("pearson", "spearman")),
    Task("mnli", "MNLI", _PAIR, "gold_label", ("premise", "hypothesis"),
         ("entailment", "neutral", "contradiction"), ("accuracy",),
         ("validation_matched", "validation_mismatched")),
    Task("qnli", "QNLI", ("question", "sentence"), "label", ("question", "sentence"), _NLI,
         ("accuracy",)),
    Task("rte", "RTE", _PAIR, "label", _PAIR, _NLI, ("accuracy",)),
    Task("wnli", "WNLI", _PAIR, "label", _PAIR, ("not_entailment", "entailment"), ("accuracy",)),
]}


@dataclasses.dataclass(frozen=True)
class Examples:
  """Texts (one list per text column) and labels (int32 class ids or float32 scores)."""

  texts: tuple[list[str], ...]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Tokenised examples, each padded to max_len."""

  input_ids: np.ndarray  # [n, max_len] int32
  token_type_ids: np.ndarray  # [n, max_len] int8
  lengths: np.ndarray  # [n] int32: the tokens of each example (the attention mask's ones)
  labels: np.ndarray  # [n] int32 or float32

  def __len__(self) -> int:
    return len(self.labels)


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise errors.ConfigError(f"unknown GLUE task {name!r}: choose one of {', '.join(TASKS)}")
  return TASKS[name]


def tsv_path(task: Task, split: str, glue_dir: str | os.PathLike) -> epath.Path:
  """GLUE's file of a split: train.tsv, dev.tsv, dev_matched.tsv or dev_mismatched.tsv."""
  return epath.Path(glue_dir) / task.directory / f"{split.replace('validation', 'dev')}.tsv"


def read_tsv(task: Task, split: str, glue_dir: str | os.PathLike) -> Examples:
  """A split's examples from GLUE's TSV file (tab-separated, no quoting, as GLUE's readers)."""
  path = tsv_path(task, split, glue_dir)
  if not path.is_file():
    files = ", ".join(tsv_path(task, s, "").name for s in ("train", *task.eval_splits))
    raise errors.MissingInput(
        f"{path} not found: download GLUE from {GLUE_URL} and unpack it so that "
        f"{epath.Path(glue_dir) / task.directory} holds {files}")
  try:
    lines = path.read_bytes().decode("utf-8-sig").split("\n")  # MRPC's header has a BOM.
  except UnicodeDecodeError as error:
    raise errors.ConfigError(f"{path}: byte {error.start} is not UTF-8: use GLUE's original files "
                             f"from {GLUE_URL}") from None
  lines = [line.removesuffix("\r") for line in lines]
  has_header = isinstance(task.label_column, str)
  header = lines[0].split("\t") if has_header else None
  wanted = (*task.columns, task.label_column)
  if has_header:
    absent = [name for name in wanted if name not in header]
    if absent:
      raise errors.ConfigError(f"{path}:1: the header has no column {absent[0]!r}: expected GLUE's "
                               f"{task.directory} header with columns {', '.join(wanted)}")
    wanted = tuple(header.index(name) for name in wanted)
  lookup = {**{str(i): i for i in range(task.num_labels)},
            **{name: i for i, name in enumerate(task.label_names)}}
  num_fields = len(header) if has_header else max(wanted) + 1
  first = 1 if has_header else 0
  texts, labels = tuple([] for _ in task.columns), []
  for number, line in enumerate(lines[first:], first + 1):
    if not line:
      continue
    fields = line.split("\t")
    if len(fields) != num_fields:
      raise errors.ConfigError(f"{path}:{number}: {len(fields)} tab-separated fields, expected "
                               f"{num_fields}: fix or delete this line")
    for column, index in zip(texts, wanted[:-1], strict=True):
      column.append(fields[index])
    labels.append(_label(task, fields[wanted[-1]], lookup, f"{path}:{number}"))
  return Examples(texts, np.array(labels, np.float32 if task.is_regression else np.int32))


def _label(task: Task, value: str, lookup: dict[str, int], where: str) -> float | int:
  if task.is_regression:
    try:
      return float(value)
    except ValueError:
      raise errors.ConfigError(f"{where}: label {value!r} is not a number: fix or delete this "
                               "line") from None
  if value not in lookup:
    raise errors.ConfigError(f"{where}: label {value!r} is not one of {', '.join(lookup)}: fix or "
                             "delete this line")
  return lookup[value]


def read_tfds(task: Task, split: str, tfds_data_dir: str | None = None) -> Examples:
  """A split's examples from TFDS `glue/<task>`, downloaded and prepared if not yet there."""
  try:
    records = tfds.data_source(f"glue/{task.name}", split=split, data_dir=tfds_data_dir,
                               download_and_prepare_kwargs={"file_format": "array_record"})
  except Exception as error:  # Offline: a requests, download or dataset-not-found error.
    raise errors.MissingInput(
        f"TFDS glue/{task.name} ({split}) is neither prepared in "
        f"{tfds_data_dir or 'the default TFDS data dir'} nor downloadable "
        f"({type(error).__name__}): download GLUE from {GLUE_URL} and pass its directory as "
        "glue_dir") from error
  rows = records.__getitems__(list(range(len(records))))
  texts = tuple([row[feature].decode("utf-8") for row in rows] for feature in task.features)
  labels = np.array([row["label"] for row in rows],
                    np.float32 if task.is_regression else np.int32)
  return Examples(texts, labels)


def subsample(examples: Examples, max_examples: int | None) -> Examples:
  """At most `max_examples` examples: a fixed random subset (the same for every run), in their
  original order."""
  if max_examples is None or max_examples >= len(examples):
    return examples
  keep = np.sort(np.random.default_rng(0).permutation(len(examples))[:max_examples])
  return Examples(tuple([column[i] for i in keep] for column in examples.texts),
                  examples.labels[keep])


def encode(examples: Examples, tokenizer: tokenizers.Tokenizer, max_len: int) -> Encoded:
  """Token ids of sentences or pairs with [CLS]/[SEP] and token types, as HuggingFace's tokenizer
  gives them with `truncation=True, max_length=max_len`."""
  truncating = tokenizers.Tokenizer.from_str(tokenizer.to_str())  # Leaves `tokenizer` as it is.
  truncating.enable_truncation(max_len, strategy="longest_first")
  inputs = (examples.texts[0] if len(examples.texts) == 1
            else list(zip(*examples.texts, strict=True)))
  encodings = truncating.encode_batch_fast(inputs)
  n = len(encodings)
  input_ids = np.full((n, max_len), tokens.special_ids(tokenizer).pad, np.int32)
  token_type_ids = np.zeros((n, max_len), np.int8)
  lengths = np.zeros(n, np.int32)
  for i, encoding in enumerate(encodings):
    lengths[i] = len(encoding.ids)
    input_ids[i, :lengths[i]] = encoding.ids
    token_type_ids[i, :lengths[i]] = encoding.type_ids
  return Encoded(input_ids, token_type_ids, lengths, examples.labels)


def load_split(task: Task, split: str, tokenizer: tokenizers.Tokenizer, max_len: int, *,
               glue_dir: str | os.PathLike | None = None, tfds_data_dir: str | None = None,
               max_examples: int | None = None) -> Encoded:
  """A split ("train" or one of `task.eval_splits`) tokenised: from GLUE's TSV files in
  `glue_dir`, or from TFDS without one; at most `max_examples` examples (`subsample`)."""
  if split not in ("train", *task.eval_splits):
    raise errors.ConfigError(f"GLUE task {task.name} has no split {split!r}: use train or "
                             f"{', '.join(task.eval_splits)}")
  examples = (read_tsv(task, split, glue_dir) if glue_dir is not None
              else read_tfds(task, split, tfds_data_dir))
  return encode(subsample(examples, max_examples), tokenizer, max_len)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches in an epoch (the last partial batch of an epoch's order is dropped)."""
  if num_examples < batch_size:
    raise errors.ConfigError(
        f"{num_examples} training examples do not fill one batch of {batch_size}: "
        "lower the batch size")
  return num_examples // batch_size


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the examples in `epoch` of the run seeded `seed`: a permutation that depends
  on (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


class TrainBatches:
  """Endless training batches for several runs at once: rows [len(seeds), batch_size, L], run s
  reading its examples in `epoch_order(n, seeds[s], e)`. Its position is `get_state()`
  ({"step": batches read}), restored by `set_state` (a resumed run)."""

  def __init__(self, data: Encoded, batch_size: int, seeds: Sequence[int],
               buckets: Sequence[int] = ()):
    self._data, self._batch_size, self._seeds, self._buckets = data, batch_size, seeds, buckets
    self._steps_per_epoch = steps_per_epoch(len(data), batch_size)
    self._step, self._orders = 0, (None, None)  # (epoch, its orders)

  def __iter__(self) -> "TrainBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, index = divmod(self._step, self._steps_per_epoch)
    if self._orders[0] != epoch:
      self._orders = epoch, np.stack([epoch_order(len(self._data), seed, epoch)
                                      for seed in self._seeds])
    self._step += 1
    rows = self._orders[1][:, index * self._batch_size:(index + 1) * self._batch_size]
    return _batch(self._data, rows, self._buckets)

  def get_state(self) -> dict[str, int]:
    return {"step": self._step}

  def set_state(self, state: dict[str, int]) -> None:
    self._step = int(state["step"])


def train_batches(data: Encoded, batch_size: int, seeds: Sequence[int], *, start_step: int = 0,
                  buckets: Sequence[int] = ()) -> TrainBatches:
  """`TrainBatches` from step `start_step` on."""
  batches = TrainBatches(data, batch_size, seeds, buckets)
  batches.set_state({"step": start_step})
  return batches


def eval_batches(data: Encoded, batch_size: int, buckets: Sequence[int] = ()
                 ) -> Iterator[dict[str, np.ndarray]]:
  """All examples in order, in batches [batch_size, L]; the last batch is filled up with copies
  of the last example, which get "weights" 0 (1 for every real example)."""
  for start in range(0, len(data), batch_size):
    rows = np.arange(start, start + batch_size)
    batch = _batch(data, np.minimum(rows, len(data) - 1), buckets)
    batch["weights"] = (rows < len(data)).astype(np.float32)
    yield batch


def _batch(data: Encoded, rows: np.ndarray, buckets: Sequence[int]) -> dict[str, np.ndarray]:
  """The examples `rows` (any shape), padded to the smallest bucket that holds them."""
  lengths = data.lengths[rows]
  length = data.input_ids.shape[1]
  length = min((b for b in buckets if lengths.max() <= b <= length), default=length)
  return {"input_ids": data.input_ids[rows, :length],
          "attention_mask": (np.arange(length) < lengths[..., None]).astype(np.int32),
          "token_type_ids": data.token_type_ids[rows, :length].astype(np.int32),
          "labels": data.labels[rows]}
