"""Chunking, packing and bucketing of tokenized documents, against hand-made sequences."""

import numpy as np

from distil_jax.data import TokenIds, make_sequences, split_by_length

CLS, SEP = 101, 102


def _token_ids(documents: list[list[int]]) -> TokenIds:
  tokens = np.array([t for doc in documents for t in doc], np.uint16)
  offsets = np.cumsum([0, *map(len, documents)])
  return TokenIds(tokens, offsets, np.bincount(tokens, minlength=2000))


def _all(sequences) -> list[list[int]]:
  return [sequences[i].tolist() for i in range(len(sequences))]


# Documents a (3 tokens), an empty one, b (10 tokens) and c (1 token).
A, B, C = [1001, 1002, 1003], list(range(1101, 1111)), [1201]
DOCUMENTS = [A, [], B, C]


def test_long_documents_are_chunked_and_short_sequences_dropped():
  sequences = make_sequences(_token_ids(DOCUMENTS), max_len=6, min_len=4, pack=False, cls_id=CLS,
                             sep_id=SEP)
  assert _all(sequences) == [
      [CLS, *A, SEP], [CLS, *B[:4], SEP], [CLS, *B[4:8], SEP], [CLS, *B[8:], SEP]]
  assert sequences.lengths.tolist() == [5, 6, 6, 4]  # [CLS, *C, SEP] has 3 < min_len tokens.


def test_packing_fills_sequences_across_documents():
  sequences = make_sequences(_token_ids(DOCUMENTS[:1] + DOCUMENTS[2:]), max_len=7, min_len=4,
                             pack=True, cls_id=CLS, sep_id=SEP)
  # Stream: a [SEP] b [SEP] c [SEP], cut every 5 positions; no window begins or ends on a [SEP].
  assert _all(sequences) == [
      [CLS, *A, SEP, B[0], SEP], [CLS, *B[1:6], SEP], [CLS, *B[6:], SEP]]


def test_chunks_rebuild_random_documents():
  rng = np.random.default_rng(0)
  documents = [rng.integers(1000, 2000, size=n).tolist() for n in rng.integers(1, 300, size=50)]
  sequences = make_sequences(_token_ids(documents), max_len=64, min_len=3, pack=False, cls_id=CLS,
                             sep_id=SEP)
  contents = [s[1:-1] for s in _all(sequences)]
  assert all(s[0] == CLS and s[-1] == SEP and len(s) <= 64 for s in _all(sequences))
  assert [t for c in contents for t in c] == [t for doc in documents for t in doc]
  assert len(contents) == sum(-(-len(doc) // 62) for doc in documents)


def test_padded_batch_and_buckets():
  sequences = make_sequences(_token_ids(DOCUMENTS), max_len=6, min_len=3, pack=False, cls_id=CLS,
                             sep_id=SEP)
  ids, lengths = sequences.padded(np.array([4, 0]), 6, pad_id=0)
  np.testing.assert_array_equal(ids, [[CLS, *C, SEP, 0, 0, 0], [CLS, *A, SEP, 0]])
  np.testing.assert_array_equal(lengths, [3, 5])
  short, long = split_by_length(sequences, (4, 6))
  assert _all(short) == [[CLS, *B[8:], SEP], [CLS, *C, SEP]]
  assert _all(long) == [[CLS, *A, SEP], [CLS, *B[:4], SEP], [CLS, *B[4:8], SEP]]
