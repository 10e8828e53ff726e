"""Dynamic masking: counts per row for any padded batch, the rate in expectation, mask/random/kept
statistics, determinism per row, smoothing."""

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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


@settings(max_examples=40, deadline=None)
@given(ids=hnp.arrays(np.int32, st.tuples(st.integers(1, 6), st.integers(1, 40)),
                      elements=st.sampled_from([*SPECIAL, 1000, 1001, 30521])),
       lengths_seed=st.integers(0, 2**32 - 1), percent=st.integers(0, 100),
       seed=st.integers(0, 2**32 - 1), weighted=st.booleans())
def test_masking_chooses_the_rate_of_each_rows_real_non_special_tokens(
    ids, lengths_seed, percent, seed, weighted):
  rng = np.random.default_rng(lengths_seed)
  lengths = rng.integers(0, ids.shape[1] + 1, len(ids))
  attention_mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int32)
  token_weights = rng.random(VOCAB) + 0.01 if weighted else None
  input_ids, labels = _mask(ids, attention_mask, seed=seed, mask_prob=percent / 100,
                            token_weights=token_weights)
  candidates = (attention_mask == 1) & ~np.isin(ids, SPECIAL)
  chosen = labels != IGNORED_LABEL
  assert not (chosen & ~candidates).any()  # Never special tokens or padding.
  # Per row, the rate times its candidates rounded down or up (exact integer arithmetic).
  per_row, n = chosen.sum(1), candidates.sum(1)
  assert ((per_row == percent * n // 100) | (per_row == -(-percent * n // 100))).all()
  np.testing.assert_array_equal(labels[chosen], ids[chosen])
  np.testing.assert_array_equal(input_ids[~chosen], ids[~chosen])
  replaced = input_ids[chosen]
  assert ((replaced == MASK) | ~np.isin(replaced, SPECIAL)).all()
  assert ((replaced >= 0) & (replaced < VOCAB)).all()


@settings(max_examples=10, deadline=None, derandomize=True)
@example(mask_percent=80, random_percent=10, seed=0)  # The original recipe.
@given(mask_percent=st.integers(0, 100), random_percent=st.integers(0, 100),
       seed=st.integers(0, 2**32 - 1))
def test_mask_random_and_kept_fractions_follow_the_binomial(mask_percent, random_percent, seed):
  mask_frac = mask_percent / 100
  random_frac = min(random_percent / 100, 1 - mask_frac)
  ids = np.random.default_rng(seed).integers(1000, VOCAB, (64, 128))
  input_ids, labels = _mask(ids, np.ones_like(ids), seed=seed, mask_prob=1.0,
                            mask_token_frac=mask_frac, random_token_frac=random_frac)
  n = labels.size  # mask_prob 1: every token is chosen.
  assert (labels != IGNORED_LABEL).all()
  # A random token is drawn from the non-special vocabulary, so it can be the original.
  same = 1 / (VOCAB - len(SPECIAL))
  expected = {"mask": mask_frac, "random": random_frac * (1 - same),
              "kept": 1 - mask_frac - random_frac + random_frac * same}
  observed = {"mask": input_ids == MASK, "random": (input_ids != MASK) & (input_ids != ids),
              "kept": input_ids == ids}
  for kind, p in expected.items():
    # Each count is Binomial(n, p): within 5 standard deviations (exact at p = 0 or 1).
    assert abs(observed[kind].sum() - n * p) <= 5 * math.sqrt(n * p * (1 - p)), kind


def test_the_rate_holds_in_expectation():
  """Rounding up with probability the fractional part keeps the rate at 15% on average."""
  rng = np.random.default_rng(1)
  num_candidates = num_chosen = 0
  for step in range(300):
    ids, attention_mask = _batch(rng)
    _, labels = _mask(ids, attention_mask, step=step)
    num_candidates += ((attention_mask == 1) & ~np.isin(ids, SPECIAL)).sum()
    num_chosen += (labels != IGNORED_LABEL).sum()
  # Each of the 2,400 rows adds a Bernoulli rounding of variance at most 0.25.
  assert num_chosen / num_candidates == pytest.approx(
      0.15, abs=4 * math.sqrt(2400 * 0.25) / num_candidates)


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
