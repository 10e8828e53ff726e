"""Prepared data on disk (local or gs://): token-id rows, written once, read at random.

A prepared directory holds, for each unit of the sources (`sources.Unit`), its rows and facts::

  unit-00042.rows         uint16 (int32 for a vocabulary over 65,536) rows of max_len ids
  unit-00042.lengths.npy  the real tokens of each row
  unit-00042.counts.npy   how often each vocabulary id occurs in the unit's documents
  unit-00042.json         {"rows", "documents", "tokens"}: written last, the unit is done
  eval.*                  the same for the held-out documents
  index.json              every unit's counts, the settings and sources: written last of all

`prepare_unit` is what a preparing process runs; it imports neither JAX nor the models. `Prepared`
reads rows by their global index (the units' rows in order): memory-mapped on a local disk, by
byte ranges fetched concurrently from a bucket, so a run starts without reading the corpus.
"""

import dataclasses
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tokenizers
from etils import epath

from distil_jax import storage
from distil_jax.data import sources
from distil_jax.data.packing import Packer

INDEX = "index.json"
_BATCH_DOCUMENTS = 1024  # Documents tokenized in one call.


def dtype(vocab_size: int) -> type[np.integer]:
  return np.uint16 if vocab_size <= 2**16 else np.int32


@dataclasses.dataclass(frozen=True)
class Job:
  """What a preparing process needs to write one unit: all of it picklable."""
  unit: sources.Unit
  skip: int  # Its first documents, held out for evaluation.
  name: str  # "unit-00042".
  directory: str
  tokenizer: str  # The tokenizer's JSON.
  max_len: int
  min_len: int
  pack: bool


def prepare_unit(job: Job) -> dict[str, int]:
  """Tokenizes and packs the unit's documents (but the first `skip`) and writes its files;
  returns its facts (rows, documents, tokens)."""
  tokenizer = tokenizers.Tokenizer.from_str(job.tokenizer)
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return write_rows(_documents(job.unit, job.skip), tokenizer, epath.Path(job.directory),
                    job.name, max_len=job.max_len, min_len=job.min_len, pack=job.pack)


def _documents(unit: sources.Unit, skip: int):
  for index, text in enumerate(sources.read(unit)):
    if index >= skip:
      yield text


def write_rows(texts: Iterable[str], tokenizer: tokenizers.Tokenizer, directory: epath.Path,
               name: str, *, max_len: int, min_len: int, pack: bool) -> dict[str, int]:
  """Writes the rows of `texts` (documents) as `name`.* in `directory`; returns their facts."""
  rows, facts, counts = rows_of(texts, tokenizer, max_len=max_len, min_len=min_len, pack=pack)
  lengths = np.sum(rows != tokenizer.token_to_id("[PAD]"), axis=1).astype(np.int32)
  storage.write_atomic(directory / f"{name}.rows", rows.astype(dtype(len(counts))).tobytes())
  storage.write_atomic(directory / f"{name}.lengths.npy", npy(lengths))
  storage.write_atomic(directory / f"{name}.counts.npy", npy(counts))
  storage.write_atomic(directory / f"{name}.json", json.dumps(facts))  # Last: the unit is done.
  return facts


def rows_of(texts: Iterable[str], tokenizer: tokenizers.Tokenizer, *, max_len: int,
            min_len: int, pack: bool) -> tuple[np.ndarray, dict[str, int], np.ndarray]:
  """(int32 rows [n, max_len] of the documents `texts` (`packing.Packer`); facts: rows,
  documents, and their tokens before short pieces are dropped; the counts of each vocabulary id
  in the rows' text)."""
  vocab_size = tokenizer.get_vocab_size()
  special = [tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")]
  packer = Packer(max_len=max_len, min_len=min_len, pack=pack, cls_id=special[1],
                  sep_id=special[2], dtype=dtype(vocab_size))
  counts = np.zeros(vocab_size, np.int64)
  parts, documents, tokens = [], 0, 0
  for batch in _batches(texts):
    for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
      tokens += len(encoding.ids)
      packer.add(encoding.ids)
    documents += len(batch)
    parts.append(packer.take())
    counts += np.bincount(parts[-1].ravel(), minlength=vocab_size)
  parts.append(packer.take(final=True))
  counts += np.bincount(parts[-1].ravel(), minlength=vocab_size)
  counts[special] = 0  # The ids of the text that the rows keep.
  rows = np.concatenate(parts).astype(np.int32)
  return rows, {"rows": len(rows), "documents": documents, "tokens": tokens}, counts


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
  batch = []
  for text in texts:
    batch.append(text)
    if len(batch) == _BATCH_DOCUMENTS:
      yield batch
      batch = []
  if batch:
    yield batch


def npy(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def done(directory: epath.Path, name: str) -> dict[str, int] | None:
  """The facts of unit `name` if it is written, else None."""
  path = directory / f"{name}.json"
  return json.loads(path.read_text()) if path.exists() else None


class Prepared:
  """The rows of a prepared directory: `len()` train rows, `read(rows)` by global index."""

  def __init__(self, directory: epath.PathLike):
    self.directory = epath.Path(directory)
    self.index: dict[str, Any] = json.loads((self.directory / INDEX).read_text())
    self.max_len: int = self.index["max_len"]
    self.dtype = np.dtype(self.index["dtype"])
    self.units: list[str] = [u["name"] for u in self.index["units"]]
    self._starts = np.cumsum([0] + [u["rows"] for u in self.index["units"]])
    self._remote = storage.is_remote(self.directory)
    self._maps: dict[str, np.ndarray] = {}

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def tokens(self) -> int:
    """Tokens of the train documents (no special tokens)."""
    return sum(u["tokens"] for u in self.index["units"])

  def counts(self) -> np.ndarray:
    return np.load((self.directory / "counts.npy").open("rb"))

  def lengths(self) -> np.ndarray:
    """The real tokens of every train row."""
    return np.concatenate([_load(self.directory / f"{name}.lengths.npy") for name in self.units]
                          or [np.zeros(0, np.int32)])

  def eval_rows(self) -> np.ndarray:
    """Every row of the held-out documents, [n, max_len]."""
    data = (self.directory / "eval.rows").read_bytes()
    return np.frombuffer(data, self.dtype).reshape(-1, self.max_len).astype(np.int32)

  def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """int32 train rows [len(rows), max_len] by their global indices."""
    rows = np.asarray(rows, np.int64)
    unit = np.searchsorted(self._starts, rows, side="right") - 1
    local = rows - self._starts[unit]
    out = np.zeros((len(rows), self.max_len), np.int32)
    width = self.max_len * self.dtype.itemsize
    if self._remote:
      paths = [str(self.directory / f"{self.units[u]}.rows") for u in unit]
      fs = _filesystem(paths[0]) if paths else None
      chunks = fs.cat_ranges(paths, list(local * width), list((local + 1) * width)) if paths else []
      for i, chunk in enumerate(chunks):
        out[i] = np.frombuffer(chunk, self.dtype)
      return out
    for u in np.unique(unit):
      name = self.units[u]
      if name not in self._maps:
        self._maps[name] = np.memmap(self.directory / f"{name}.rows", self.dtype, mode="r"
                                     ).reshape(-1, self.max_len)
      take = unit == u
      out[take] = self._maps[name][local[take]]
    return out


def _load(path: epath.Path) -> np.ndarray:
  with path.open("rb") as f:
    return np.load(f)


def _filesystem(path: str):
  import fsspec
  return fsspec.core.url_to_fs(path)[0]
