"""Dynamic masking for MLM as in DistilBERT, reproducible from (seed, step)."""

import math
from collections.abc import Sequence

import numpy as np

IGNORED_LABEL = -100


def mask_tokens(token_ids: np.ndarray, attention_mask: np.ndarray, *, rng_seed: int, step: int,
                vocab_size: int, special_ids: Sequence[int], mask_id: int, mask_prob: float = 0.15,
                mask_token_frac: float = 0.8, random_token_frac: float = 0.1,
                token_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Chooses tokens to predict and corrupts them; returns int32 (input_ids, labels).

  Candidates are the real tokens (attention_mask 1) that are not special. Of a batch's n
  candidates, ceil(mask_prob * n) are chosen without replacement, each with probability
  proportional to `token_weights[id]` (uniform without them). A chosen token becomes [MASK] with
  probability mask_token_frac, a random non-special token with probability random_token_frac, and
  stays otherwise. Labels hold the original id of chosen tokens and IGNORED_LABEL elsewhere.
  """
  rng = np.random.default_rng((rng_seed, step))
  special_ids = np.asarray(special_ids)
  weights = ((attention_mask != 0) & ~np.isin(token_ids, special_ids)).astype(np.float64)
  if token_weights is not None:
    weights *= token_weights[token_ids]
  num_candidates = np.count_nonzero(weights)
  # Rounded first so that float error cannot add a token: 0.15 * 20 is 3.0000000000000004.
  num_chosen = min(math.ceil(round(mask_prob * num_candidates, 6)), num_candidates)
  # Efraimidis-Spirakis: the n smallest Exp(1) / weight are a weighted draw without replacement.
  with np.errstate(divide="ignore"):
    keys = rng.exponential(size=weights.size) / weights.ravel()
  chosen = np.argpartition(keys, num_chosen - 1)[:num_chosen] if num_chosen else np.zeros(0, int)

  input_ids = token_ids.astype(np.int32).ravel()
  labels = np.full_like(input_ids, IGNORED_LABEL)
  labels[chosen] = input_ids[chosen]
  kind = rng.random(num_chosen)
  to_mask = chosen[kind < mask_token_frac]
  to_random = chosen[(kind >= mask_token_frac) & (kind < mask_token_frac + random_token_frac)]
  input_ids[to_mask] = mask_id
  input_ids[to_random] = rng.choice(np.delete(np.arange(vocab_size), special_ids), len(to_random))
  return input_ids.reshape(token_ids.shape), labels.reshape(token_ids.shape)


def smoothed_token_weights(counts: np.ndarray, mlm_smoothing: float) -> np.ndarray | None:
  """Selection weights count ** -mlm_smoothing (rare tokens chosen more often); None for 0."""
  return np.maximum(counts, 1.0) ** -mlm_smoothing if mlm_smoothing else None


def label_log_prior(counts: np.ndarray, mlm_smoothing: float) -> np.ndarray:
  """Log-probabilities of the labels that masking picks: a token of count c is picked with
  probability proportional to c * c**-mlm_smoothing (counts add-one smoothed). As MLM logits,
  the best start for a fresh head's bias."""
  weights = (np.asarray(counts, np.float64) + 1.0) ** (1.0 - mlm_smoothing)
  return np.log(weights / weights.sum()).astype(np.float32)
