"""The fine-tuning step: dropout in training only, stacked runs that differ by their seeds."""

import jax
import numpy as np
import optax

from distil_jax import classify_step, models, optim, stacked

# A DistilBERT whose encoder has no dropout: the head's own (0.2) is the only randomness.
CONFIG = models.ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                            intermediate_size=32, max_positions=16, type_vocab_size=0,
                            hidden_dropout=0.0, attention_dropout=0.0)


def _batch(rows: int = 8, length: int = 10) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {"input_ids": rng.integers(5, 64, (rows, length)).astype(np.int32),
          "attention_mask": np.ones((rows, length), np.int32),
          "token_type_ids": np.zeros((rows, length), np.int32),
          "labels": rng.integers(0, 3, rows).astype(np.int32),
          "weights": np.ones(rows, np.float32)}


def _losses(seeds: tuple[int, int]) -> np.ndarray:
  """The train loss of two stacked runs of the same parameters on the same batch."""
  params = models.init_params(CONFIG, seed=0, num_labels=3)
  tx = optax.sgd(0.0)
  state = stacked.stack([optim.init_state(params, tx)] * 2)
  batch = stacked.stack([_batch()] * 2)
  hyper = stacked.stack([classify_step.Hyper(np.float32(1), np.int32(s)) for s in seeds])
  config = classify_step.ClassifyConfig(CONFIG, num_labels=3)
  _, metrics = jax.jit(lambda s, b, h: classify_step.train_step(s, b, h, config=config, tx=tx))(
      state, batch, hyper)
  return np.asarray(metrics["loss"])


def test_the_head_dropout_is_on_in_training_and_seeded_by_the_run():
  different, same = _losses((0, 1)), _losses((5, 5))
  assert different[0] != different[1]  # Only the head's dropout can tell the runs apart.
  assert same[0] == same[1]
  assert same[0] != different[0]


def test_prediction_has_no_dropout():
  params = models.init_params(CONFIG, seed=0, num_labels=3)
  config = classify_step.ClassifyConfig(CONFIG, num_labels=3)
  batch = _batch()
  logits = classify_step.predict(stacked.stack([params] * 2), batch, config=config)
  expected = models.Classifier(CONFIG, 3).apply({"params": params}, batch["input_ids"],
                                                batch["attention_mask"])
  np.testing.assert_allclose(logits, np.stack([expected] * 2), rtol=1e-6)
