"""Dynamic masking: counts per row, 80/10/10 statistics, determinism per row, smoothing."""

import math

import numpy as np
import pytest

from distil_jax.data import IGNORED_LABEL, label_log_prior, mask_tokens, smoothed_token_weights

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 30522


def _batch(rng: np.random.Generator, rows: int = 8, length: int = 64):
  """[CLS] words [SEP] then padding, with some [UNK] among the words."""
  lengths = rng.integers(3, length + 1, size=rows)
  ids = rng.integers(1000, VOCAB, size=(rows, length))
  ids[rng.random((rows, length)) < 0.05] = UNK
  ids[:, 0] = CLS
  ids[np.arange(rows), lengths - 1] = SEP
  attention_mask = (np.arange(length) < lengths[:, None]).astype(np.int32)
  return np.where(attention_mask, ids, PAD), attention_mask


def _mask(ids, attention_mask, seed=0, step=0, **options):
  return mask_tokens(ids, attention_mask, rng_seed=seed, step=step, vocab_size=VOCAB,
                     special_ids=SPECIAL, mask_id=MASK, **options)


def test_masking_statistics_over_many_batches():
  rng = np.random.default_rng(1)
  kinds = {"mask": 0, "random": 0, "kept": 0}
  num_candidates = num_chosen = 0
  for step in range(300):
    ids, attention_mask = _batch(rng)
    input_ids, labels = _mask(ids, attention_mask, step=step)
    candidates = (attention_mask == 1) & ~np.isin(ids, SPECIAL)
    chosen = labels != IGNORED_LABEL
    # Per row, 15% of its candidates rounded down or up (exact integer arithmetic).
    per_row, n = chosen.sum(1), candidates.sum(1)
    assert ((per_row == 15 * n // 100) | (per_row == -(-15 * n // 100))).all()
    num_candidates, num_chosen = num_candidates + n.sum(), num_chosen + per_row.sum()
    assert not (chosen & ~candidates).any()  # Never special tokens or padding.
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(input_ids[~chosen], ids[~chosen])
    replaced = input_ids[chosen]
    assert not np.isin(replaced[replaced != MASK], SPECIAL).any()
    kinds["mask"] += (replaced == MASK).sum()
    kinds["kept"] += (replaced == ids[chosen]).sum()
    kinds["random"] += ((replaced != MASK) & (replaced != ids[chosen])).sum()
  total = sum(kinds.values())
  assert total > 10_000
  # Rounding up with probability the fractional part keeps the rate at 15% in expectation: the
  # rounding adds at most 0.5 per row (a variance under 0.25), 2400 rows.
  assert num_chosen / num_candidates == pytest.approx(0.15, abs=4 * math.sqrt(2400 * 0.25)
                                                      / num_candidates)
  # Binomial standard deviations are below 0.004; a random token equals the original 1/30k times.
  assert kinds["mask"] / total == pytest.approx(0.8, abs=0.015)
  assert kinds["random"] / total == pytest.approx(0.1, abs=0.012)
  assert kinds["kept"] / total == pytest.approx(0.1, abs=0.012)


def test_same_seed_and_step_give_the_same_masks():
  ids, attention_mask = _batch(np.random.default_rng(2))
  first = _mask(ids, attention_mask, seed=3, step=7)
  np.testing.assert_array_equal(first, _mask(ids, attention_mask, seed=3, step=7))
  assert not np.array_equal(first[1], _mask(ids, attention_mask, seed=3, step=8)[1])
  assert not np.array_equal(first[1], _mask(ids, attention_mask, seed=4, step=7)[1])


def test_same_row_gets_the_same_masks_in_any_batch():
  """What makes the batches independent of the number of processes reading them."""
  ids, attention_mask = _batch(np.random.default_rng(5))
  whole = _mask(ids, attention_mask, seed=3, step=7)
  half = mask_tokens(ids[4:], attention_mask[4:], rng_seed=3, step=7, vocab_size=VOCAB,
                     special_ids=SPECIAL, mask_id=MASK, rows=np.arange(4, 8))
  for a, b in zip(whole, half, strict=True):
    np.testing.assert_array_equal(a[4:], b)


def test_smoothing_prefers_rare_tokens_as_count_to_the_minus_0_7():
  common, rare = 2000, 3000
  ids = np.array([[CLS, common, common, common, common, common, rare, SEP]])
  counts = np.zeros(VOCAB)
  counts[common], counts[rare] = 1000, 10
  weights = smoothed_token_weights(counts, 0.7)
  # 6 candidates: 0.9 expected, so one is chosen with probability 0.9, the rare one with
  # probability w_rare / sum of weights.
  expected = 0.9 * 10**-0.7 / (5 * 1000**-0.7 + 10**-0.7)
  steps = 3000
  chosen_rare = sum(_mask(ids, np.ones_like(ids), step=s, token_weights=weights)[1][0, 6] == rare
                    for s in range(steps))
  standard_deviation = math.sqrt(expected * (1 - expected) / steps)
  assert chosen_rare / steps == pytest.approx(expected, abs=4 * standard_deviation)
  assert smoothed_token_weights(counts, 0.0) is None


def test_padding_only_batch_has_nothing_to_predict():
  ids = np.zeros((2, 16), np.int32)
  input_ids, labels = _mask(ids, np.zeros_like(ids))
  np.testing.assert_array_equal(input_ids, ids)
  assert (labels == IGNORED_LABEL).all()


def test_label_log_prior_follows_the_smoothed_selection():
  counts = np.array([0, 9, 99, 999])
  np.testing.assert_allclose(np.exp(label_log_prior(counts, 0.0)),
                             [1 / 1111, 10 / 1111, 100 / 1111, 1000 / 1111], rtol=1e-6)
  np.testing.assert_allclose(np.exp(label_log_prior(counts, 1.0)), 0.25, rtol=1e-6)
