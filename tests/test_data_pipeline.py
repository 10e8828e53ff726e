"""End to end on a written corpus: batches, epochs, restarts, eval, buckets, two processes.

Run as a script, this file is one process of the two-process tests.
"""

import collections
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from distil_jax import resources
from distil_jax.data import (
  default_data_config,
  global_batch,
  load_tokenizer,
  make_datasets,
  prepare,
)
from tests import runs

CLS, SEP, PAD = 101, 102, 0
VOCAB = 30522
MAX_LEN, MIN_LEN, BATCH = 32, 12, 8


def _documents() -> list[str]:
  """80 Wikipedia lead sections on one line each."""
  extracts = json.loads(resources.wiki_offline_json().read_text()).values()
  return [" ".join(extract["extract"].split()) for extract in list(extracts)[:80]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
  """Two sources: 50 documents in a text file and 30 in a JSON-lines file."""
  directory = tmp_path_factory.mktemp("corpus")
  (directory / "wiki.txt").write_text("\n".join(_documents()[:50]))
  (directory / "wiki.jsonl").write_text("\n".join(json.dumps({"body": text})
                                                  for text in _documents()[50:]))
  return directory


def _config(corpus: pathlib.Path, workdir: pathlib.Path, **overrides):
  config = default_data_config()
  config.update({"sources": (f"text:{corpus}/*.txt", f"jsonl:{corpus}/*.jsonl:body"),
                 "data_dir": str(workdir), "max_len": MAX_LEN, "min_len": MIN_LEN,
                 "batch_size": BATCH, "eval_examples": 6, **overrides})
  return config


def _reference_sequences() -> collections.Counter:
  """[CLS] chunk [SEP] for chunks of MAX_LEN - 2 tokens of each document, the short ones dropped."""
  tokenizer = load_tokenizer(resources.minilm_dir())
  sequences = collections.Counter()
  for document in _documents():
    ids = tokenizer.encode(document, add_special_tokens=False).ids
    for start in range(0, len(ids), MAX_LEN - 2):
      chunk = ids[start:start + MAX_LEN - 2]
      if len(chunk) + 2 >= MIN_LEN:
        sequences[(CLS, *chunk, SEP)] += 1
  return sequences


def _unmasked_rows(batch) -> list[tuple[int, ...]]:
  ids = np.where(batch["labels"] >= 0, batch["labels"], batch["input_ids"])
  return [tuple(row[mask == 1].tolist()) for row, mask in zip(ids, batch["attention_mask"],
                                                              strict=True)]


def _epoch(datasets, epochs: int = 1) -> list[tuple[int, ...]]:
  """The first `epochs` epochs of this process's train rows, unmasked."""
  rows = []
  while len(rows) < epochs * datasets.train_sequences:
    rows += _unmasked_rows(next(datasets.train))
  return rows[:epochs * datasets.train_sequences]


def test_batches_are_masked_bert_inputs(corpus, tmp_path):
  datasets = make_datasets(_config(corpus, tmp_path), resources.minilm_dir(), VOCAB)
  for batch in [next(datasets.train) for _ in range(20)] + list(datasets.eval):
    assert {name: (a.shape, a.dtype) for name, a in batch.items()} == dict.fromkeys(
        ("input_ids", "attention_mask", "labels"), ((BATCH, MAX_LEN), np.int32))
    lengths = batch["attention_mask"].sum(axis=1)
    np.testing.assert_array_equal(batch["attention_mask"], np.arange(MAX_LEN) < lengths[:, None])
    real = lengths > 0  # Only the last eval batch has empty rows.
    assert (batch["input_ids"][real, 0] == CLS).all()
    assert (batch["input_ids"][real, lengths[real] - 1] == SEP).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == PAD).all()
    chosen = batch["labels"] != -100
    assert not np.isin(batch["labels"][chosen], (PAD, 100, CLS, SEP, 103)).any()
    n = lengths - 2  # No [UNK] in this text: every real token but [CLS] and [SEP] is a candidate.
    assert ((chosen.sum(1) == 15 * n // 100) | (chosen.sum(1) == -(-15 * n // 100))).all()


def test_train_and_eval_hold_every_sequence_once_and_epochs_reshuffle(corpus, tmp_path):
  datasets = make_datasets(_config(corpus, tmp_path), resources.minilm_dir(), VOCAB)
  rows = _epoch(datasets, epochs=2)
  first, second = rows[:datasets.train_sequences], rows[datasets.train_sequences:]
  eval_rows = [row for batch in datasets.eval for row in _unmasked_rows(batch) if row]
  assert collections.Counter(first) + collections.Counter(eval_rows) == _reference_sequences()
  assert collections.Counter(second) == collections.Counter(first) and second != first


def test_restart_from_state_continues_with_the_same_batches(corpus, tmp_path):
  config = _config(corpus, tmp_path, mlm_smoothing=0.0)
  train = make_datasets(config, resources.minilm_dir(), VOCAB).train
  for _ in range(7):
    next(train)
  state = json.dumps(train.get_state())
  expected = [next(train) for _ in range(3)]
  restarted = make_datasets(config, resources.minilm_dir(), VOCAB).train
  restarted.set_state(json.loads(state))
  for batch, again in zip(expected, [next(restarted) for _ in range(3)], strict=True):
    for name in batch:
      np.testing.assert_array_equal(batch[name], again[name])


def test_eval_batches_are_the_standard_evaluation_the_same_for_every_seed(corpus, tmp_path):
  """Uniformly chosen positions, all [MASK]: whatever the seed, the training masking or the
  eval batch size."""
  first = make_datasets(_config(corpus, tmp_path), resources.minilm_dir(), VOCAB).eval
  other = make_datasets(_config(corpus, tmp_path, seed=1, mlm_smoothing=0.0, eval_batch_size=2),
                        resources.minilm_dir(), VOCAB).eval
  assert len(other) > len(first) > 1
  real_rows = lambda batches, name: np.concatenate([b[name][b["attention_mask"].any(axis=1)]
                                                    for b in batches])
  for name in first[0]:
    np.testing.assert_array_equal(real_rows(first, name), real_rows(other, name), err_msg=name)
  labels = np.concatenate([b["labels"].ravel() for b in first])
  input_ids = np.concatenate([b["input_ids"].ravel() for b in first])
  chosen = labels != -100
  np.testing.assert_array_equal(input_ids[chosen], 103)  # [MASK], never kept or random.
  real = sum(int(((b["attention_mask"] == 1) & ~np.isin(b["input_ids"], (CLS, SEP))).sum())
             for b in first)
  per_batch = [int((b["labels"] != -100).sum()) for b in first]
  # Each row rounds 15% of its candidates up or down at random (by the fraction): 4 standard
  # deviations of the sum of those Bernoulli draws, at most sqrt(rows) / 2.
  rows = sum(int(b["attention_mask"].any(axis=1).sum()) for b in first)
  assert sum(per_batch) == pytest.approx(0.15 * real, abs=2 * rows**0.5)


def test_buckets_pad_to_the_smallest_length_that_fits(corpus, tmp_path):
  datasets = make_datasets(_config(corpus, tmp_path, bucket=(16,)), resources.minilm_dir(), VOCAB)
  widths = collections.Counter()
  for _ in range(60):
    batch = next(datasets.train)
    width = batch["input_ids"].shape[1]
    lengths = batch["attention_mask"].sum(axis=1)
    assert (lengths <= width).all() and (width == 16 or (lengths > 16).all())
    widths[width] += 1
  reference = _reference_sequences()
  short = sum(n for row, n in reference.items() if len(row) <= 16) / sum(reference.values())
  assert set(widths) == {16, MAX_LEN}
  assert widths[16] / 60 == pytest.approx(short, abs=0.05)  # Buckets mixed by their sizes.


def test_global_batch_of_one_process(corpus, tmp_path):
  batch = next(make_datasets(_config(corpus, tmp_path), resources.minilm_dir(), VOCAB).train)
  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  arrays = global_batch(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  for name, array in arrays.items():
    np.testing.assert_array_equal(np.asarray(array), batch[name])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"min_len": 2}, r"min_len=2: it must be an integer >= 3"),
    ({"bucket": (32,)}, r"bucket=\(32,\), max_len=32: they must be bucket lengths ascending, "
                        r"each in \[3, max_len\)"),
    ({"eval_examples": 80}, r"eval_examples=80 holds out all 30 documents of .*wiki.jsonl"),
])
def test_bad_config_is_a_one_line_error(corpus, tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    make_datasets(_config(corpus, tmp_path, **overrides), resources.minilm_dir(), VOCAB)


@pytest.mark.slow
@pytest.mark.parametrize("shared", [False, True], ids=["local", "gs"])
def test_two_processes_read_their_rows_of_the_one_process_batches(corpus, tmp_path, request,
                                                                  shared):
  """The batches do not depend on the number of processes: each reads its rows of them. On a
  bucket (shared), the two prepare half of the units each, and read all of them."""
  environment, data_dir = {}, str(tmp_path)
  if shared:
    gcs = request.getfixturevalue("gcs")
    environment, data_dir = gcs.env, f"{gcs.bucket}/two_processes"
  assert _two_processes(corpus, data_dir, tmp_path, environment) == [0, 0]
  parts = [np.load(tmp_path / f"process_{i}.npz") for i in range(2)]
  one = make_datasets(_config(corpus, tmp_path), resources.minilm_dir(), VOCAB)
  expected = _first_batches(one)
  for name, array in expected.items():
    np.testing.assert_array_equal(np.concatenate([p[name] for p in parts], axis=1), array,
                                  err_msg=name)
  assert all(int(p["global_rows"]) == BATCH for p in parts)


@pytest.mark.slow
def test_a_process_that_fails_to_prepare_the_data_ends_the_other(corpus, tmp_path):
  """Process 1 cannot write its units; process 0, done with its own, stops too instead of
  waiting for it."""
  exit_codes = _two_processes(corpus, str(tmp_path), tmp_path, {}, failing="1")
  logs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
  assert 0 not in exit_codes
  assert "OSError: [Errno 28] No space left on device" in logs[1]
  assert "PeerFailed: process 1 failed preparing the data: its log says why" in logs[0]


def _two_processes(corpus, data_dir: str, out: pathlib.Path, environment: dict[str, str],
                   failing: str = "") -> list[int]:
  """The exit codes of two processes of `_worker`; their output goes to out/process_N.log."""
  port = runs.free_port()
  repository = pathlib.Path(__file__).resolve().parents[1]
  environment = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repository),
                 **environment}
  logs = [(out / f"process_{i}.log").open("w") for i in range(2)]
  workers = [subprocess.Popen([sys.executable, __file__, str(corpus), data_dir, str(port), str(i),
                               str(out), failing], env=environment, stdout=log,
                              stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
  try:
    return [worker.wait(timeout=120) for worker in workers]
  finally:
    for worker, log in zip(workers, logs, strict=True):
      worker.kill()
      log.close()


def _first_batches(datasets, steps: int = 5) -> dict[str, np.ndarray]:
  """The first train batches and all eval batches, stacked: [batches, rows, length] per name."""
  batches = [next(datasets.train) for _ in range(steps)] + list(datasets.eval)
  return {f"{name}": np.stack([b[name] for b in batches]) for name in batches[0]}


def _worker(corpus: str, data_dir: str, port: str, process_id: str, out: str,
            failing: str) -> None:
  """One of two processes: writes its rows of the first batches, and the global batch size, to
  `out`. Process `failing` finds its disk full when it prepares its units."""
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=int(process_id))
  if process_id == failing:
    prepare._run = _disk_full
  datasets = make_datasets(_config(pathlib.Path(corpus), data_dir), resources.minilm_dir(), VOCAB)
  rows = _first_batches(datasets)
  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  batch = next(datasets.train)
  arrays = global_batch(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  (local,) = arrays["input_ids"].addressable_shards
  np.testing.assert_array_equal(local.data, batch["input_ids"])
  np.savez(pathlib.Path(out) / f"process_{process_id}.npz",
           global_rows=arrays["input_ids"].shape[0], **rows)


def _disk_full(*_):
  raise OSError(28, "No space left on device")


if __name__ == "__main__":
  _worker(*sys.argv[1:])
