"""`gcloud` commands for Cloud TPU queued resources and TPU VMs, and the project's TPU install.

Every command is an argv list; `run` prints it shell-quoted (pasteable) and runs it, or only
prints it on a dry run.
"""

import dataclasses
import re
import shlex
import subprocess
import time

JAX_TPU = "jax[tpu]==0.10.2"
# The TPU runtimes are Ubuntu 22.04 with Python 3.10; the pinned requirements need 3.11, which
# uv (from PyPI) installs.
UV = "uv==0.13.9"
PYTHON = "3.11"
# Accelerator family -> runtime version (Ubuntu, Docker and the TPU driver; JAX comes from pip).
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
ACTIVE = "ACTIVE"
BROKEN = ("FAILED", "SUSPENDING", "SUSPENDED")  # Preempted or never provisioned: recreate.


class LaunchError(Exception):
  """Bad input or a TPU that cannot be used; the one-line message says what to do."""


def pip_install(pip: str) -> str:
  """The project's TPU install line (as in README.md), run with `pip`."""
  return (f"{pip} install -r requirements.txt {shlex.quote(JAX_TPU)} && "
          f"{pip} install --no-deps -r requirements-nodeps.txt")


def venv() -> str:
  """Creates `.venv` with Python 3.11 and pip, unless it exists (a re-run keeps it)."""
  return (f"(test -x .venv/bin/python || (python3 -m pip install --user {UV} && "
          f"~/.local/bin/uv venv --seed --python={PYTHON} .venv))")


def accelerator_type(accelerator: str) -> str:
  """Cloud's name of `accelerator`: `v5e-N` is `v5litepod-N`; others are unchanged."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator)
  if not match:
    raise LaunchError(f"--accelerator={accelerator} is not FAMILY-SIZE: pass e.g. v4-32, "
                      "v5e-8 (or v5litepod-8), v5p-8 or v6e-8")
  family = "v5litepod" if match[1] == "v5e" else match[1]
  return f"{family}-{match[2]}"


def runtime_version(accelerator: str) -> str:
  """The runtime version for `accelerator` (a Cloud accelerator type)."""
  family = accelerator.rsplit("-", 1)[0]
  if family not in RUNTIMES:
    raise LaunchError(f"no default runtime for {accelerator} (known: {', '.join(RUNTIMES)}): "
                      "pass --runtime=VERSION")
  return RUNTIMES[family]


@dataclasses.dataclass(frozen=True)
class Tpu:
  """A queued resource and its TPU VM (node), both called `name`."""
  name: str
  zone: str
  project: str | None = None

  def __post_init__(self):
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", self.name):
      raise LaunchError(f"TPU name {self.name!r} is invalid: use lowercase letters, digits and "
                        "hyphens, starting with a letter")

  @property
  def where(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


def create(tpu: Tpu, accelerator: str, runtime: str, spot: bool) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "create", tpu.name,
          f"--node-id={tpu.name}", *tpu.where, f"--accelerator-type={accelerator}",
          f"--runtime-version={runtime}", *(["--spot"] if spot else [])]


def describe_state(tpu: Tpu) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", tpu.name, *tpu.where,
          "--format=value(state.state)"]


def delete(tpu: Tpu) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "delete", tpu.name, *tpu.where,
          "--force", "--quiet"]


def ssh(tpu: Tpu, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu.name, *tpu.where,
          f"--worker={worker}", f"--command={command}"]


def scp(tpu: Tpu, local: str, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{tpu.name}:{remote}",
          *tpu.where, "--worker=all"]


def quote(arg: str) -> str:
  """`arg` for a shell; a `--flag=value` keeps its flag unquoted: `--command='tail -f x'`."""
  match = re.fullmatch(r"(--[\w.-]+=)(.*)", arg, re.DOTALL)
  return match[1] + shlex.quote(match[2]) if match else shlex.quote(arg)


def join(argv: list[str]) -> str:
  return " ".join(quote(a) for a in argv)


def run(argv: list[str], dry_run: bool, cwd: str | None = None) -> None:
  """Prints `argv` as a shell line, then runs it (in `cwd`) unless `dry_run`."""
  print(join(argv), flush=True)
  if not dry_run:
    subprocess.run(argv, check=True, cwd=cwd)


def state(tpu: Tpu) -> str | None:
  """The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, ...), None if there is none."""
  result = subprocess.run(describe_state(tpu), capture_output=True, text=True, check=False)
  return result.stdout.strip() if result.returncode == 0 else None


def wait_active(tpu: Tpu, poll_seconds: float, dry_run: bool) -> None:
  """Polls the queued resource's state (printing each change) until it is ACTIVE."""
  print(join(describe_state(tpu)), flush=True)
  last = None
  while not dry_run and (current := state(tpu)) != ACTIVE:
    if current in BROKEN:
      raise LaunchError(f"queued resource {tpu.name} is {current}: run the same command again "
                        "to delete and recreate it")
    if current != last:
      print(f"# {tpu.name}: {current or 'not found yet'}", flush=True)
      last = current
    time.sleep(poll_seconds)
