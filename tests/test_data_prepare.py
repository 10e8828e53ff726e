"""The corpus prepared once: the same rows from 1 or 2 preparing processes, equal to packing the
documents by hand; resumed unit by unit; nothing redone when prepared; errors in one line."""

import json
import os
import pathlib

import numpy as np
import pytest

from distil_jax import resources, storage
from distil_jax.data import default_data_config, load_tokenizer, prepare, prepared, sources

MAX_LEN = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """300 Wikipedia lead sections in a text file, 60 more in a JSON-lines file."""
  extracts = [" ".join(e["extract"].split()) for e in list(json.loads(
      resources.wiki_offline_json().read_text()).values())[:360]]
  directory = tmp_path_factory.mktemp("corpus")
  (directory / "wiki.txt").write_text("\n".join(extracts[:300]) + "\n")
  (directory / "wiki.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in extracts[300:]))
  return directory, extracts


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(resources.minilm_dir(), 30522)


def _config(corpus_dir, data_dir, **overrides):
  config = default_data_config()
  config.update({"sources": (f"text:{corpus_dir}/*.txt", f"jsonl:{corpus_dir}/*.jsonl"),
                 "data_dir": str(data_dir), "max_len": MAX_LEN, "eval_examples": 10,
                 "pack": True, **overrides})
  return config


def _files(directory) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_one_or_two_processes_prepare_the_rows_of_the_documents(corpus, tokenizer, tmp_path,
                                                                monkeypatch):
  monkeypatch.setattr(sources, "UNIT_BYTES", 20_000)  # Several units per file.
  corpus_dir, extracts = corpus
  one = prepare.prepare(_config(corpus_dir, tmp_path / "one"), tokenizer, processes=1)
  two = prepare.prepare(_config(corpus_dir, tmp_path / "two"), tokenizer, processes=2)
  assert len(one.units) >= 8 and _files(one.directory) == _files(two.directory)
  # By hand: 5 held-out documents of each source; every unit's other documents packed in order.
  options = {"max_len": MAX_LEN, "min_len": 12, "pack": True}
  units = [u for i, s in enumerate(_config(corpus_dir, tmp_path).sources)
           for u in sources.plan(i, s).units]
  texts = [list(sources.read(u)) for u in units]
  assert [t for unit in texts for t in unit] == extracts  # Every document in one unit.
  for first in (0, [u.source for u in units].index(1)):  # Each source's first unit.
    texts[first] = texts[first][5:]
  expected = [prepared.rows_of(t, tokenizer, **options) for t in texts]
  np.testing.assert_array_equal(one.read(np.arange(len(one))),
                                np.concatenate([rows for rows, _, _ in expected]))
  rows = np.random.default_rng(0).permutation(len(one))[:40]
  np.testing.assert_array_equal(two.read(rows), np.concatenate([r for r, _, _ in expected])[rows])
  np.testing.assert_array_equal(one.counts(), sum(counts for _, _, counts in expected))
  assert one.tokens == sum(facts["tokens"] for _, facts, _ in expected)
  assert (one.read(np.arange(len(one))) != 0).mean() > 0.97  # Packed rows are full.
  np.testing.assert_array_equal(
      one.eval_rows(), prepared.rows_of(extracts[:5] + extracts[300:305], tokenizer,
                                        **options)[0])


def test_preparation_resumes_unit_by_unit_and_a_prepared_corpus_is_read_as_it_is(
    corpus, tokenizer, tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "UNIT_BYTES", 20_000)
  config = _config(corpus[0], tmp_path)
  first = prepare.prepare(config, tokenizer, processes=1)
  files = _files(first.directory)
  # An interruption: a unit not finished, the index not written.
  (first.directory / "unit-00003.json").unlink()
  (first.directory / prepared.INDEX).unlink()
  directory = pathlib.Path(first.directory)
  stamps = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
  redone = []
  monkeypatch.setattr(prepared, "prepare_unit", lambda job, run=prepared.prepare_unit: (
      redone.append(job.name), run(job))[1])
  again = prepare.prepare(config, tokenizer, processes=1)
  assert redone == ["unit-00003"] and _files(again.directory) == files
  assert all(p.stat().st_mtime_ns == stamps[p.name] for p in directory.iterdir()
             if p.name in stamps and not p.name.startswith(("unit-00003", "eval", "counts")))
  redone.clear()
  prepare.prepare(config, tokenizer, processes=1)
  assert not redone  # Prepared: nothing is read or written.
  other = prepare.prepare(_config(corpus[0], tmp_path, max_len=32), tokenizer, processes=1)
  assert other.directory != first.directory and other.max_len == 32


def test_processes_that_share_a_disk_prepare_one_directory_at_once(corpus, tokenizer, tmp_path,
                                                                   monkeypatch):
  """On local disks every process prepares every unit, so two processes on one machine (or on a
  shared file system) write the same files at once: here the other one writes the corpus's
  counts between our temporary file and its rename."""
  replace = os.replace

  def the_other_process_first(source, target):
    if pathlib.Path(target).name == "counts.npy":
      monkeypatch.setattr(storage.os, "replace", replace)
      prepare.prepare(_config(corpus[0], tmp_path / "shared"), tokenizer, processes=1)
    replace(source, target)

  monkeypatch.setattr(storage.os, "replace", the_other_process_first)
  ours = prepare.prepare(_config(corpus[0], tmp_path / "shared"), tokenizer, processes=1)
  alone = prepare.prepare(_config(corpus[0], tmp_path / "alone"), tokenizer, processes=1)
  assert os.replace is replace  # The other process ran.
  assert _files(ours.directory) == _files(alone.directory)  # And left no temporary file.


def test_bad_corpora_are_refused_in_one_line(corpus, tokenizer, tmp_path):
  (tmp_path / "empty.txt").write_text("\n \n")
  config = _config(corpus[0], tmp_path / "data")
  config.sources = (f"text:{tmp_path}/empty.txt",)
  with pytest.raises(ValueError, match=r"^no text in .*empty.txt: add documents"):
    prepare.prepare(config, tokenizer, processes=1)
  config.sources, config.eval_examples = (f"jsonl:{corpus[0]}/*.jsonl",), 60
  with pytest.raises(ValueError, match=r"^config.data.eval_examples=60 holds out all 60 "
                                       r"documents of .*wiki.jsonl: lower eval_examples"):
    prepare.prepare(config, tokenizer, processes=1)
