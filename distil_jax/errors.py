"""Errors the user can fix: the commands print their one-line message alone, no traceback.

A traceback is kept for everything else (a bug). Each class also derives from the built-in
exception its callers would expect (ValueError, FileNotFoundError, FileExistsError).
"""


class UserError(Exception):
  """Bad input (a config value, a file, a workdir); the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
  """A config value, or data that do not fit it."""


class MissingInput(UserError, FileNotFoundError):
  """A file or directory that should be there is not."""


class OutputExists(UserError, FileExistsError):
  """An output would overwrite something that is not ours to overwrite."""


class Diverged(UserError, FloatingPointError):
  """Training met a non-finite loss, gradient or parameter; the last good state is saved."""


class StorageError(UserError, OSError):
  """The workdir's storage failed (a full disk, lost permissions, a bucket gone). The commands
  end at once: orbax's background threads would otherwise wait out their timeouts."""


class PeerFailed(UserError):
  """Another process of a multi-host run failed in a step that all take together; its own log
  holds the reason."""


class Preempted(Exception):
  """A preemption (SIGTERM) stopped training after it saved; the commands exit 0 with the message,
  and running the same command again resumes."""
