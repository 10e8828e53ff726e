r"""Prepares an experiment's corpus once, before (or without) training.

  python -m distil_jax.prepare --config=experiments/bert_base.py [--config.data.KEY=VALUE ...] \
      [--processes=N] [--distributed ...]

Every source is tokenized by every core (`--processes`, default one per core) and packed into
rows, written into `config.data.data_dir` (a local directory, or a gs:// bucket that the hosts of a
pod share: with --distributed each host prepares its share of the units). `main` and `sweep` do
the same when the data is not prepared yet, and read it as it is when it is; the teacher's
adaptation stage (`adapt_teacher`) has its own data config, prepared too. Interrupted, the same
command resumes unit by unit.
"""

from absl import app, flags, logging

from distil_jax import cli, train
from distil_jax.data import load_tokenizer, prepare

_PROCESSES = flags.DEFINE_integer("processes", None, "Preparing processes; default: one per "
                                  "core of the machine.")


def main(argv) -> None:
  del argv
  config = cli.CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/bert_base.py")
  train.check_config(config)
  vocab_size = train.teacher_shape(config).vocab_size
  tokenizer = load_tokenizer(train.tokenizer_directory(config), vocab_size)
  stages = [config.adapt_teacher.data] if config.adapt_teacher is not None else []
  for data_config in [*stages, config.data]:
    prepared = prepare.prepare(data_config, tokenizer, _PROCESSES.value)
    logging.info("%s: %d train rows of %d, %d held-out rows.", prepared.directory, len(prepared),
                 prepared.max_len, prepared.index["eval"]["rows"])


if __name__ == "__main__":
  cli.run(main)
