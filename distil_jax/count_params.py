r"""Prints parameter counts of teachers and their half-depth students.

  python -m distil_jax.count_params bert-base-uncased /path/to/hf_checkpoint_dir

A model is a preset name (`distil_jax.models.PRESETS`) or a HuggingFace checkpoint directory
(only its config.json is read). Counts include the MLM head with its decoder tied to the word
embeddings, as HuggingFace counts `BertForMaskedLM` / `DistilBertForMaskedLM`.
"""

import dataclasses
import pathlib
from collections.abc import Sequence

from absl import app

from distil_jax import cli, hf, models


def model_config(name_or_dir: str) -> models.ModelConfig:
  """A preset's config, or the config of a local HuggingFace checkpoint directory."""
  if name_or_dir in models.PRESETS:
    return models.PRESETS[name_or_dir]
  if not pathlib.Path(name_or_dir).is_dir():
    raise app.UsageError(f"{name_or_dir!r} is neither a preset ({', '.join(models.PRESETS)}) "
                         "nor a checkpoint directory: pass one of those")
  return hf.read_config(pathlib.Path(name_or_dir))[0]


def table(names: Sequence[str]) -> str:
  """One row per teacher and one per student with half its layers and no token types."""
  rows = [("model", "layers", "hidden", "parameters", "vs teacher")]
  for name in names:
    teacher = model_config(name)
    student = dataclasses.replace(teacher, num_layers=max(1, teacher.num_layers // 2),
                                  type_vocab_size=0)
    n_teacher, n_student = models.count_params(teacher), models.count_params(student)
    rows.append((name, str(teacher.num_layers), str(teacher.hidden_size), f"{n_teacher:,}", ""))
    rows.append(("  student", str(student.num_layers), str(student.hidden_size),
                 f"{n_student:,}", f"{n_student / n_teacher - 1:+.1%}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                   for row in rows)


def main(argv: Sequence[str]) -> None:
  print(table(argv[1:] or list(models.PRESETS)[:1]))


if __name__ == "__main__":
  cli.run(main)
