"""The train loop's reading of a config into the step's hyper-parameters."""

import numpy as np

from distil_jax import train
from experiments import common


def test_loss_weights_and_hyper_take_each_field_from_its_own_key():
  config = common.get_config()
  config.distill.update(temperature=3.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.5,
                        alpha_mse=0.25)  # Distinct, so that two swapped fields show.
  config.optim.lr_peak, config.seed = 1e-3, 7
  weights = train.loss_weights(config)
  assert weights._asdict() == {"temperature": 3.0, "alpha_ce": 5.0, "alpha_mlm": 2.0,
                               "alpha_cos": 1.5, "alpha_mse": 0.25}
  assert all(np.asarray(w).dtype == np.float32 for w in weights)
  hyper = train.hyper(config, lr_peak=4e-3)
  assert hyper.weights._asdict() == weights._asdict()
  np.testing.assert_allclose(hyper.lr_scale, 0.25)
  assert int(hyper.seed) == 7
