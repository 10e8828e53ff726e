"""Model inputs cut from tokenized documents: rows of `max_len` tokens, each piece of a document
`[CLS] tokens [SEP]`.

Without packing (the original DistilBERT's way), a row is one piece: a document of at most
max_len - 2 tokens, or a chunk of a longer one. With packing, a row holds several pieces one after
the other, of consecutive documents or of a long one, and is filled before the next is begun:
documents are kept apart by their pieces' [CLS] (`segment_ids`), so that each attends only to
itself and counts its positions from 0. Pieces shorter than min_len tokens ([CLS] and [SEP]
included) are dropped, as the original drops sequences of 11 tokens or fewer; a packed row is
closed when its remaining room is shorter than that.
"""

from collections.abc import Iterable

import numpy as np


class Packer:
  """Cuts documents (token id lists, no special tokens) into rows, in order."""

  def __init__(self, *, max_len: int, min_len: int, pack: bool, cls_id: int, sep_id: int,
               dtype: type[np.integer]):
    self.max_len, self.min_len, self.pack = max_len, min_len, pack
    self.cls_id, self.sep_id, self.dtype = cls_id, sep_id, dtype
    self._rows: list[np.ndarray] = []
    self._row: list[int] = []  # The packed row being filled.

  def add(self, document: Iterable[int]) -> None:
    """Cuts one document into pieces of at most max_len - 2 tokens, placed in rows."""
    tokens = list(document)
    width = self.max_len - 2
    start = 0
    while start < len(tokens):
      room = self.max_len - len(self._row) if self.pack else self.max_len
      if room < self.min_len:  # Too little room left for a piece: the row is done.
        self._close()
        room = self.max_len
      piece = tokens[start:start + min(width, room - 2)]
      start += len(piece)
      if len(piece) + 2 < self.min_len:
        continue  # A short document, or the short tail of a long one: dropped.
      self._row += [self.cls_id, *piece, self.sep_id]
      if not self.pack:
        self._close()

  def _close(self) -> None:
    if self._row:
      row = np.zeros(self.max_len, self.dtype)
      row[:len(self._row)] = self._row
      self._rows.append(row)
      self._row = []

  def take(self, final: bool = False) -> np.ndarray:
    """The rows completed so far ([n, max_len], padded with 0), and with `final` the partly
    filled last one too; they are not returned again."""
    if final:
      self._close()
    rows = np.stack(self._rows) if self._rows else np.zeros((0, self.max_len), self.dtype)
    self._rows = []
    return rows


def pack_documents(documents: Iterable[Iterable[int]], **options) -> np.ndarray:
  """All rows of `documents` (see `Packer` for the options)."""
  packer = Packer(**options)
  for document in documents:
    packer.add(document)
  return packer.take(final=True)


def segment_ids(ids: np.ndarray, cls_id: int, pad_id: int) -> np.ndarray:
  """int32 segment ids of rows [..., max_len]: 0 for padding, k for the tokens of the k-th piece
  (which starts with a [CLS]); tokens of equal non-zero ids attend to each other."""
  return (np.cumsum(ids == cls_id, axis=-1) * (ids != pad_id)).astype(np.int32)


def row_lengths(ids: np.ndarray, pad_id: int) -> np.ndarray:
  """Real (non-padding) tokens of each row; padding is only at a row's end."""
  return np.sum(ids != pad_id, axis=-1).astype(np.int32)
