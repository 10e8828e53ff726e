r"""A teacher worth distilling: the MiniLM adapted by MLM training for as long as it improves.

  python -m distil_jax.main --config=experiments/teacher_mlm_long.py --workdir=workdirs/teacher_long

`teacher_mlm.py` (the demo's first stage, 60 steps) trained for longer: 1,500 updates of 32
packed sequences of 128 tokens (about 6 epochs of the 10,033 Wikipedia leads), evaluated every
100 steps on 500 held-out leads with the standard masked-LM evaluation. The fresh head trains at
10x the learning rate (50x is for the 60-step demo). About 2 to 4 hours on 2 CPU cores; the
curve is in docs/results.md. Its export (WORKDIR/export) is the teacher of
`experiments/reproduction.py`.
"""

from experiments import teacher_mlm


def get_config():
  config = teacher_mlm.get_config()
  config.data.eval_examples = 500
  config.optim.lr_peak = 2e-4
  config.optim.lr_multipliers = (("mlm_head", 10.0),)
  config.total_steps = 1500
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  config.fill_mask = "The capital of France is [MASK]."
  return config
