r"""Exports the model of a run's checkpoint as a HuggingFace directory.

  python -m distil_jax.export --workdir=DIR --out=HF_DIR [--step=N]

A student becomes a `DistilBertForMaskedLM`, a teacher trained on MLM alone (mode "mlm") a
`BertForMaskedLM`; the tokenizer files of the run come along. Default: the latest checkpoint.
"""

import pathlib

from absl import app, flags

from distil_jax import checkpoint, cli, hf

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a distil_jax.main run.")
_OUT = flags.DEFINE_string("out", None, "Output HuggingFace directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")


def export_checkpoint(workdir: str | pathlib.Path, out: str | pathlib.Path,
                      step: int | None = None) -> pathlib.Path:
  """Writes the model of `step` of the run in `workdir` to `out`; returns `out`."""
  config, tokenizer_dir = checkpoint.read_model(workdir)
  with checkpoint.Checkpointer(workdir, save_every_steps=1, keep_last=1,
                               async_save=False) as ckpt:
    state = ckpt.restore_on_one_device(step)
  return hf.export_hf(config, state["params"]["student"], out, tokenizer_dir)


def main(argv) -> None:
  del argv
  if not (_WORKDIR.value and _OUT.value):
    raise app.UsageError("--workdir and --out are required")
  print(export_checkpoint(_WORKDIR.value, _OUT.value, _STEP.value))


if __name__ == "__main__":
  cli.run(main)
