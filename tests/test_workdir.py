"""Tests of distil_jax.workdir: what a workdir records, its lock and its heartbeat."""

import pytest

from distil_jax import workdir


def test_config_round_trip_and_corrupt_config(tmp_path):
  config = {"model": {"layers": 6, "dim": 384}, "lr": 5e-4, "name": "tiny", "seq": [1, 2]}
  workdir.write_config(tmp_path / "run", config)
  text = (tmp_path / "run" / "config.json").read_text()
  assert text.startswith('{\n  "lr": 0.0005,\n  "model": {\n    "dim": 384,')
  assert workdir.read_config(tmp_path / "run") == config
  (tmp_path / "run" / "config.json").write_text('{"lr": ')
  with pytest.raises(workdir.WorkdirError) as error:
    workdir.read_config(tmp_path / "run")
  assert "\n" not in str(error.value)
  assert str(error.value).startswith(f"{tmp_path}/run/config.json is not valid JSON (")
  with pytest.raises(workdir.WorkdirError, match=r"config.json does not exist; pass"):
    workdir.read_config(tmp_path / "elsewhere")
