"""The Flax encoder against HuggingFace's PyTorch BERT, on random weights and padded batches."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from distil_jax import hf, models


def _batch(vocab_size: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, vocab_size, (3, 13))
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = 0
  return ids, mask, rng.randint(0, 2, ids.shape)


@pytest.fixture(scope="module")
def torch_bert(bert_dir):
  return transformers.BertForMaskedLM.from_pretrained(bert_dir).eval()


@pytest.fixture(scope="module")
def teacher(bert_dir):
  return hf.load_bert(bert_dir)


@functools.cache
def _jitted_apply(config):
  return jax.jit(models.Encoder(config).apply, static_argnames="deterministic")


def _apply(config, params, *args, **kwargs):
  return _jitted_apply(config)({"params": params}, *args, **kwargs)


def test_teacher_matches_hf_bert(teacher, torch_bert):
  config, params = teacher
  assert config.layer_norm_eps == 1e-12 and config.num_layers == 4
  ids, mask, token_types = _batch(config.vocab_size)
  with torch.no_grad():
    ref = torch_bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(token_types), output_hidden_states=True)
  out = _apply(config, params, ids, mask, token_types)
  assert len(out.hidden_states) == len(ref.hidden_states) == config.num_layers + 1
  np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
  for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)


def test_padding_does_not_leak_into_real_tokens(teacher):
  config, params = teacher
  ids, mask, _ = _batch(config.vocab_size)
  garbage = np.where(mask == 1, ids, 777)  # Different token ids under the padding.
  a = _apply(config, params, ids, mask).hidden_states[-1]
  b = _apply(config, params, garbage, mask).hidden_states[-1]
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5)
  assert np.abs(np.asarray(a)[~real] - np.asarray(b)[~real]).max() > 1e-3


def test_logit_positions_gather_before_the_projection(teacher):
  config, params = teacher
  ids, mask, _ = _batch(config.vocab_size)
  positions = np.array([[0, 5, 2], [8, 1, 1], [3, 0, 2]])
  full = _apply(config, params, ids, mask).logits
  picked = _apply(config, params, ids, mask, logit_positions=positions).logits
  assert picked.shape == (3, 3, config.vocab_size)
  np.testing.assert_allclose(picked, np.take_along_axis(np.asarray(full), positions[..., None],
                                                        axis=1), atol=1e-5)


def test_exact_gelu_is_used():
  x = jnp.linspace(-3, 3, 7)
  np.testing.assert_allclose(models._gelu(x), torch.nn.functional.gelu(torch.tensor(
      np.asarray(x))).numpy(), atol=1e-6)


def test_bf16_compute_stays_close_to_fp32(teacher):
  config, params = teacher
  ids, mask, _ = _batch(config.vocab_size)
  fp32 = _apply(config, params, ids, mask)
  bf16 = _apply(dataclasses.replace(config, dtype="bfloat16"), params, ids, mask)
  assert bf16.hidden_states[-1].dtype == jnp.bfloat16 and bf16.logits.dtype == jnp.float32
  scale = np.abs(np.asarray(fp32.logits)).max()
  assert np.abs(np.asarray(bf16.logits) - np.asarray(fp32.logits)).max() < 0.05 * scale


def test_dropout_is_active_only_when_not_deterministic(teacher):
  config, params = teacher
  ids, mask, _ = _batch(config.vocab_size)
  run = lambda seed: np.asarray(_apply(config, params, ids, mask, deterministic=False,
                                      rngs={"dropout": jax.random.key(seed)}).logits)
  assert np.abs(run(0) - run(1)).max() > 1e-3
  np.testing.assert_array_equal(run(0), run(0))


def test_parameters_carry_logical_axis_names():
  config = models.ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                              intermediate_size=24)
  names = nn.get_partition_spec(models.abstract_params(config))
  assert tuple(names["embeddings"]["word_embeddings"]["embedding"]) == ("vocab", "embed")
  assert tuple(names["layer_1"]["attention"]["query"]["kernel"]) == ("embed", "heads", "kv")
  assert tuple(names["layer_1"]["attention"]["out"]["kernel"]) == ("heads", "kv", "embed")
  assert tuple(names["layer_0"]["fc2"]["kernel"]) == ("mlp", "embed")
  assert tuple(names["mlm_head"]["bias"]) == ("vocab",)
  assert "token_type_embeddings" in names["embeddings"]


def test_hidden_size_not_divisible_by_heads_is_refused():
  with pytest.raises(ValueError, match="not divisible by the number of attention heads"):
    models.ModelConfig(vocab_size=50, hidden_size=30, num_layers=2, num_heads=4,
                       intermediate_size=24)


def test_attention_probabilities_are_kept_in_the_compute_dtype():
  """softmax_kept_in: float32 statistics, the probabilities kept for the backward pass in the
  compute dtype (half the bytes in bfloat16), gradients those of jax.nn.softmax."""
  from jax._src.ad_checkpoint import saved_residuals  # What print_saved_residuals prints.
  scores = jax.random.normal(jax.random.key(0), (2, 3, 5, 7)) * 3
  weights = jax.random.normal(jax.random.key(1), scores.shape)
  ours = lambda dtype: jax.grad(lambda s: jnp.sum(
      models.softmax_kept_in(s, dtype).astype(jnp.float32) * weights))(scores)
  theirs = jax.grad(lambda s: jnp.sum(jax.nn.softmax(s, axis=-1) * weights))(scores)
  np.testing.assert_allclose(ours(jnp.float32), theirs, atol=1e-6)
  np.testing.assert_allclose(ours(jnp.bfloat16), theirs, atol=1e-2 * np.abs(theirs).max())
  (kept,) = saved_residuals(lambda s: jnp.sum(models.softmax_kept_in(s, jnp.bfloat16)), scores)
  assert kept[0].dtype == jnp.bfloat16 and kept[0].shape == scores.shape
