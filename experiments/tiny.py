r"""The embedded default: distils a 3-layer student from the MiniLM teacher on CPU.

  python -m distil_jax.main --config=experiments/tiny.py --workdir=workdirs/tiny
  (or `make demo`)

Stage 1 adapts the teacher (`teacher_mlm.py`, into WORKDIR/teacher; reused when present).
Stage 2 distils teacher layers 0, 2, 5 into a 3-layer student with the triple loss, L_ce on the
masked positions only (the full-vocabulary softmax on every token is too slow for a CPU demo),
uniform masking as in stage 1.
Ends with held-out metrics of student and teacher, an export to WORKDIR/export, and a fill-mask
example. About 10 minutes on 2 CPU cores.
"""

from experiments import common, teacher_mlm


def get_config():
  config = common.get_config()
  config.teacher = "minilm"
  config.adapt_teacher = teacher_mlm.get_config()
  # Stage 2 reads the same data, with the same budget, as stage 1.
  config.data = config.adapt_teacher.data.copy_and_resolve_references()
  for key in ("total_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
              "fill_mask"):
    config[key] = config.adapt_teacher[key]
  config.student.num_layers = 3
  config.distill.restrict_ce_to_mask = True
  config.optim.lr_peak = 2e-4
  return config
