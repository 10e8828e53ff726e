"""A local Google Cloud Storage for tests: gcp-storage-emulator, in memory, with three gaps mended.

Run as a process: `python tests/gcs_emulator.py --port=P --buckets=a,b` serves on 127.0.0.1:P,
creates the buckets, prints "ready" and serves until killed. Programs reach it through gcsfs
(`etils.epath`, fsspec), tensorstore (orbax) and google-cloud-storage when their environment
holds `emulator_env(port)`; set it before they import gcsfs or google.auth, i.e. run them as
subprocesses. From tests, `running(bucket)` starts one and stops it (the `gcs` fixture).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http import HTTPStatus

from gcp_storage_emulator import server, settings
from gcp_storage_emulator.handlers import buckets, objects

_ORIGINAL_LS, _ORIGINAL_DOWNLOAD = objects.ls, objects.download


def emulator_env(port: int) -> dict[str, str]:
  """The variables that point gcsfs, tensorstore and google-cloud-storage at the emulator."""
  url = f"http://127.0.0.1:{port}"
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage.
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's array writes).
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "abc",  # tensorstore: skip looking for credentials.
      "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credentials.
      "NO_GCE_CHECK": "true",  # google.auth: do not probe the GCE metadata server.
      # gcsfs would otherwise probe each bucket for hierarchical namespaces over gRPC, which the
      # emulator does not serve: 60 s per bucket before it gives up.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


def _ls(request, response, storage, *args, **kwargs):
  """Object listing that honours `startOffset` and `endOffset`.

  Real GCS lists only names in [startOffset, endOffset); the emulator ignores both and lists the
  whole prefix. tensorstore deletes a key range (`KvStore.delete_range`) by listing that range and
  deleting what it gets, so unmended it deletes every object in the bucket.
  """
  _ORIGINAL_LS(request, response, storage, *args, **kwargs)
  start = request.query.get("startOffset", [""])[0]
  end = request.query.get("endOffset", [""])[0]
  if response.status != HTTPStatus.OK or not (start or end):
    return
  listing = json.loads(response._content)
  listing["items"] = [item for item in listing["items"]
                      if start <= item["name"] and (not end or item["name"] < end)]
  response.json(listing)


def _download(request, response, storage, *args, **kwargs):
  """Object download that sends the object's generation in `x-goog-generation`, as real GCS does.

  The emulator omits it; tensorstore then reads an empty generation, and orbax's saves and restores
  of OCDBT checkpoints fail with "Malformed StorageGeneration".
  """
  _ORIGINAL_DOWNLOAD(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]


def _move(request, response, storage, *args, **kwargs):
  """Object move (`POST .../o/SRC/moveTo/o/DST`) within a bucket: copy, then delete the source.

  gcsfs 2026.10 moves with it first (every `epath.Path.rename`); the emulator answers 501, which
  gcsfs retries with back-off for 35 s before it falls back to copy and delete.
  """
  request.params["dest_bucket_name"] = request.params["bucket_name"]
  objects.copy(request, response, storage, *args, **kwargs)
  if response.status == HTTPStatus.OK:
    storage.delete_file(request.params["bucket_name"], request.params["object_id"])


def _mend() -> None:
  """Mends listings and downloads (`_ls`, `_download`), adds object moves (`_move`), and lets
  connections queue as a bucket takes them: the emulator serves one request at a time, and
  Python's HTTPServer keeps 5 waiting, so a client's 256 concurrent byte-range reads stalled
  for minutes in TCP retries."""
  server.server.HTTPServer.request_queue_size = 1024
  objects.download = _download  # `objects.get` calls it by name for `?alt=media`.
  for _, handlers in server.HANDLERS:
    for method, handler in handlers.items():
      handlers[method] = {_ORIGINAL_LS: _ls, _ORIGINAL_DOWNLOAD: _download}.get(handler, handler)
  move = (rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
          r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$")
  server.HANDLERS = ((move, {server.POST: _move}), *server.HANDLERS)  # Read at each request.


@dataclasses.dataclass(frozen=True)
class Emulator:
  """A running emulator: `env` for subprocesses, `bucket` ("gs://NAME"), and plain-HTTP reads."""

  port: int
  bucket: str
  env: dict[str, str]

  def _call(self, path: str, data: bytes | None = None) -> bytes:
    url = f"http://127.0.0.1:{self.port}{path}"
    with urllib.request.urlopen(urllib.request.Request(url, data), timeout=10) as response:
      return response.read()

  def write(self, name: str, data: bytes) -> None:
    """Uploads object `name` over the JSON API."""
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    self._call(f"/upload/storage/v1/b/{self.bucket[5:]}/o?{query}", data)

  def names(self, prefix: str = "") -> list[str]:
    """Names of the objects in the bucket under `prefix`, listed over the JSON API."""
    query = urllib.parse.urlencode({"prefix": prefix})
    listing = json.loads(self._call(f"/storage/v1/b/{self.bucket[5:]}/o?{query}"))
    return sorted(item["name"] for item in listing.get("items") or [])

  def read(self, name: str) -> bytes:
    """The content of object `name`, downloaded over the JSON API."""
    return self._call(f"/download/storage/v1/b/{self.bucket[5:]}/o/"
                     f"{urllib.parse.quote(name, safe='')}?alt=media")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str, timeout: float = 30.0) -> Iterator[Emulator]:
  """Runs the emulator with `bucket` on a free loopback port until the block ends."""
  port = _free_port()
  with tempfile.TemporaryFile("w+") as log:
    process = subprocess.Popen(
        [sys.executable, str(pathlib.Path(__file__)), f"--port={port}", f"--buckets={bucket}"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    try:
      deadline = time.monotonic() + timeout
      line = ""
      while line != "ready\n" and process.poll() is None and time.monotonic() < deadline:
        if select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
          line = process.stdout.readline()
      if line != "ready\n":
        log.seek(0)
        raise RuntimeError(
            f"the GCS emulator did not start on port {port} within {timeout:.0f} s (exit code "
            f"{process.poll()}; stderr: {log.read()[-2000:]!r}); is gcp-storage-emulator "
            "installed (requirements-dev.txt)?")
      yield Emulator(port, f"gs://{bucket}", {**os.environ, **emulator_env(port)})
    finally:
      process.kill()
      process.wait()


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--buckets", default="", help="comma-separated bucket names to create")
  args = parser.parse_args(argv)
  _mend()
  emulator = server.create_server("127.0.0.1", args.port, in_memory=True)
  for name in filter(None, args.buckets.split(",")):
    buckets.create_bucket(name, emulator._storage)
  emulator.start()
  print("ready", flush=True)
  threading.Event().wait()  # Serves until killed.


if __name__ == "__main__":
  main(sys.argv[1:])
