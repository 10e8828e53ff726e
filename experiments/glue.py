r"""Fine-tuning on a GLUE task, several seeds (and learning rates) in one program.

  python -m distil_jax.finetune --config=experiments/glue.py --workdir=DIR \
      --config.task=sst2 --config.init=HF_DIR_OR_WORKDIR [--config.data_dir=GLUE_DIR]

`init` is a HuggingFace BERT or DistilBERT directory (an MLM or a classification checkpoint) or a
distil_jax workdir (its export). GLUE comes from `data_dir` (GLUE's own TSV files: SST-2/train.tsv,
..., from https://gluebenchmark.com/tasks) or, where it is empty, from TFDS (`glue/<task>`,
prepared in `tfds_data_dir`). The defaults are the usual BERT recipe (lr 2e-5, batch 32, 3 epochs,
10% warmup); the DistilBERT paper reports the median of 5 seeds.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.task = "sst2"  # sst2, cola, mrpc, qqp, stsb, mnli, qnli, rte, wnli.
  config.init = ""  # HF directory, hub name or distil_jax workdir.
  config.data_dir = ""  # GLUE's TSV files; "": TFDS glue/<task>.
  config.tfds_data_dir = config_dict.placeholder(str)
  config.max_train_examples = 0  # The first N training examples; 0: all.
  config.max_len = 128
  config.buckets = (32, 64)  # Batches padded to the smallest of these that fits (one compile each).
  config.batch_size = 32  # Per run.
  config.seeds = (0, 1, 2, 3, 4)  # Runs stacked in one program: seeds x lr_peaks.
  config.lr_peaks = (2e-5,)
  config.epochs = 3.0
  config.warmup_frac = 0.1
  config.weight_decay = 0.01
  config.b1 = 0.9
  config.b2 = 0.999
  config.eps = 1e-8
  config.clip_norm = 1.0
  config.dtype = "float32"
  config.mesh_shape = (-1, 1, 1)
  # A step with a non-finite loss, gradient or result is never applied; then "stop" saves the
  # last good state and ends, "skip" goes on (at most max_skipped_steps times).
  config.on_nonfinite = "stop"
  config.max_skipped_steps = 10
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  return config
