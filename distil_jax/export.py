r"""Exports the model of a run's checkpoint as a HuggingFace directory.

  python -m distil_jax.export --workdir=DIR --out=HF_DIR [--step=N] [--seed=K] [--overwrite]

A student becomes a `DistilBertForMaskedLM`, a teacher trained on MLM alone (mode "mlm") a
`BertForMaskedLM`, a run of a fine-tuning (`distil_jax.finetune`; --seed picks it, default the
first) a `BertForSequenceClassification` or `DistilBertForSequenceClassification`; the tokenizer
files of the run come along. Default: the latest checkpoint
that reads back (a corrupt latest one is skipped with a warning). HF_DIR must be empty or hold an
earlier export of the same run, unless --overwrite.
"""

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from distil_jax import checkpoint, cli, errors, hf, storage
from distil_jax import workdir as workdir_lib

_OUT = flags.DEFINE_string("out", None, "Output HuggingFace directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the model in a non-empty --out.")
_SEED = flags.DEFINE_integer("seed", None, "Fine-tuning workdirs: the seed of the run to export.")


def export_checkpoint(workdir: epath.PathLike, out: epath.PathLike, step: int | None = None,
                      overwrite: bool = False, seed: int | None = None) -> epath.Path:
  """Writes the model of `step` of the run in `workdir` to `out` (of a fine-tuning, the run of
  `seed`); returns `out`."""
  config, tokenizer_dir, facts = workdir_lib.read_model(workdir)
  runs = facts.get("runs")
  if runs is None and seed is not None:
    raise errors.ConfigError(f"--seed is for fine-tuning workdirs; {workdir} holds one model")
  index = 0
  if runs and seed is not None:
    index = next((i for i, r in enumerate(runs) if r["seed"] == seed), None)
    if index is None:
      raise errors.ConfigError(f"{workdir} has no run of seed {seed}: its runs are "
                               f"{', '.join(r['name'] for r in runs)}")
  source = str(storage.absolute(workdir)) + (f"#{runs[index]['name']}" if runs else "")
  hf.check_export_dir(out, source, overwrite)  # Before the slow restore.
  state = _restore(workdir, step)
  if runs:
    params = jax.tree.map(lambda x: np.asarray(x[index]), state["params"])
    return hf.export_hf(config, params, out, tokenizer_dir, label_names=facts["labels"],
                        source=source, overwrite=overwrite)
  return hf.export_hf(config, state["params"]["student"], out, tokenizer_dir, source=source,
                      overwrite=overwrite)


def _restore(workdir: epath.PathLike, step: int | None):
  """The state of checkpoint `step`, or of the latest that reads back."""
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
  return state


def main(argv) -> None:
  del argv
  if not (cli.WORKDIR.value and _OUT.value):
    raise app.UsageError("--workdir and --out are required")
  print(export_checkpoint(cli.WORKDIR.value, _OUT.value, _STEP.value, _OVERWRITE.value,
                          _SEED.value))


if __name__ == "__main__":
  cli.run(main)
