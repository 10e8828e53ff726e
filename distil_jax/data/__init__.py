"""Input pipeline: text sources -> cached WordPiece ids -> sequences -> masked, sharded batches."""

from distil_jax.data.config import default_data_config
from distil_jax.data.masking import (
    IGNORED_LABEL,
    label_log_prior,
    mask_tokens,
    smoothed_token_weights,
)
from distil_jax.data.pipeline import Datasets, global_batch, make_datasets, make_eval_batches
from distil_jax.data.sequences import Sequences, make_sequences, split_by_length
from distil_jax.data.sources import Documents, TextCorpus, open_documents
from distil_jax.data.tokens import SpecialIds, TokenIds, load_tokenizer, special_ids, tokenize

__all__ = [
    "IGNORED_LABEL",
    "Datasets",
    "Documents",
    "Sequences",
    "SpecialIds",
    "TextCorpus",
    "TokenIds",
    "default_data_config",
    "global_batch",
    "label_log_prior",
    "load_tokenizer",
    "make_datasets",
    "make_eval_batches",
    "make_sequences",
    "mask_tokens",
    "open_documents",
    "smoothed_token_weights",
    "special_ids",
    "split_by_length",
    "tokenize",
]
