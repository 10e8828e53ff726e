"""Bad overrides and bad sweep grids fail in one line before anything runs; `sweep --plan` prints
the groups. In this process: the flags are parsed as the commands parse them."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from distil_jax import cli, sweep
from tests.configs import sweep_points

CONFIG = "--config=tests/configs/random_teacher.py"


def _parse(monkeypatch, *argv: str) -> None:
  """Parses `argv` as a command does (config_flags reads its overrides from sys.argv)."""
  monkeypatch.setattr(sys, "argv", list(argv))
  cli.parse_flags(list(argv))


@pytest.fixture(autouse=True)
def _unparsed_flags():
  yield
  flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("override, message", [
    ("--config.distill.temprature=4",
     "FATAL unknown config key 'temprature' in the overrides: did you mean \"temperature\"?"),
    ("--config.distill.temperature=hot",
     "FATAL Flags parsing error: flag --config.distill.temperature=hot: could not convert"),
])
def test_bad_overrides_fail_before_any_compute(capsys, monkeypatch, override, message):
  with pytest.raises(SystemExit) as exit_:
    _parse(monkeypatch, "main", CONFIG, override)
  output = f"{exit_.value.code}\n{capsys.readouterr().err}"
  assert any(line.startswith(message) for line in output.splitlines()), output[-2000:]
  assert "Traceback" not in output


@pytest.mark.parametrize("flag, message", [
    ("distill.temprature=1,2",
     "--sweep='distill.temprature=1,2': unknown config key 'distill.temprature' (did you "
     "mean 'distill.temperature'?)"),
    ("distill.temperature=hot", "--sweep value 'hot' for distill.temperature is not a float"),
    ("distill.temperature=", "--sweep='distill.temperature=' gives no value"),
])
def test_bad_grids_fail_before_any_compute(tmp_path, flag, message):
  with pytest.raises(sweep.SweepError) as error:
    sweep.sweep(sweep_points.get_config(),
                sweep.parse_sweeps(sweep_points.get_config(), [flag]), tmp_path / "sweep")
  assert str(error.value).startswith(message) and "\n" not in str(error.value)
  assert not (tmp_path / "sweep").exists()


def test_plan_splits_the_grid_where_shapes_differ(tmp_path, capsys, monkeypatch):
  _parse(monkeypatch, "sweep", "--config=tests/configs/sweep_points.py", f"--workdir={tmp_path}",
         "--plan", "--sweep=student.num_layers=1,2", "--sweep=distill.temperature=2,8")
  sweep.main([])
  groups = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [[p["workdir"] for p in g["points"]] for g in groups] == [
      ["L1_T2", "L1_T8"], ["L2_T2", "L2_T8"]]
  assert not (tmp_path / "sweep.json").exists()


def test_every_point_of_a_sweep_is_checked_before_any_is_trained(tmp_path, bert_dir):
  base = sweep_points.get_config()
  base.teacher = str(bert_dir)
  grid = sweep.parse_sweeps(base, ["optim.lr_peak=1e-3,-1"])
  with pytest.raises(sweep.SweepError, match=r"^point lr-1: 1 config value cannot run: "
                                             r"optim.lr_peak=-1.0: it must be a number in \(0, "):
    sweep.sweep(base, grid, tmp_path / "sweep")
  assert not (tmp_path / "sweep").exists()


def test_every_command_imports_beside_the_others():
  # A flag that two commands define alike (absl's DuplicateFlagError) breaks importing both, as
  # the Python API and the test workers do.
  commands = [p.stem for p in pathlib.Path(cli.__file__).parent.glob("*.py")
              if "cli.run(main)" in p.read_text()]
  assert {"main", "sweep", "compile", "prepare", "evaluate", "export"} <= set(commands)
  code = "; ".join(f"import distil_jax.{name}" for name in commands)
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})


_FAILURES = """
import sys, threading
from distil_jax import cli
cli.quiet_library_tracebacks()

class Finalized:
  def __del__(self):
    raise RuntimeError("Event loop is closed\\nsecond line")

Finalized()  # Unraisable, as from a native library's callback.

def native_print():  # What a native thread's PyErr_Print does: sys.excepthook, off the main thread.
  try:
    raise RuntimeError("from a native thread")
  except RuntimeError:
    sys.excepthook(*sys.exc_info())

for target in (native_print, lambda: 1 / 0):
  thread = threading.Thread(target=target, name="worker")
  thread.start()
  thread.join()
raise ValueError("a bug of ours")
"""


def test_libraries_exceptions_print_one_line_and_ours_their_traceback():
  """A traceback from asyncio's `call_soon_threadsafe`, printed by a library while an async
  checkpoint save failed, once broke a command's one-line FATAL ending."""
  result = subprocess.run([sys.executable, "-c", _FAILURES], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  lines = result.stderr.splitlines()
  assert result.returncode == 1
  assert any(line.endswith("RuntimeError in a callback: Event loop is closed") for line in lines)
  assert any(line.endswith("RuntimeError in thread worker: from a native thread")
             for line in lines)
  assert any(line.endswith("ZeroDivisionError in thread worker: division by zero")
             for line in lines)
  assert result.stderr.count("Traceback") == 1 and lines[-1] == "ValueError: a bug of ours"
