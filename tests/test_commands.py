"""Every command imports beside every other one: their flags do not clash."""

import subprocess
import sys

from tests import runs

COMMANDS = ("main", "sweep", "export", "evaluate", "report", "count_params", "finetune")


def test_all_commands_import_together():
  imports = "; ".join(f"import distil_jax.{name}" for name in COMMANDS)
  subprocess.run([sys.executable, "-c", imports], cwd=runs.ROOT, check=True, timeout=120)
