"""File helpers for caches that several processes on one machine may build at once."""

import contextlib
import fcntl
import os
import pathlib
from collections.abc import Iterator

from distil_jax import errors


@contextlib.contextmanager
def exclusive_lock(path: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive lock on `path` (created if missing) for the duration of the block."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def local_dir(path: str) -> pathlib.Path:
  """`path` with `~` expanded, checked to be on the local file system (caches are memory-mapped)."""
  if "://" in path:
    raise errors.ConfigError(
        f"config.data.data_dir={path!r} must be a local directory: set it to a local "
        "path and put remote TFDS datasets in config.data.tfds_data_dir")
  return pathlib.Path(os.path.expanduser(path))
