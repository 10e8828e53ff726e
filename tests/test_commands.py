"""Every command imports beside every other one, the installed package runs from anywhere, and
the house is layered."""

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tomllib

from tests import runs

COMMANDS = ("main", "sweep", "export", "evaluate", "report", "count_params", "finetune",
            "prepare")


def test_all_commands_import_together():
  imports = "; ".join(f"import distil_jax.{name}" for name in COMMANDS)
  subprocess.run([sys.executable, "-c", imports], cwd=runs.ROOT, check=True, timeout=120)


def test_the_installed_package_runs_from_any_directory_and_pins_requirements_txt(tmp_path):
  """`pip install -e .` (make install) put the package on the path: `--helpfull` works outside
  the checkout, and its dependencies are requirements.txt's pins."""
  process = subprocess.run([sys.executable, "-m", "distil_jax.main", "--helpfull"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert "Traceback" not in process.stderr, process.stderr[-2000:]
  assert "--workdir" in process.stdout and "--resume_step" in process.stdout  # absl exits 1.
  pins = [re.sub(r"\s*#.*", "", line).strip()
          for line in (runs.ROOT / "requirements.txt").read_text().splitlines()]
  assert importlib.metadata.requires("distil_jax") == [p for p in pins if p]
  project = tomllib.loads((runs.ROOT / "pyproject.toml").read_text())
  minimum = project["project"]["requires-python"]
  assert importlib.metadata.metadata("distil_jax")["Requires-Python"] == minimum
  assert project["tool"]["ruff"]["target-version"] == "py" + minimum.lstrip(">=").replace(".", "")


def _imports(module: str) -> set[str]:
  """The distil_jax modules that `distil_jax/<module>.py` imports."""
  tree = ast.parse((runs.ROOT / "distil_jax" / f"{module}.py").read_text())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distil_jax"):
      found |= ({a.name for a in node.names} if node.module == "distil_jax"
                else {node.module.split(".")[1]})
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("distil_jax.")}
  return found


def test_the_house_is_layered():
  """Nothing imports a command; losses never import models; data knows no model or step; the
  steps know no loop, task or workdir; only the tasks use the loop."""
  modules = [p.stem for p in (runs.ROOT / "distil_jax").glob("*.py") if p.stem != "__init__"]
  imports = {m: _imports(m) for m in modules}
  commands = set(COMMANDS)
  for module, names in imports.items():
    assert not names & (commands - {module}), module
  assert "models" not in imports["losses"]
  data_files = [p.relative_to(runs.ROOT / "distil_jax").with_suffix("").as_posix()
                for p in (runs.ROOT / "distil_jax" / "data").glob("*.py")]
  for name in data_files:
    assert not _imports(name) & {"models", "distill_step", "classify_step", "optim", "loop",
                                 "train", "hf", "student"}, name
  for step in ("optim", "distill_step", "classify_step"):
    assert not imports[step] & {"loop", "train", "workdir", "checkpoint", "data"}, step
  assert {m for m, names in imports.items() if "loop" in names} == {"train", "finetune"}


def test_a_command_on_a_machine_without_a_tpu_starts_quietly_with_libtpu_installed():
  """libtpu (requirements-dev.txt) would make JAX probe for a TPU at start-up: 0.15 s and five
  lines of libtpu's complaints; a command keeps JAX on the CPU where no TPU device exists."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  process = subprocess.run([sys.executable, "-m", "distil_jax.count_params", "bert-base-uncased"],
                           cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert process.returncode == 0 and "66,985,530" in process.stdout, process.stderr
  assert importlib.util.find_spec("libtpu") is not None  # What makes the check meaningful here.
  assert "TPU" not in process.stderr and "libtpu" not in process.stderr, process.stderr
