"""Files on local disks and in GCS buckets alike, through `etils.epath` (gs:// needs gcsfs)."""

import os
import uuid

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
  """Whether `path` is a URL such as gs://bucket/dir rather than a local path."""
  return "://" in str(path)


def absolute(path: epath.PathLike) -> epath.Path:
  """`path` as an absolute epath (local paths resolved, `~` expanded; URLs as they are)."""
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def write_atomic(path: epath.PathLike, data: str | bytes) -> None:
  """Replaces the file's content all at once: a reader, a crash or another process writing the
  same file at the same time never sees half of it.

  Locally through a temporary file of this writer's own and a rename; a GCS object is replaced
  only when its upload completes."""
  path = epath.Path(path)
  write = epath.Path.write_text if isinstance(data, str) else epath.Path.write_bytes
  if is_remote(path):
    write(path, data)
    return
  temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  write(temporary, data)
  os.replace(temporary, path)
