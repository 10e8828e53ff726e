r"""Distils a BERT teacher into a DistilBERT student (or trains a teacher on MLM alone).

  python -m distil_jax.main --config=experiments/tiny.py --workdir=workdirs/tiny \
      [--config.distill.temperature=4 ...]

Starting again on a workdir with a checkpoint resumes from it; SIGTERM (a TPU preemption) saves
and exits cleanly. The train loop itself is `distil_jax.train.run`.
"""

from absl import app, flags
from ml_collections import config_flags

from distil_jax import cli, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")


def main(argv) -> None:
  del argv
  cli.start()
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required: the directory for checkpoints and exports")
  train.run([_CONFIG.value], [_WORKDIR.value])


if __name__ == "__main__":
  cli.run(main)
