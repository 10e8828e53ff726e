r"""The paper's Table 1 / Table 4 at CPU scale: triple loss, the L_mlm-only baseline, the ablation.

  python -m distil_jax.main --config=experiments/teacher_mlm_long.py --workdir=workdirs/teacher_long
  python -m distil_jax.sweep --config=experiments/reproduction.py --workdir=workdirs/reproduction
  python -m distil_jax.report workdirs/reproduction

A 3-layer student (teacher layers 0, 2, 5) of the adapted MiniLM teacher (teacher_mlm_long.py's
export, `config.teacher`), the teacher's data (the offline Wikipedia leads, packed, the same 500
held-out leads), 6 rows x 2 seeds, all at equal steps: the triple loss (5/2/1, T=2); L_mlm only
from the same initialisation; without L_ce, without L_cos, without L_mlm; the triple loss from a
random initialisation. A seed sets the dropout, the random initialisation, the data order and
the masks (`seed` and `data.seed`): the sweep fuses the 6 rows of each seed into one program.
Departures from the paper, for a CPU budget: L_ce on the masked positions only (the gathered
vocabulary projection is 2.4x faster), uniform masking (mlm_smoothing 0, as the teacher was
adapted), 16 packed sequences of 128 per update, 250 updates (about 0.5 epochs): about 2.5 hours
on 2 CPU cores for the 12 runs.
"""

from experiments import common, teacher_mlm_long

ROWS = {
    "triple": {},
    "mlm_only": {"distill.alpha_ce": 0.0, "distill.alpha_cos": 0.0},
    "no_ce": {"distill.alpha_ce": 0.0},
    "no_cos": {"distill.alpha_cos": 0.0},
    "no_mlm": {"distill.alpha_mlm": 0.0},
    "random_init": {"student.init": "random"},
}


def get_config():
  config = common.get_config()
  config.teacher = "workdirs/teacher_long/export"
  config.data = teacher_mlm_long.get_config().data.copy_and_resolve_references()
  config.student.num_layers = 3
  config.distill.restrict_ce_to_mask = True
  config.data.batch_size = 16
  config.optim.lr_peak = 2e-4
  config.total_steps = 250
  config.log_every_steps = 10
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 50
  config.keep_checkpoints = 2
  return config


def get_sweep():
  return [{**overrides, "seed": seed, "data.seed": seed}
          for seed in (0, 1) for overrides in ROWS.values()]
