"""Dynamic masking for MLM as in DistilBERT, reproducible from (seed, step, row)."""

import math
from collections.abc import Sequence

import numpy as np

IGNORED_LABEL = -100


def mask_tokens(token_ids: np.ndarray, attention_mask: np.ndarray, *, rng_seed: int, step: int,
                vocab_size: int, special_ids: Sequence[int], mask_id: int, mask_prob: float = 0.15,
                mask_token_frac: float = 0.8, random_token_frac: float = 0.1,
                token_weights: np.ndarray | None = None, rows: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Chooses tokens to predict and corrupts them; returns int32 (input_ids, labels).

  Each row has its own random stream, a function of (rng_seed, step, its global row index
  `rows[r]`, by default r): a row gets the same masks whichever process reads it. Candidates are
  a row's real tokens (attention_mask 1) that are not special. Of its n candidates, mask_prob * n
  are chosen in expectation (the integer part, and one more with probability the fractional part),
  without replacement, each with probability proportional to `token_weights[id]` (uniform without
  them). A chosen token becomes [MASK] with probability mask_token_frac, a random non-special token
  with probability random_token_frac, and stays otherwise. Labels hold the original id of chosen
  tokens and IGNORED_LABEL elsewhere.
  """
  rows = np.arange(len(token_ids)) if rows is None else rows
  special_ids = np.asarray(special_ids)
  replacements = np.delete(np.arange(vocab_size), special_ids)
  weights = ((attention_mask != 0) & ~np.isin(token_ids, special_ids)).astype(np.float64)
  if token_weights is not None:
    weights *= token_weights[token_ids]
  input_ids = token_ids.astype(np.int32)
  labels = np.full_like(input_ids, IGNORED_LABEL)
  for r, row_weights in enumerate(weights):
    rng = np.random.default_rng((rng_seed, step, int(rows[r])))
    num_candidates = np.count_nonzero(row_weights)
    # Rounded first so that float error cannot add a token: 0.15 * 20 is 3.0000000000000004.
    expected = round(mask_prob * num_candidates, 6)
    num_chosen = min(math.floor(expected) + int(rng.random() < expected % 1), num_candidates)
    # Efraimidis-Spirakis: the n smallest Exp(1) / weight are a weighted draw without replacement.
    with np.errstate(divide="ignore"):
      keys = rng.exponential(size=row_weights.size) / row_weights
    chosen = (np.argpartition(keys, num_chosen - 1)[:num_chosen] if num_chosen
              else np.zeros(0, int))
    labels[r, chosen] = input_ids[r, chosen]
    kind = rng.random(num_chosen)
    to_random = chosen[(kind >= mask_token_frac) & (kind < mask_token_frac + random_token_frac)]
    input_ids[r, chosen[kind < mask_token_frac]] = mask_id
    input_ids[r, to_random] = rng.choice(replacements, len(to_random))
  return input_ids, labels


def smoothed_token_weights(counts: np.ndarray, mlm_smoothing: float) -> np.ndarray | None:
  """Selection weights count ** -mlm_smoothing (rare tokens chosen more often); None for 0."""
  return np.maximum(counts, 1.0) ** -mlm_smoothing if mlm_smoothing else None


def label_log_prior(counts: np.ndarray, mlm_smoothing: float) -> np.ndarray:
  """Log-probabilities of the labels that masking picks: a token of count c is picked with
  probability proportional to c * c**-mlm_smoothing (counts add-one smoothed). As MLM logits,
  the best start for a fresh head's bias."""
  weights = (np.asarray(counts, np.float64) + 1.0) ** (1.0 - mlm_smoothing)
  return np.log(weights / weights.sum()).astype(np.float32)
