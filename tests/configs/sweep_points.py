"""random_teacher.py for 10 steps, and a sweep of 4 points with different seeds (get_sweep)."""

from tests.configs import random_teacher


def get_config():
  config = random_teacher.get_config()
  config.total_steps = 10
  config.log_every_steps = 1
  config.eval_every_steps = 5
  config.checkpoint_every_steps = 2
  return config


def get_sweep():
  return [{"distill.temperature": t, "distill.alpha_ce": ce, "seed": seed}
          for seed, (t, ce) in enumerate([(1.0, 0.5), (1.0, 5.0), (4.0, 0.5), (4.0, 5.0)])]
