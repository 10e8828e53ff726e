"""Text corpora as TFDS datasets in array_record format, read back with random access.

A source is named by a string:
  "wiki_offline"          the packaged English Wikipedia lead sections (`resources.py`);
  "text:PATTERN"          text files, one document per non-empty line;
  "jsonl:PATTERN[:FIELD]" JSON-lines files, one document per line in FIELD (default "text");
  "tfds:NAME[:FEATURE]"   the "train" split of a TFDS dataset prepared in array_record format,
                          e.g. "tfds:wikipedia/20230601.en", the document in FEATURE ("text").
FIELD and FEATURE are Python identifiers.
PATTERN is a local or remote (gs://) path with wildcards in its last component. Local kinds are
prepared once into `data_dir` by the `TextCorpus` builder; catalogue datasets are never downloaded.
"""

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

from distil_jax import errors, resources
from distil_jax.data import files

_DEFAULT_FIELD = "text"
MAX_LINE_BYTES = 10_000_000  # A longer line is refused: a document is a line, not a file.


@dataclasses.dataclass(frozen=True)
class Documents:
  """Random access to the documents of one source."""

  records: Sequence[dict]  # a TFDS data source
  feature: str  # the feature holding the document text
  fingerprint: str  # changes whenever the content may have changed

  def __len__(self) -> int:
    return len(self.records)

  def texts(self, start: int, stop: int) -> list[str]:
    """Documents `start` to `stop` (excluded), in the prepared dataset's fixed order."""
    records = self.records.__getitems__(list(range(start, stop)))
    return [_decode(record[self.feature], self.fingerprint) for record in records]


@dataclasses.dataclass
class TextCorpusConfig(tfds.core.BuilderConfig):
  """Which local files make the corpus and how to read them."""

  kind: str = "text"  # "text", "jsonl" or "json_records"
  paths: tuple[str, ...] = ()
  field: str = _DEFAULT_FIELD


class TextCorpus(tfds.core.GeneratorBasedBuilder):
  """Documents of local (or gs://) text files, one feature "text"."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, str]]]:
    config = self.builder_config
    read = _READERS[config.kind]
    count = 0
    for file_index, path in enumerate(config.paths):
      for line, text in read(epath.Path(path), config.field):
        count += 1
        yield f"{file_index}:{line}", {"text": text}
    if not count:
      raise errors.ConfigError(
          f"no text in {', '.join(config.paths)}: add documents to the files or "
          "remove them from config.data.sources")


def open_documents(source: str, data_dir: pathlib.Path, tfds_data_dir: str | None) -> Documents:
  """The documents of `source` (see the module docstring), preparing local files if needed."""
  kind, _, location = source.partition(":")
  if kind == "wiki_offline" and not location:
    return _prepare("json_records", (str(resources.wiki_offline_json()),), "extract", data_dir)
  if kind in ("text", "jsonl") and location:
    pattern, field = _split_field(location)
    return _prepare(kind, _expand(pattern, source), field, data_dir)
  if kind == "tfds" and location:
    return _catalogue(*_split_field(location), tfds_data_dir)
  raise errors.ConfigError(f"unknown source {source!r} in config.data.sources: use 'wiki_offline', "
                           "'text:PATTERN', 'jsonl:PATTERN[:FIELD]' or 'tfds:NAME[:FEATURE]'")


def _prepare(kind: str, paths: tuple[str, ...], field: str, data_dir: pathlib.Path) -> Documents:
  """Prepares (once) and opens the files as a `TextCorpus`, named by their paths, sizes, times."""
  stats = [epath.Path(path).stat() for path in paths]
  identity = json.dumps([kind, field, paths, [(s.length, s.mtime) for s in stats]])
  name = f"{kind}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
  config = TextCorpusConfig(name=name, kind=kind, paths=paths, field=field)
  with files.exclusive_lock(data_dir / f"text_corpus-{name}.lock"):  # The builder reads its info.
    builder = TextCorpus(config=config, data_dir=str(data_dir), file_format="array_record")
    tfds.disable_progress_bar()  # Its "Downloading..." would mislead: nothing is downloaded.
    builder.download_and_prepare(file_format="array_record")
  return Documents(builder.as_data_source(split="train"), "text", builder.info.full_name)


def _catalogue(name: str, feature: str, tfds_data_dir: str | None) -> Documents:
  try:
    records = tfds.data_source(name, split="train", data_dir=tfds_data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.MissingInput(
        f"TFDS dataset {name!r} is not prepared in {tfds_data_dir or 'the default TFDS data dir'}: "
        f"build it with `tfds build {name} --file_format=array_record` or set "
        "config.data.tfds_data_dir") from None
  info = records.dataset_info
  if feature not in info.features:
    raise errors.ConfigError(f"TFDS dataset {name!r} has no feature {feature!r}: name one of "
                             f"{sorted(info.features)} as 'tfds:{name}:FEATURE'")
  return Documents(records, feature, f"{info.full_name}:{len(records)}")


def _split_field(location: str) -> tuple[str, str]:
  """"PATH:FIELD" -> (PATH, FIELD) if FIELD is an identifier (not "//host/..." nor "1.0.0")."""
  path, _, field = location.rpartition(":")
  return (path, field) if path and field.isidentifier() else (location, _DEFAULT_FIELD)


def _expand(pattern: str, source: str) -> tuple[str, ...]:
  path = epath.Path(pattern).expanduser()
  paths = tuple(str(p) for p in sorted(path.parent.glob(path.name)))
  if not paths:
    raise errors.MissingInput(f"no file matches {pattern!r} (source {source!r}): fix the path in "
                              "config.data.sources")
  return paths


def _decode(raw: bytes | str, where: str) -> str:
  if isinstance(raw, str):
    return raw
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as error:
    raise errors.ConfigError(
        f"{where}: byte {error.start} is not UTF-8: re-encode the file as UTF-8, e.g. "
        "`iconv -f latin1 -t utf-8`") from None


def _read_lines(path: epath.Path, field: str) -> Iterator[tuple[int, str]]:
  del field  # A line is a document.
  with path.open("rb") as f:
    for line_number, raw in enumerate(f, 1):
      if len(raw) > MAX_LINE_BYTES:
        raise errors.ConfigError(
            f"{path}:{line_number} is {len(raw) / 1e6:.0f} MB on one line, over "
            f"{MAX_LINE_BYTES / 1e6:.0f} MB: split the document into lines (a paragraph each)")
      text = _decode(raw, f"{path}:{line_number}").strip()
      if text:
        yield line_number, text


def _read_jsonl(path: epath.Path, field: str) -> Iterator[tuple[int, str]]:
  for line_number, line in _read_lines(path, field):
    try:
      text = json.loads(line)[field]
    except (json.JSONDecodeError, KeyError, TypeError):
      text = None
    if not isinstance(text, str):
      raise errors.ConfigError(
          f"{path}:{line_number}: not a JSON object with a string field {field!r}: "
          "fix the line or name the text field as 'jsonl:PATTERN:FIELD'")
    if text.strip():
      yield line_number, text


def _read_json_records(path: epath.Path, field: str) -> Iterator[tuple[int, str]]:
  """A JSON object {key: {field: text, ...}}, as the wiki_offline summaries."""
  records = json.loads(_decode(path.read_bytes(), str(path)))
  for index, record in enumerate(records.values()):
    if record.get(field, "").strip():
      yield index, record[field]


_READERS = {"text": _read_lines, "jsonl": _read_jsonl, "json_records": _read_json_records}
