r"""Distils a BERT teacher into a DistilBERT student (or trains a teacher on MLM alone).

  python -m distil_jax.main --config=experiments/tiny.py --workdir=workdirs/tiny \
      [--config.distill.temperature=4 ...] [--distributed ...]

Starting again on a workdir with a checkpoint resumes from it (with --config omitted, with the
config saved there); SIGTERM (a TPU preemption) saves and exits cleanly. A changed config that
alters the run's trajectory is refused unless --allow_config_change. The distillation is
`distil_jax.train.run`, its loop `distil_jax.loop.train`.
"""

from absl import app
from etils import epath

from distil_jax import cli, train, workdir


def main(argv) -> None:
  del argv
  if cli.WORKDIR.value is None:
    raise app.UsageError("--workdir is required: the directory for checkpoints and exports")
  config = cli.CONFIG.value
  if config is None:
    if not (epath.Path(cli.WORKDIR.value) / "config.json").exists():
      raise app.UsageError("--config is required to start a run (e.g. "
                           "--config=experiments/tiny.py); only a workdir that holds a run "
                           "resumes without it")
    config = workdir.saved_config(cli.WORKDIR.value)
  train.run([config], [cli.WORKDIR.value], allow_config_change=cli.ALLOW_CONFIG_CHANGE.value,
            resume_step=cli.RESUME_STEP.value)


if __name__ == "__main__":
  cli.run(main)
