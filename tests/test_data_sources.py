"""Text sources prepared as TFDS array_record datasets and read back; bad input errors."""

import json

import pytest
import tensorflow_datasets as tfds

from distil_jax.data import open_documents


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


def _texts(documents) -> list[str]:
  return sorted(documents.texts(0, len(documents)))


def test_text_files_round_trip(tmp_path):
  (tmp_path / "a.txt").write_text("first line\n\n  second line \n")
  (tmp_path / "b.txt").write_text("third line\n")
  documents = open_documents(f"text:{tmp_path}/*.txt", tmp_path / "data", None)
  assert _texts(documents) == ["first line", "second line", "third line"]
  again = open_documents(f"text:{tmp_path}/*.txt", tmp_path / "data", None)
  assert again.fingerprint == documents.fingerprint
  assert len(list((tmp_path / "data" / "text_corpus").glob("*/1.0.0"))) == 1  # Prepared once.


def test_jsonl_field(tmp_path):
  lines = [json.dumps({"body": f"doc {i}", "text": "other"}) for i in range(3)]
  (tmp_path / "docs.jsonl").write_text("\n".join(lines))
  documents = open_documents(f"jsonl:{tmp_path}/docs.jsonl:body", tmp_path / "data", None)
  assert _texts(documents) == ["doc 0", "doc 1", "doc 2"]


def test_catalogue_dataset_is_read_from_its_prepared_files(tmp_path):
  FakeWiki(data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare()
  documents = open_documents("tfds:fake_wiki", tmp_path / "data", str(tmp_path / "tfds"))
  assert _texts(documents) == sorted(f"article {i}" for i in range(30))
  titles = open_documents("tfds:fake_wiki:title", tmp_path / "data", str(tmp_path / "tfds"))
  assert _texts(titles) == sorted(f"T{i}" for i in range(30))
  with pytest.raises(ValueError, match="no feature 'body'"):
    open_documents("tfds:fake_wiki:body", tmp_path / "data", str(tmp_path / "tfds"))


def test_wiki_offline_is_the_default_corpus(tmp_path):
  documents = open_documents("wiki_offline", tmp_path, None)
  assert len(documents) == 10_033
  assert any(text.startswith("20th-century classical music is Western art music")
             for text in documents.texts(0, len(documents)))


@pytest.mark.parametrize(("source", "content", "error", "message"), [
    ("text:{}/*.txt", None, FileNotFoundError, r"no file matches '.*/\*\.txt'.*fix the path"),
    ("text:{}/empty.txt", b"\n  \n", ValueError, r"no text in .*/empty\.txt: add documents"),
    ("text:{}/latin1.txt", b"ok\ncaf\xe9\n", ValueError, r"latin1\.txt:2: byte 3 is not UTF-8"),
    ("jsonl:{}/bad.jsonl", b'{"text": 1}\n', ValueError, r"bad\.jsonl:1: not a JSON object with"),
    ("tfds:not_prepared", None, FileNotFoundError, r"'not_prepared' is not prepared .*tfds build"),
    ("books:{}", None, ValueError, r"unknown source 'books:.*' in config.data.sources: use"),
])
def test_bad_input_is_a_one_line_error(tmp_path, source, content, error, message):
  if content is not None:
    (tmp_path / source.split("/")[-1]).write_bytes(content)
  with pytest.raises(error, match=message) as raised:
    open_documents(source.format(tmp_path), tmp_path / "data", str(tmp_path))
  assert "\n" not in str(raised.value)
