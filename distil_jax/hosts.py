"""Agreement between the processes of a multi-host run: each decision is made once and shared.

On one process every function is trivial. On a pod slice (after `jax.distributed.initialize()`),
process 0 decides (reads the workdir, picks the resume step, ...) and `share` gives its answer to
all; `together` runs work that all must finish before any goes on, and stops all if one fails;
`all_true` combines a local success flag.
"""

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from distil_jax import errors


def is_main() -> bool:
  """Whether this is process 0, which alone writes logs, metrics and exports."""
  return jax.process_index() == 0


def share(value: Any) -> Any:
  """Process 0's `value` (anything JSON can hold) on every process."""
  if jax.process_count() == 1:
    return value
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  padded = np.zeros(size, np.uint8)
  padded[:data.size] = data
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(padded)).decode())


def decide(decision) -> Any:
  """Runs `decision()` on process 0 and shares its result, or the exception it raised (raised
  again on every process, as a `RuntimeError` carrying the same message on the others)."""
  outcome = None
  if is_main():
    try:
      outcome = {"value": decision()}
    except Exception as e:  # Shared, then raised again below.
      error = e
      outcome = {"error": f"{type(e).__name__}: {e}"}
  outcome = share(outcome)
  if "error" in outcome:
    if is_main():
      raise error
    raise RuntimeError(f"process 0 refused: {outcome['error']}")
  return outcome["value"]


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
  """Runs the block on every process, then waits for all. An exception on one process is raised
  there and ends the others too (as `PeerFailed`, naming it), where a barrier would wait for ever
  on a process that stopped."""
  try:
    yield
  except Exception:
    _finished(False, what)
    raise
  _finished(True, what)


def _finished(ok: bool, what: str) -> None:
  if jax.process_count() == 1:
    return
  failed = ~multihost_utils.process_allgather(np.bool_(ok))
  if ok and failed.any():
    raise errors.PeerFailed(f"process {int(np.argmax(failed))} failed {what}: its log says why; "
                            "fix that and run the same command again")


def all_true(flag: bool) -> bool:
  """Whether `flag` is true on every process."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.bool_(flag))))
