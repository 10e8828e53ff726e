"""Shared fixtures: small random HuggingFace BERT checkpoints built locally (no downloads)."""

import pathlib

import pytest

from distil_jax.testing import save_random_bert


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> pathlib.Path:
  """A random 4-layer BERT with MiniLM's tokenizer files."""
  return save_random_bert(tmp_path_factory.mktemp("bert"))
