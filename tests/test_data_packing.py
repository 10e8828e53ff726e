"""Rows cut from tokenized documents, unpacked and packed, against hand-made rows."""

import numpy as np

from distil_jax.data import pack_documents, segment_ids

CLS, SEP, PAD = 101, 102, 0
# Documents a (3 tokens), an empty one, b (10 tokens) and c (1 token).
A, B, C = [1001, 1002, 1003], list(range(1101, 1111)), [1201]
DOCUMENTS = [A, [], B, C]


def _rows(documents, **options) -> list[list[int]]:
  rows = pack_documents(documents, cls_id=CLS, sep_id=SEP, dtype=np.uint16, **options)
  return [[t for t in row.tolist() if t != PAD] for row in rows]


def test_long_documents_are_chunked_and_short_pieces_dropped():
  assert _rows(DOCUMENTS, max_len=6, min_len=4, pack=False) == [
      [CLS, *A, SEP], [CLS, *B[:4], SEP], [CLS, *B[4:8], SEP], [CLS, *B[8:], SEP]]
  # [CLS, *C, SEP] has 3 < min_len tokens.


def test_packing_fills_rows_with_documents_kept_apart():
  # Row 1: a, then b's first 5 tokens fill it; row 2: b's last 5; c would be a piece of
  # 3 < min_len tokens: dropped.
  assert _rows(DOCUMENTS, max_len=12, min_len=4, pack=True) == [
      [CLS, *A, SEP, CLS, *B[:5], SEP], [CLS, *B[5:], SEP]]
  assert _rows([A, A, A], max_len=12, min_len=4, pack=True) == [
      [CLS, *A, SEP, CLS, *A, SEP], [CLS, *A, SEP]]  # 2 tokens of room: the row is closed.


def test_packed_rows_rebuild_random_documents_and_are_full():
  rng = np.random.default_rng(0)
  documents = [rng.integers(1000, 2000, size=n).tolist() for n in rng.integers(1, 300, size=50)]
  rows = pack_documents(documents, max_len=64, min_len=3, pack=True, cls_id=CLS, sep_id=SEP,
                        dtype=np.uint16)
  pieces, piece = [], []
  for token in rows.ravel().tolist():
    if token == CLS:
      piece = []
    elif token == SEP:
      pieces.append(piece)
    elif token != PAD:
      piece.append(token)
  assert [t for p in pieces for t in p] == [t for doc in documents for t in doc]
  assert (rows[:-1] != PAD).mean() > 0.97  # Only a row's last 2 positions can be left empty.


def test_segment_ids_keep_the_pieces_apart():
  ids = np.array([[CLS, 5, SEP, CLS, 6, 7, SEP, PAD], [CLS, 5, 6, 7, 8, 9, SEP, PAD]])
  np.testing.assert_array_equal(segment_ids(ids, CLS, PAD), [[1, 1, 1, 2, 2, 2, 2, 0],
                                                             [1, 1, 1, 1, 1, 1, 1, 0]])
