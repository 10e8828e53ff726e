"""A seconds-long run for tests: pass --config.teacher, --config.data.sources and data_dir."""

from experiments import common


def get_config():
  config = common.get_config()
  config.teacher = ""
  config.student.num_layers = 2
  config.data.max_len = 32
  config.data.batch_size = 8
  config.data.eval_examples = 16
  config.data.read_threads = 1
  config.total_steps = 60
  config.log_every_steps = 1
  config.eval_every_steps = 20
  config.eval_batches = 1
  config.checkpoint_every_steps = 10
  config.keep_checkpoints = 10
  config.optim.lr_peak = 1e-3
  return config
