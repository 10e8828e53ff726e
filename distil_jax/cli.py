"""What the commands share: flag parsing with one-line errors, logging, the multi-host runtime."""

import glob
import logging as std_logging
import os
import re
import sys
import threading

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from distil_jax import errors

# Flags the commands share (defined once, so that every command imports beside the others).
CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file "
                                         "(experiments/NAME.py).", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory, local or gs://.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Start JAX's multi-host runtime (jax.distributed.initialize()) first: "
    "auto-detected on TPU VMs, or given by --coordinator_address, --num_processes, --process_id.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, with --distributed off TPU VMs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to n - 1.")
RESUME_STEP = flags.DEFINE_integer(
    "resume_step", None, "Resume from this checkpoint rather than the latest (a rewind: later "
    "checkpoints are moved to WORKDIR/set_aside).")
JSON_OUT = flags.DEFINE_string("json_out", None, "Also write what the command prints (metrics, "
                               "compile reports) to this JSON file.")
ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir although the config changes the run's "
    "trajectory (learning rate, steps, data, ...).")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for an unknown --config.KEY override."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # How ml_collections refuses an unknown key.
    key = (re.findall(r"\w+", str(e).split("Did you mean")[0]) or ["?"])[0]
    hint = re.search(r'Did you mean "(\w+)"', str(e))
    sys.exit(f"FATAL unknown config key {key!r} in the overrides"
             + (f': did you mean "{hint[1]}"?' if hint else "")
             + " (the keys are in experiments/common.py)")


class _OwnLogs(std_logging.Filter):
  """Keeps this package's lines, and libraries' warnings and errors without their tracebacks;
  libraries' INFO chatter is dropped, and orbax's errors too (a failed save ends the command
  with its own FATAL line)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if "distil_jax" in record.pathname:
      return True
    if record.levelno < std_logging.WARNING or (
        record.levelno >= std_logging.ERROR and "orbax" in record.pathname):
      return False
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _one_line(exc: BaseException | None, where: str) -> None:
  """A library's exception outside the command's own flow, in one line (the command says what
  it means)."""
  logging.warning("%s in %s: %s", type(exc).__name__, where, (str(exc).splitlines() or [""])[0])


def _thread_failed(args: threading.ExceptHookArgs) -> None:
  """A Python thread's uncaught exception."""
  _one_line(args.exc_value, f"thread {args.thread.name if args.thread else '?'}")


def _unraisable(args) -> None:
  """An exception that nothing could catch (in a finalizer, or a native library's callback)."""
  _one_line(args.exc_value, "a callback")


def _uncaught(exc_type, exc_value, exc_tb) -> None:
  """The main thread's uncaught exception with its traceback, as Python prints it; one printed
  by a native library's thread, in one line."""
  if threading.current_thread() is threading.main_thread():
    sys.__excepthook__(exc_type, exc_value, exc_tb)
  else:
    _one_line(exc_value, f"thread {threading.current_thread().name}")


def quiet_library_tracebacks() -> None:
  """Libraries' exceptions in their own threads and callbacks, each in one warning line."""
  threading.excepthook, sys.unraisablehook, sys.excepthook = _thread_failed, _unraisable, _uncaught


def _without_absent_accelerators() -> None:
  """With libtpu installed (requirements-dev.txt), JAX probes for a TPU when it starts, 0.15 s
  and five lines of libtpu's complaints on a machine that has none: where no TPU (nor GPU)
  device file exists and JAX_PLATFORMS is not set, JAX starts on the CPU alone."""
  if "JAX_PLATFORMS" in os.environ or any(glob.glob(pattern) for pattern in (
      "/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")):
    return
  jax.config.update("jax_platforms", "cpu")


def start() -> None:
  """Quiets libraries' INFO logs and tracebacks, keeps JAX off accelerators that are not there,
  and starts the multi-host runtime if asked: `run` calls it before a command's main."""
  logging.get_absl_handler().addFilter(_OwnLogs())
  quiet_library_tracebacks()
  _without_absent_accelerators()
  if _DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value is not None:
    raise app.UsageError("--coordinator_address, --num_processes and --process_id need "
                         "--distributed")


def run(main) -> None:
  """`app.run(main)` with the shared flag parsing; a `UserError` ends it with its one line, a
  preemption with exit code 0."""
  def guarded(argv):
    try:
      start()
      main(argv)
    except errors.Preempted as e:  # It saved: exit 0, the same command resumes.
      logging.info("%s", e)
    except errors.StorageError as e:
      print(f"FATAL {e}", file=sys.stderr, flush=True)
      os._exit(1)  # Not sys.exit: it would wait for orbax's threads to time out (minutes).
    except errors.UserError as e:
      sys.exit(f"FATAL {e}")
    except OSError as e:  # The disk, a permission, a path: the environment, not the code.
      where = f" {e.filename}" if e.filename else ""
      print(f"FATAL cannot use{where} ({type(e).__name__}: {e.strerror or e}): fix the path, "
            "its permissions or free space, and run the command again", file=sys.stderr,
            flush=True)
      os._exit(1)
  app.run(guarded, flags_parser=parse_flags)
