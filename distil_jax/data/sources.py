"""Text sources, cut into units that preparing processes read on their own.

A source is named by a string:
  "wiki_offline"            the packaged English Wikipedia lead sections (`resources.py`);
  "text:GLOB"               text files, one document per non-empty line;
  "jsonl:GLOB[:FIELD]"      JSON-lines files, one document per line in FIELD (default "text");
  "parquet:GLOB[:COLUMN]"   Parquet files, one document per row in COLUMN (default "text"), e.g.
                            HuggingFace's wikimedia/wikipedia;
  "tfds:NAME[:FEATURE]"     the "train" split of a TFDS dataset prepared in array_record format,
                            the document in FEATURE (default "text").
GLOB is a local or gs:// path with wildcards in its last component; FIELD, COLUMN and FEATURE are
Python identifiers. A source's documents are in a fixed order (files sorted by name), and `plan`
cuts them into units (byte ranges of about `UNIT_BYTES` of a text file, row groups of a Parquet
file, ranges of records of a TFDS dataset) that `read` reads independently.
"""

import dataclasses
import io
import json
import math
from collections.abc import Iterator
from typing import Any

from etils import epath

from distil_jax import errors, resources

_DEFAULT_FIELD = "text"
MAX_LINE_BYTES = 10_000_000  # A longer line is refused: a document is a line, not a file.
UNIT_BYTES = 16 * 2**20  # Text read by one unit: many units per core for a large corpus.
_TFDS_UNIT = 50_000  # Records of a TFDS dataset read by one unit.


@dataclasses.dataclass(frozen=True)
class Unit:
  """A share of one source's documents: `start` to `stop` of `path` (bytes of a text file, row
  groups of a Parquet file, records of a TFDS dataset; the whole of a JSON file)."""
  source: int  # Its index in config.data.sources.
  kind: str  # "text", "jsonl", "json_records", "parquet" or "tfds".
  path: str  # A file, or a TFDS dataset's name.
  start: int
  stop: int
  field: str = _DEFAULT_FIELD
  tfds_data_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
  """A source's units, in order, and a fingerprint that changes when its content may have."""
  units: tuple[Unit, ...]
  fingerprint: str


def plan(index: int, source: str, tfds_data_dir: str | None = None) -> Source:
  """The units of `source` (the `index`-th of config.data.sources)."""
  kind, _, location = source.partition(":")
  if kind == "wiki_offline" and not location:
    path = str(resources.wiki_offline_json())
    return Source((Unit(index, "json_records", path, 0, -1, "extract"),), _fingerprint([path]))
  if kind in ("text", "jsonl", "parquet") and location:
    pattern, field = _split_field(location)
    paths = _expand(pattern, source)
    if kind == "parquet":
      units = tuple(Unit(index, kind, p, g, g + 1, field) for p in paths
                    for g in range(_row_groups(p)))
    else:
      units = tuple(Unit(index, kind, p, start, min(start + UNIT_BYTES, size), field)
                    for p, size in zip(paths, map(_size, paths), strict=True)
                    for start in range(0, max(size, 1), UNIT_BYTES))
    return Source(units, _fingerprint(paths))
  if kind == "tfds" and location:
    name, feature = _split_field(location)
    records = _tfds_records(name, feature, tfds_data_dir)
    units = tuple(Unit(index, kind, name, start, min(start + _TFDS_UNIT, len(records)), feature,
                       tfds_data_dir) for start in range(0, len(records), _TFDS_UNIT))
    return Source(units, f"{records.dataset_info.full_name}:{len(records)}")
  raise errors.ConfigError(
      f"unknown source {source!r} in config.data.sources: use 'wiki_offline', 'text:GLOB', "
      "'jsonl:GLOB[:FIELD]', 'parquet:GLOB[:COLUMN]' or 'tfds:NAME[:FEATURE]'")


def read(unit: Unit) -> Iterator[str]:
  """The documents of `unit`, in order; a bad line is a one-line `ConfigError`."""
  if unit.kind == "tfds":
    records = _tfds_records(unit.path, unit.field, unit.tfds_data_dir)
    for record in records.__getitems__(list(range(unit.start, unit.stop))):
      text = _decode(record[unit.field], f"{unit.path} record")
      if text.strip():
        yield text
  elif unit.kind == "parquet":
    import pyarrow.parquet as pq
    with epath.Path(unit.path).open("rb") as f:
      file = pq.ParquetFile(f)
      if unit.field not in file.schema_arrow.names:
        raise errors.ConfigError(f"{unit.path} has no column {unit.field!r}: name one of "
                                 f"{file.schema_arrow.names} as 'parquet:GLOB:COLUMN'")
      for group in range(unit.start, unit.stop):
        for text in file.read_row_group(group, columns=[unit.field]).column(0).to_pylist():
          if isinstance(text, str) and text.strip():
            yield text
  elif unit.kind == "json_records":  # A JSON object {key: {field: text, ...}}.
    records = json.loads(_decode(epath.Path(unit.path).read_bytes(), unit.path))
    for record in records.values():
      if record.get(unit.field, "").strip():
        yield record[unit.field]
  else:
    for where, line in _lines(unit):
      if unit.kind == "text":
        yield line
      else:
        yield _json_field(line, unit.field, where)


def _lines(unit: Unit) -> Iterator[tuple[str, str]]:
  """(where, stripped text) of the non-empty lines that begin in the unit's byte range."""
  with epath.Path(unit.path).open("rb") as f:
    # A local file reads at most MAX_LINE_BYTES + 1 of a line; fsspec's (gs://) take no limit.
    limit = [MAX_LINE_BYTES + 1] if isinstance(f, io.BufferedIOBase) else []
    position = unit.start
    if position:  # The line under way at `start` belongs to the unit before.
      f.seek(position - 1)
      position += len(f.readline()) - 1
    while position < unit.stop:
      raw = f.readline(*limit)
      if not raw:
        return
      where = f"{unit.path} (the line at byte {position})"
      if len(raw) > MAX_LINE_BYTES:
        raise errors.ConfigError(
            f"{where} is over {MAX_LINE_BYTES / 1e6:.0f} MB on one line: split the document "
            "into lines (a paragraph each)")
      position += len(raw)
      text = _decode(raw, where).strip()
      if text:
        yield where, text


def _json_field(line: str, field: str, where: str) -> str:
  try:
    text = json.loads(line)[field]
  except (json.JSONDecodeError, KeyError, TypeError):
    text = None
  if not isinstance(text, str):
    raise errors.ConfigError(f"{where}: not a JSON object with a string field {field!r}: fix "
                             "the line or name the text field as 'jsonl:GLOB:FIELD'")
  return text


def _decode(raw: bytes | str, where: str) -> str:
  if isinstance(raw, str):
    return raw
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise errors.ConfigError(
        f"{where}: byte {error.start} is not UTF-8: re-encode the file as UTF-8, e.g. "
        "`iconv -f latin1 -t utf-8`") from None


def _split_field(location: str) -> tuple[str, str]:
  """"PATH:FIELD" -> (PATH, FIELD) if FIELD is an identifier (not "//host/..." nor "1.0.0")."""
  path, _, field = location.rpartition(":")
  return (path, field) if path and field.isidentifier() else (location, _DEFAULT_FIELD)


def _expand(pattern: str, source: str) -> tuple[str, ...]:
  path = epath.Path(pattern).expanduser()
  paths = tuple(str(p) for p in sorted(path.parent.glob(path.name)) if not p.is_dir())
  if not paths:
    raise errors.MissingInput(f"no file matches {pattern!r} (source {source!r}): fix the path in "
                              "config.data.sources")
  return paths


def _size(path: str) -> int:
  return epath.Path(path).stat().length


def _fingerprint(paths) -> str:
  """Names, sizes and modification times: a file that changes makes another fingerprint."""
  stats = [epath.Path(p).stat() for p in paths]
  return json.dumps([[p, s.length, math.floor(s.mtime)] for p, s in zip(paths, stats,
                                                                          strict=True)])


def _row_groups(path: str) -> int:
  import pyarrow.parquet as pq
  with epath.Path(path).open("rb") as f:
    return pq.ParquetFile(f).num_row_groups


def _tfds_records(name: str, feature: str, tfds_data_dir: str | None) -> Any:
  import tensorflow_datasets as tfds
  try:
    records = tfds.data_source(name, split="train", data_dir=tfds_data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.MissingInput(
        f"TFDS dataset {name!r} is not prepared in {tfds_data_dir or 'the default TFDS data dir'}: "
        f"build it with `tfds build {name} --file_format=array_record` or set "
        "config.data.tfds_data_dir") from None
  if feature not in records.dataset_info.features:
    raise errors.ConfigError(f"TFDS dataset {name!r} has no feature {feature!r}: name one of "
                             f"{sorted(records.dataset_info.features)} as 'tfds:{name}:FEATURE'")
  return records
