r"""Exports the model of a run's checkpoint as a HuggingFace directory.

  python -m distil_jax.export --workdir=DIR --out=HF_DIR [--step=N] [--overwrite]

A student becomes a `DistilBertForMaskedLM`, a teacher trained on MLM alone (mode "mlm") a
`BertForMaskedLM`; the tokenizer files of the run come along. Default: the latest checkpoint
that reads back (a corrupt latest one is skipped with a warning). HF_DIR must be empty or hold an
earlier export of the same run, unless --overwrite.
"""

from absl import app, flags, logging
from etils import epath

from distil_jax import checkpoint, cli, hf, storage

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a distil_jax.main run.")
_OUT = flags.DEFINE_string("out", None, "Output HuggingFace directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the model in a non-empty --out.")


def export_checkpoint(workdir: epath.PathLike, out: epath.PathLike, step: int | None = None,
                      overwrite: bool = False) -> epath.Path:
  """Writes the model of `step` of the run in `workdir` to `out`; returns `out`."""
  config, tokenizer_dir, _ = checkpoint.read_model(workdir)
  source = str(storage.absolute(workdir))
  hf.check_export_dir(out, source, overwrite)  # Before the slow restore.
  with checkpoint.Checkpointer(workdir, save_every_steps=1, keep_last=1,
                               async_save=False) as ckpt:
    steps = [step] if step is not None else (ckpt.all_steps()[::-1] or [None])
    for candidate in steps:
      try:
        state = ckpt.restore_on_one_device(candidate)
        break
      except checkpoint.CorruptCheckpoint as e:
        if candidate == steps[-1]:
          raise
        logging.warning("%s: exporting the previous checkpoint instead.", e)
  return hf.export_hf(config, state["params"]["student"], out, tokenizer_dir, source=source,
                      overwrite=overwrite)


def main(argv) -> None:
  del argv
  if not (_WORKDIR.value and _OUT.value):
    raise app.UsageError("--workdir and --out are required")
  print(export_checkpoint(_WORKDIR.value, _OUT.value, _STEP.value, _OVERWRITE.value))


if __name__ == "__main__":
  cli.run(main)
