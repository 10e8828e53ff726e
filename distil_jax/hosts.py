"""Agreement between the processes of a multi-host run: each decision is made once and shared.

On one process every function is trivial. On a pod slice (after `jax.distributed.initialize()`),
process 0 decides (reads the workdir, picks the resume step, ...) and `share` gives its answer to
all; `barrier` waits for every process; `all_true` combines a local success flag.
"""

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


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


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier called `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def all_true(flag: bool) -> bool:
  """Whether `flag` is true on every process."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.bool_(flag))))
