r"""The paper's recipe: DistilBERT from bert-base-uncased on Wikipedia + books, on a TPU slice.

  python -m distil_jax.main --config=experiments/bert_base.py --workdir=$HOME/distilbert \
      --config.data.sources='("tfds:wikipedia/20230601.en", "text:gs://BUCKET/books/*.txt")'

Teacher bert-base-uncased (hub name, or a local directory), student of 6 layers from teacher
layers 0, 2, 4, 7, 9, 11, sequences of 512, 4096 sequences per update (accumulated micro-batches),
lr 5e-4 with 5% warmup, T = 2, alpha_ce 5 / alpha_mlm 2 / alpha_cos 1, bf16 compute, frozen
position embeddings, the mesh over every device, 3 epochs over the corpus as the original (the
step count follows from the corpus size; the original trained ~3 epochs over 3.3B words).
The wikipedia dataset must be prepared in array_record format under config.data.tfds_data_dir
(TFDS has no BookCorpus: give the books as text files).

Cost (`python -m benchmarks.bert_base_budget`): 1.39 PFLOP per step; 3 epochs over 3.3B words
are about 6,200 steps with full sequences (8,800 at 70% fill), 1.4 to 1.9 hours on a v4-32 at an
assumed 40% MFU (22 to 31 chip-hours). The original took about 90 hours on 8 V100s. Memory: the
compiled train step of one device's share (256 rows, 16 micro-batches of 16) needs 16.8 GiB of
temporaries on XLA's CPU backend, the eval step in micro-batches 1.7 GiB (10.4 GiB at once).
"""

from experiments import common


def get_config():
  config = common.get_config()
  config.teacher = "bert-base-uncased"
  config.student.layers = (0, 2, 4, 7, 9, 11)
  config.data.sources = ("tfds:wikipedia/20230601.en",)
  config.data.max_len = 512
  config.data.batch_size = 4096
  config.data.eval_examples = 2000
  config.accum_steps = 16
  config.dtype = "bfloat16"
  config.teacher_param_dtype = "bfloat16"
  config.epochs = 3.0
  config.log_every_steps = 50
  config.eval_every_steps = 2000
  config.eval_batches = 4
  config.checkpoint_every_steps = 1000
  return config
