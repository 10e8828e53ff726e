r"""GLUE fine-tuning: S seeds stacked in one program against S separate runs of the same steps.

  .venv/bin/python -m benchmarks.bench_finetune --glue_dir=GLUE_DIR [--seeds=0,1,2 --steps=20]

Runs `python -m distil_jax.finetune` (experiments/glue.py, SST-2's first `steps * batch`
training examples, one epoch, the packaged MiniLM unless `--init`) once with all the seeds and
once per seed, one after another, and prints each command's wall time: start-up, data, compile,
the steps and the dev evaluation, all of what a user waits for.
"""

import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from absl import app, flags

from distil_jax import resources

_GLUE_DIR = flags.DEFINE_string("glue_dir", None, "GLUE's files (SST-2/train.tsv, dev.tsv).",
                                required=True)
_INIT = flags.DEFINE_string("init", None, "Model to fine-tune; default: the packaged MiniLM.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "The seeds.")
_STEPS = flags.DEFINE_integer("steps", 20, "Fine-tuning steps of every run.")
_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per step of every run.")


def finetune_seconds(seeds: Sequence[str], workdir: str) -> float:
  """Wall seconds of one finetune command that trains `seeds` stacked."""
  command = [sys.executable, "-m", "distil_jax.finetune", "--config=experiments/glue.py",
             f"--workdir={workdir}", "--config.task=sst2",
             f"--config.init={_INIT.value or resources.minilm_dir()}",
             f"--config.data_dir={_GLUE_DIR.value}", f"--config.seeds={','.join(seeds)}",
             f"--config.batch_size={_BATCH.value}",
             f"--config.max_train_examples={_STEPS.value * _BATCH.value}", "--config.epochs=1",
             f"--config.log_every_steps={_STEPS.value}",
             f"--config.eval_every_steps={_STEPS.value}",
             f"--config.checkpoint_every_steps={_STEPS.value}"]
  start = time.perf_counter()
  subprocess.run(command, check=True, capture_output=True)
  return time.perf_counter() - start


def main(argv: Sequence[str]) -> None:
  del argv
  seeds = _SEEDS.value
  with tempfile.TemporaryDirectory() as work:
    stacked = finetune_seconds(seeds, f"{work}/stacked")
    separate = [finetune_seconds([seed], f"{work}/seed{seed}") for seed in seeds]
  print(f"SST-2, {_STEPS.value} steps of {_BATCH.value} sequences per run, then the dev set\n")
  print("| runs | commands | wall (s) |\n|---|---|---|")
  print(f"| {len(seeds)} seeds stacked | 1 | {stacked:.0f} |")
  print(f"| {len(seeds)} seeds separately | {len(seeds)} | {sum(separate):.0f} "
        f"({' + '.join(f'{s:.0f}' for s in separate)}) |")
  print(f"\nstacked / separate: {stacked / sum(separate):.2f}")


if __name__ == "__main__":
  app.run(main)
