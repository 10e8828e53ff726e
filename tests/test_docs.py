"""The fault table of docs/reliability.md names tests that exist: `make test` runs the whole
table."""

import ast
import re

from tests import runs


def _tests(path) -> set[str]:
  tree = ast.parse(path.read_text())
  return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
          and node.name.startswith("test_")}


def test_every_test_the_fault_table_names_exists():
  text = (runs.ROOT / "docs" / "reliability.md").read_text()
  named = re.findall(r"`(test_\w+\.py)::(test_\w+)", text)
  assert len(named) > 25
  for file, test in named:
    assert test in _tests(runs.ROOT / "tests" / file), f"{file}::{test}"
