"""Shared fixtures: small random HuggingFace BERT checkpoints built locally (no downloads), and a
local GCS emulator. The tests, and the commands they start, share a JAX compilation cache kept
between runs in .cache/jax_tests (at most 2 GB, least recently used dropped first): programs of
the same shapes compile once, and an edit-test loop recompiles only what the edit changed."""

import os
import pathlib
from collections.abc import Iterator

# With libtpu installed (for tests/test_tpu.py's compile-only devices), JAX would probe for a TPU
# at start-up in every test and every command a test starts: 0.15 s and five lines of stderr.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).parents[1] / ".cache" / "jax_tests"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024**3))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import gcs_emulator
import pytest

from distil_jax.testing import save_random_bert
from tests import runs


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> pathlib.Path:
  """A random 4-layer BERT with MiniLM's tokenizer files."""
  return save_random_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> pathlib.Path:
  """400 real Wikipedia lead sections, one per line (its data cache beside it)."""
  return runs.corpus_file(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def gcs() -> Iterator[gcs_emulator.Emulator]:
  """A local GCS emulator with one bucket: `.bucket` ("gs://NAME"), `.env` for subprocesses."""
  with gcs_emulator.running("distil-jax-test") as emulator:
    yield emulator
