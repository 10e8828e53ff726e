r"""The paper's recipe: DistilBERT from bert-base-uncased on Wikipedia and books, on a TPU slice.

  python -m distil_jax.main --config=experiments/bert_base.py --workdir=gs://BUCKET/distilbert \
      --config.data.data_dir=gs://BUCKET/prepared \
      --config.data.sources='("parquet:gs://BUCKET/wikipedia/20231101.en/*.parquet", \
                              "text:gs://BUCKET/bookcorpus/*.txt")'

Teacher bert-base-uncased (hub name, or a local directory), student of 6 layers from teacher
layers 0, 2, 4, 7, 9, 11, rows of 512 tokens packed full with documents kept apart (each its own
[CLS] ... [SEP], attending only to itself), 4096 rows per update (accumulated micro-batches),
lr 5e-4 with 5% warmup, T = 2, alpha_ce 5 / alpha_mlm 2 / alpha_cos 1, bf16 compute, frozen
position embeddings, the mesh over every device, 3 epochs over the corpus as the original (the
step count follows from the prepared rows, so from the tokens).

The corpus: English Wikipedia as Parquet (e.g. HuggingFace's wikimedia/wikipedia 20231101.en,
column "text": no Apache Beam needed) and the books as text files, one sentence or paragraph per
line, both in a bucket. `python -m distil_jax.prepare --config=experiments/bert_base.py ...`
prepares them once, every core of every host (`--distributed`) tokenizing its share, into
data.data_dir on the bucket: a restart on fresh VMs reads them as they are. The cost
(`python -m benchmarks.bert_base_budget`): the corpus's tokens, the fill of its rows, the steps,
the preparation time on a v4 host and a v4-32, and the TPU time at an assumed MFU.
"""

from experiments import common


def get_config():
  config = common.get_config()
  config.teacher = "bert-base-uncased"
  config.student.layers = (0, 2, 4, 7, 9, 11)
  config.data.sources = ("parquet:gs://YOUR_BUCKET/wikipedia/20231101.en/*.parquet",
                         "text:gs://YOUR_BUCKET/bookcorpus/*.txt")
  config.data.data_dir = "gs://YOUR_BUCKET/prepared"
  config.data.max_len = 512
  config.data.pack = True
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
