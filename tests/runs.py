"""Short runs of the commands on a random teacher and real text, for end-to-end tests."""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import ml_collections

ROOT = pathlib.Path(__file__).parent.parent
CONFIG = "tests/configs/random_teacher.py"


def free_port() -> int:
  """A port of localhost that nothing listens on now: a coordinator's, for jax.distributed."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def corpus_file(directory: pathlib.Path, documents: int = 400) -> pathlib.Path:
  """The first `documents` Wikipedia lead sections of the offline package, one per line."""
  from distil_jax import resources
  records = json.loads(resources.wiki_offline_json().read_text())
  path = directory / "wiki.txt"
  path.write_text("\n".join(r["extract"].replace("\n", " ")
                            for r in list(records.values())[:documents]) + "\n")
  return path


def config(bert_dir: pathlib.Path, corpus: pathlib.Path, path: str = CONFIG,
           **overrides) -> ml_collections.ConfigDict:
  """The test config at `path` on `bert_dir` and `corpus`, with dotted-key `overrides`."""
  spec = importlib.util.spec_from_file_location("test_config", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  result = module.get_config()
  result.update_from_flattened_dict({
      "teacher": str(bert_dir), "data.sources": (f"text:{corpus}",),
      "data.data_dir": str(corpus.parent / "data"), **overrides})
  return result


def start(module: str, workdir: pathlib.Path | str, bert_dir: pathlib.Path | str,
          corpus: pathlib.Path | str, *flags: str, config_path: str = CONFIG,
          devices: int | None = None, env: dict[str, str] | None = None,
          data_dir: pathlib.Path | None = None) -> subprocess.Popen:
  """`python -m distil_jax.<module>` on the test config, as a user runs it (in `env`); with
  `config_path` None, on the workdir alone (a run resumed with its saved config)."""
  data_dir = data_dir or pathlib.Path(corpus).parent / "data"
  inputs = []
  if config_path:
    inputs = [f"--config={config_path}", f"--config.teacher={bert_dir}",
              f"--config.data.sources=('text:{corpus}',)", f"--config.data.data_dir={data_dir}"]
  return launch(module, *inputs, f"--workdir={workdir}", *flags, devices=devices, env=env)


def launch(module: str, *flags: str, devices: int | None = None,
           env: dict[str, str] | None = None) -> subprocess.Popen:
  """`python -m distil_jax.<module> FLAGS...` on the CPU (with `devices` of them), in `env`."""
  env = {**(env or os.environ), "JAX_PLATFORMS": "cpu"}
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.Popen([sys.executable, "-m", f"distil_jax.{module}", *flags], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*processes: subprocess.Popen, returncode: int = 0) -> list[str]:
  """The outputs of `processes`, which must end with `returncode`."""
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for p, output in zip(processes, outputs, strict=True):
    assert p.returncode == returncode, output[-3000:]
  return outputs


def train_losses(workdir: pathlib.Path | None = None, text: str | None = None
                 ) -> dict[int, float]:
  """The loss of every logged train step in `workdir`'s metrics.jsonl (or its `text`); a step
  logged twice fails the test."""
  text = (workdir / "metrics.jsonl").read_text() if text is None else text
  rows = [json.loads(line) for line in text.splitlines()]
  steps = [r["step"] for r in rows if r["kind"] == "train"]
  assert len(steps) == len(set(steps)), "a step was logged twice"
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
