"""The data config that experiments put at `config.data`."""

from ml_collections import config_dict


def default_data_config() -> config_dict.ConfigDict:
  """Defaults for every data field; experiments override a few."""
  config = config_dict.ConfigDict()
  # Corpora, concatenated: "wiki_offline", "text:GLOB", "jsonl:GLOB[:FIELD]",
  # "parquet:GLOB[:COLUMN]" or "tfds:NAME[:FEATURE]" (see `sources.py`); GLOB local or gs://.
  config.sources = ("wiki_offline",)
  # Where the prepared rows go (`prepare.py`), local or gs:// (a bucket that the hosts of a pod
  # share: each prepares its share of the units, and a restart on fresh VMs prepares nothing).
  config.data_dir = "~/.cache/distil_jax"
  # Where "tfds:" datasets are read from (local or gs://); None: TFDS's default data dir.
  config.tfds_data_dir = config_dict.placeholder(str)
  config.max_len = 128  # Tokens per row, [CLS] and [SEP] included.
  config.min_len = 12  # Shorter pieces are dropped (the original keeps more than 11 tokens).
  # Fill rows with several documents (or pieces of a long one), each its own [CLS] ... [SEP],
  # attending only to itself; False: a document (or a chunk of a long one) per row.
  config.pack = False
  # Unpacked rows only: ascending lengths below max_len; each batch is padded to the smallest
  # bucket that holds its rows (one compilation per bucket); () pads every batch to max_len.
  config.bucket = ()
  config.batch_size = 32  # Global rows per step; each process reads batch_size // processes.
  config.eval_batch_size = 0  # Global rows per eval batch; 0: batch_size.
  config.mask_prob = 0.15  # Fraction of real non-special tokens to predict in each batch.
  config.mask_token_frac = 0.8  # Of those, replaced by [MASK];
  config.random_token_frac = 0.1  # replaced by a random token; the rest are kept.
  config.mlm_smoothing = 0.7  # Choose tokens with probability ~ count**-mlm_smoothing; 0: uniform.
  # Documents held out for eval (the first of each source, split evenly between them): a fixed
  # set, the same for any seed.
  config.eval_examples = 500
  config.seed = 0  # Shuffling and masking.
  config.read_threads = 2  # Threads assembling batches ahead of the step.
  return config
