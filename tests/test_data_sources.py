"""Text sources cut into units and read back: every document once, in order; bad input errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from distil_jax.data import sources


class FakeWiki(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands for a catalogue dataset such as wikipedia: prepared elsewhere, its code not imported."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"title": tfds.features.Text(), "text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(30):
      yield i, {"title": f"T{i}", "text": f"article {i}"}


def _documents(source: str, tfds_data_dir=None) -> list[str]:
  return [text for unit in sources.plan(0, source, tfds_data_dir).units
          for text in sources.read(unit)]


def test_text_files_in_units_of_bytes_give_every_line_once_in_order(tmp_path, monkeypatch):
  lines = [f"line {i} " + "x" * (i % 7) for i in range(200)]
  (tmp_path / "a.txt").write_text("\n".join(lines[:150]) + "\n\n  \n")
  (tmp_path / "b.txt").write_text("\n".join(lines[150:]))  # No final newline.
  monkeypatch.setattr(sources, "UNIT_BYTES", 37)  # Units end inside lines and on newlines.
  plan = sources.plan(0, f"text:{tmp_path}/*.txt")
  assert len(plan.units) > 50
  assert _documents(f"text:{tmp_path}/*.txt") == [line.strip() for line in lines]
  assert sources.plan(0, f"text:{tmp_path}/*.txt").fingerprint == plan.fingerprint
  (tmp_path / "b.txt").write_text("changed\n")
  assert sources.plan(0, f"text:{tmp_path}/*.txt").fingerprint != plan.fingerprint


def test_jsonl_field(tmp_path):
  lines = [json.dumps({"body": f"doc {i}", "text": "other"}) for i in range(3)]
  (tmp_path / "docs.jsonl").write_text("\n".join(lines))
  assert _documents(f"jsonl:{tmp_path}/docs.jsonl:body") == ["doc 0", "doc 1", "doc 2"]


def test_parquet_column_by_row_groups(tmp_path):
  texts = [f"article {i}" if i % 5 else "" for i in range(100)]
  pq.write_table(pa.table({"id": list(range(100)), "text": texts}), tmp_path / "wiki.parquet",
                 row_group_size=30)
  assert len(sources.plan(0, f"parquet:{tmp_path}/*.parquet").units) == 4
  assert _documents(f"parquet:{tmp_path}/*.parquet") == [t for t in texts if t]
  with pytest.raises(ValueError, match=r"wiki.parquet has no column 'body': name one of"):
    _documents(f"parquet:{tmp_path}/*.parquet:body")


def test_catalogue_dataset_is_read_from_its_prepared_files(tmp_path, monkeypatch):
  FakeWiki(data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare()
  monkeypatch.setattr(sources, "_TFDS_UNIT", 7)
  assert len(sources.plan(0, "tfds:fake_wiki", str(tmp_path / "tfds")).units) == 5
  assert sorted(_documents("tfds:fake_wiki", str(tmp_path / "tfds"))) == sorted(
      f"article {i}" for i in range(30))
  assert sorted(_documents("tfds:fake_wiki:title", str(tmp_path / "tfds"))) == sorted(
      f"T{i}" for i in range(30))
  with pytest.raises(ValueError, match="no feature 'body'"):
    sources.plan(0, "tfds:fake_wiki:body", str(tmp_path / "tfds"))


def test_wiki_offline_is_the_default_corpus():
  documents = _documents("wiki_offline")
  assert len(documents) == 10_033
  assert any(text.startswith("20th-century classical music is Western art music")
             for text in documents)


@pytest.mark.parametrize(("source", "content", "error", "message"), [
    ("text:{}/*.txt", None, FileNotFoundError, r"no file matches '.*/\*\.txt'.*fix the path"),
    ("text:{}/latin1.txt", b"ok\ncaf\xe9\n", ValueError,
     r"latin1\.txt \(the line at byte 3\): byte 3 is not UTF-8"),
    ("jsonl:{}/bad.jsonl", b'{"text": 1}\n', ValueError,
     r"bad\.jsonl \(the line at byte 0\): not a JSON object with"),
    ("tfds:not_prepared", None, FileNotFoundError, r"'not_prepared' is not prepared .*tfds build"),
    ("books:{}", None, ValueError, r"unknown source 'books:.*' in config.data.sources: use"),
])
def test_bad_input_is_a_one_line_error(tmp_path, source, content, error, message):
  if content is not None:
    (tmp_path / source.split("/")[-1]).write_bytes(content)
  with pytest.raises(error, match=message) as raised:
    _documents(source.format(tmp_path), str(tmp_path))
  assert "\n" not in str(raised.value)
