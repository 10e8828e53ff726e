r"""Creates a TPU VM or pod slice, installs distil_jax on every host and starts one experiment.

  python launch/tpu_vm.py --name=distil --zone=us-central2-b --accelerator=v4-32 [--spot] \
      --experiment=experiments/bert_base.py --workdir=gs://BUCKET/distilbert [--dry-run] \
      -- [--config.KEY=VALUE ...]
  python launch/tpu_vm.py --name=distil --zone=us-central2-b --delete

In order: creates the queued resource NAME (reused while it exists, deleted and created again
after a preemption) and waits until it is ACTIVE; copies this checkout's HEAD (`git archive`;
uncommitted changes are not copied) or clones --repo on every worker and installs it in
~/distil_jax/.venv; starts `distil_jax.main --distributed` on every worker (JAX's multi-host
runtime) in the background; prints how to follow the log and how to delete the VM. Running the
same command again resumes the run from its gs:// workdir. Before anything, the experiment's
step is compiled here for the accelerator (`distil_jax.compile`, with libtpu): a program that
does not fit is refused. --dry-run prints the commands (assuming the queued resource does not
exist yet) and runs none of them but that check.
"""

import argparse
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

import gcloud

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIR = "distil_jax"  # The checkout on every worker, in the home directory.
TARBALL = "distil_jax.tar.gz"  # This checkout's HEAD, copied to the home directory.


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The flags of every launcher: where, what hardware, which experiment, how to get the code."""
  parser.add_argument("--zone", required=True, help="a zone with TPU quota, e.g. us-central2-b")
  parser.add_argument("--project", help="GCP project (default: gcloud's core/project)")
  parser.add_argument("--accelerator", help="v4-32, v5p-8, v6e-8, ...; v5e-8 is accepted for "
                      "Cloud's name v5litepod-8")
  parser.add_argument("--spot", action="store_true", help="Spot TPUs (cheaper, preemptible)")
  parser.add_argument("--runtime", help="TPU runtime version (default from the accelerator: "
                      + ", ".join(f"{k}: {v}" for k, v in gcloud.RUNTIMES.items()) + ")")
  parser.add_argument("--experiment", help="config file in this checkout, e.g. "
                      "experiments/bert_base.py")
  parser.add_argument("--workdir", help="gs://BUCKET/PATH (every host must see it)")
  parser.add_argument("--repo", help="git URL to clone on the workers (default: copy this "
                      "checkout's HEAD)")
  parser.add_argument("--poll-seconds", type=float, default=30,
                      help="seconds between checks that the queued resource is ACTIVE")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the commands, run nothing (but the fit check)")
  parser.add_argument("--no-fit-check", dest="fit_check", action="store_false",
                      help="skip compiling the program for the accelerator before creating it")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]
          ) -> tuple[argparse.Namespace, list[str]]:
  """(flags, the --config.KEY=VALUE overrides after `--`)."""
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args, overrides = parser.parse_args(argv[:split]), argv[split + 1:]
  for override in overrides:
    if not re.fullmatch(r"--config\.[\w.]+=.*", override, re.DOTALL):
      raise gcloud.LaunchError(f"{override!r} after -- is not --config.KEY=VALUE: put the "
                               "launcher's own flags before --")
  return args, overrides


def check_run_flags(args: argparse.Namespace) -> None:
  """Checks the flags a run needs; fills in Cloud's accelerator type and the runtime."""
  missing = [f"--{name}" for name in ("accelerator", "experiment", "workdir")
             if getattr(args, name) is None]
  if missing:
    raise gcloud.LaunchError(f"missing {', '.join(missing)}: a run needs them")
  if not re.fullmatch(r"gs://[^/\s]+(/\S*)?", args.workdir):
    raise gcloud.LaunchError(f"--workdir={args.workdir} is not a gs:// path: every host must see "
                             "the same workdir, pass --workdir=gs://BUCKET/PATH")
  if args.repo is None and not (ROOT / args.experiment).is_file():
    raise gcloud.LaunchError(f"--experiment={args.experiment} is not a file of this checkout: "
                             "pass a path relative to its root, e.g. experiments/bert_base.py")
  args.accelerator = gcloud.accelerator_type(args.accelerator)
  args.runtime = args.runtime or gcloud.runtime_version(args.accelerator)


def tarball_path(name: str) -> str:
  """Where this checkout's HEAD is archived for `name` before the copy to its workers."""
  return f"/tmp/distil_jax-{name}.tar.gz"


def archive(path: str, dry_run: bool) -> None:
  gcloud.run(["git", "archive", "--format=tar.gz", f"--output={path}", "HEAD"], dry_run,
             cwd=str(ROOT))


def create(tpu: gcloud.Tpu, args: argparse.Namespace) -> None:
  """Creates the queued resource, unless it exists; a preempted or failed one is recreated."""
  current = None if args.dry_run else gcloud.state(tpu)
  if current in gcloud.BROKEN:
    gcloud.run(gcloud.delete(tpu), args.dry_run)
  elif current is not None:
    print(f"# {tpu.name} exists ({current}): reusing it", flush=True)
    return
  gcloud.run(gcloud.create(tpu, args.accelerator, args.runtime, args.spot), args.dry_run)


def install(tpu: gcloud.Tpu, args: argparse.Namespace, tarball: str | None) -> None:
  """Waits until `tpu` is ACTIVE, puts the code on every worker and installs it there."""
  gcloud.wait_active(tpu, args.poll_seconds, args.dry_run)
  if args.repo is None:
    gcloud.run(gcloud.scp(tpu, tarball, TARBALL), args.dry_run)
    code = f"mkdir -p {DIR} && tar -xzf {TARBALL} -C {DIR}"
  else:
    code = (f"(test -d {DIR} || git clone {shlex.quote(args.repo)} {DIR}) && "
            f"git -C {DIR} pull --ff-only")
  gcloud.run(gcloud.ssh(tpu, f"{code} && cd {DIR} && {gcloud.venv()} && "
                        f"{gcloud.pip_install('.venv/bin/pip')}"), args.dry_run)


def start(tpu: gcloud.Tpu, module: str, flags: Sequence[str], dry_run: bool) -> None:
  """Starts `python -m module --distributed flags` in the background on every worker."""
  command = gcloud.join([".venv/bin/python", "-m", module, "--distributed", *flags])
  # In braces, the shell keeps no handle on ssh's output, so the ssh returns at once.
  gcloud.run(gcloud.ssh(tpu, f"cd {DIR} && {{ nohup {command} > distil.log 2>&1 & }}"), dry_run)


def print_afterwards(tpus: Sequence[gcloud.Tpu]) -> None:
  """How to follow each VM's log and how to delete it."""
  for tpu in tpus:
    print(f"# Follow the log of {tpu.name} (worker 0):\n"
          f"#   {gcloud.join(gcloud.ssh(tpu, f'tail -f {DIR}/distil.log', worker='0'))}\n"
          f"# Delete {tpu.name} (stops its run):\n"
          f"#   {gcloud.join(gcloud.delete(tpu))}")


def check_fit(args: argparse.Namespace, overrides: Sequence[str], runs: int = 1) -> None:
  """Compiles the experiment's step for the accelerator here (`distil_jax.compile`, libtpu),
  dry run or not: a program the slice cannot hold is refused before any VM is created."""
  if not args.fit_check:
    return
  command = [sys.executable, "-m", "distil_jax.compile", f"--config={args.experiment}",
             f"--slice={args.accelerator}", f"--runs={runs}", *overrides]
  print(f"# fit check: {gcloud.join(command)}", flush=True)
  result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
  if result.returncode:
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    raise gcloud.LaunchError(f"{last.removeprefix('FATAL ')} (no VM was created; "
                             "--no-fit-check skips this check)")
  print(result.stdout.strip(), flush=True)


def launch(jobs: Sequence[tuple[gcloud.Tpu, str, list[str]]], args: argparse.Namespace,
           tarball_name: str) -> None:
  """Runs each job `(tpu, module, flags)`: creates every VM first (they queue together), then
  installs the code on each and starts its job."""
  for tpu, _, _ in jobs:
    create(tpu, args)
  tarball = None if args.repo else tarball_path(tarball_name)
  if tarball:
    archive(tarball, args.dry_run)
  for tpu, module, flags in jobs:
    install(tpu, args, tarball)
    start(tpu, module, flags, args.dry_run)
  print_afterwards([tpu for tpu, _, _ in jobs])


def main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", required=True, help="name of the queued resource and its VM")
  parser.add_argument("--delete", action="store_true", help="delete the VM (alone: no run)")
  add_flags(parser)
  args, overrides = parse(parser, argv)
  tpu = gcloud.Tpu(args.name, args.zone, args.project)
  if args.delete:
    if args.experiment or args.workdir or overrides:
      raise gcloud.LaunchError("--delete deletes the VM and starts nothing: pass it with only "
                               "--name, --zone and --project")
    gcloud.run(gcloud.delete(tpu), args.dry_run)
    return
  check_run_flags(args)
  check_fit(args, overrides)
  flags = [f"--config={args.experiment}", f"--workdir={args.workdir}", *overrides]
  launch([(tpu, "distil_jax.main", flags)], args, tpu.name)


def run_main(main_fn: Callable[[Sequence[str]], None], argv: Sequence[str]) -> None:
  """Runs a launcher's `main`, turning bad input and failed commands into a one-line error."""
  try:
    main_fn(argv)
  except gcloud.LaunchError as e:
    sys.exit(f"error: {e}")
  except subprocess.CalledProcessError as e:
    sys.exit(f"error: exit code {e.returncode} from {gcloud.join(e.cmd)} (its output is above); "
             "fix that and run the same command again")


if __name__ == "__main__":
  run_main(main, sys.argv[1:])
