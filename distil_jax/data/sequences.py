"""Model inputs `[CLS] tokens [SEP]` cut from tokenized documents, as in DistilBERT.

The documents form one stream, each followed by a [SEP]. A sequence is a range of the stream:
without packing, a chunk of at most max_len - 2 tokens of one document (longer documents give
several chunks); with packing, a window of max_len - 2 consecutive stream positions, so that
several documents, separated by [SEP], fill a sequence and no padding is wasted. Sequences shorter
than min_len tokens ([CLS] and [SEP] included) are dropped, as the original drops those of 11 tokens
or fewer.
"""

import dataclasses

import numpy as np

from distil_jax.data.tokens import TokenIds


@dataclasses.dataclass(frozen=True)
class Sequences:
  """Random access to sequences; `Sequences[i]` is an int32 array `[CLS] ... [SEP]`."""

  ids: TokenIds
  doc_starts: np.ndarray  # stream position of each document's first token
  starts: np.ndarray  # stream range of each sequence, [CLS] and [SEP] excluded
  stops: np.ndarray
  cls_id: int
  sep_id: int

  def __len__(self) -> int:
    return len(self.starts)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.padded(np.array([index]), self.lengths[index], pad_id=0)[0][0]

  def padded(self, indices: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids [len(indices), length] of the sequences padded with `pad_id`, and their lengths."""
    starts, stops = self.starts[indices, None], self.stops[indices, None]
    positions = starts + np.arange(length - 2)
    is_content = positions < stops
    positions = np.where(is_content, positions, starts)  # Stay in range; replaced by padding.
    docs = np.searchsorted(self.doc_starts, positions, side="right") - 1
    token_index = positions - docs  # Before document d come d separators.
    is_separator = token_index == self.ids.offsets[docs + 1]
    tokens = self.ids.tokens[np.minimum(token_index, len(self.ids.tokens) - 1)]
    content = np.where(is_separator, self.sep_id, tokens)
    ids = np.full((len(indices), length), pad_id, np.int32)
    ids[:, 0] = self.cls_id
    ids[:, 1:-1] = np.where(is_content, content, pad_id)
    lengths = (stops - starts + 2)[:, 0]
    ids[np.arange(len(indices)), lengths - 1] = self.sep_id
    return ids, lengths.astype(np.int32)

  @property
  def lengths(self) -> np.ndarray:
    return self.stops - self.starts + 2

  def select(self, keep: np.ndarray) -> "Sequences":
    """The sequences where boolean `keep` is true."""
    return dataclasses.replace(self, starts=self.starts[keep], stops=self.stops[keep])


def make_sequences(ids: TokenIds, *, max_len: int, min_len: int, pack: bool, cls_id: int,
                   sep_id: int) -> Sequences:
  """The sequences of at most `max_len` tokens cut from `ids` (see the module docstring)."""
  width = max_len - 2
  lengths = np.diff(ids.offsets)
  doc_starts = ids.offsets[:-1] + np.arange(len(lengths))
  if pack:
    separators = doc_starts + lengths
    starts = np.arange(0, ids.offsets[-1] + len(lengths), width)
    stops = np.minimum(starts + width, ids.offsets[-1] + len(lengths))
    # A window does not begin or end on a separator: [CLS] and the final [SEP] stand for it.
    starts = starts + np.isin(starts, separators)
    stops = np.maximum(stops - np.isin(stops - 1, separators), starts)
  else:
    chunks = -(-lengths // width)
    doc = np.repeat(np.arange(len(lengths)), chunks)
    chunk = np.arange(len(doc)) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    starts = doc_starts[doc] + chunk * width
    stops = np.minimum(starts + width, doc_starts[doc] + lengths[doc])
  sequences = Sequences(ids, doc_starts, starts, stops, cls_id, sep_id)
  return sequences.select(sequences.lengths >= min_len)


def split_by_length(sequences: Sequences, bucket_lengths: tuple[int, ...]) -> list[Sequences]:
  """Sequences grouped by the smallest of the ascending `bucket_lengths` that holds them."""
  bucket = np.searchsorted(bucket_lengths, sequences.lengths)
  return [sequences.select(bucket == i) for i in range(len(bucket_lengths))]
