"""TPU launchers (launch/): the gcloud commands they print with --dry-run and run without it.

The launchers run as a user runs them, in a subprocess; a fake `gcloud` first on PATH records
the commands of a real (not dry) run and plays the queued resource's states.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).parent.parent
INSTALL = (".venv/bin/pip install -r requirements.txt 'jax[tpu]==0.10.2' && "
           ".venv/bin/pip install --no-deps -r requirements-nodeps.txt")
OVERRIDES = ["--config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets",
             '--config.data.sources=("tfds:wikipedia/20230601.en", "text:gs://BUCKET/books/*.txt")',
             "--config.tokenizer=$HOME/it's here"]
# The fit check (bert_base compiled for the slice) takes minutes here: test_fit_check_* test it.
V4_32 = ["--name=distil", "--no-fit-check", "--zone=us-central2-b", "--accelerator=v4-32",
         "--spot", "--experiment=experiments/bert_base.py", "--workdir=gs://BUCKET/distilbert"]
V5E_8 = ["--name=distil-v5e", "--no-fit-check", "--zone=us-west4-a", "--project=my-project",
         "--accelerator=v5e-8", "--experiment=experiments/bert_base.py",
         "--workdir=gs://BUCKET/distilbert-v5e"]
GCLOUD = ["gcloud", "compute", "tpus"]
FAKE_GCLOUD = """\
#!{python}
import json, os, pathlib, sys
folder = pathlib.Path(os.environ["FAKE_GCLOUD"])
with open(folder / "calls.jsonl", "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:5] == ["compute", "tpus", "queued-resources", "describe"]:
  states = (folder / "states").read_text().split()
  (folder / "states").write_text(" ".join(states[1:] or states))
  sys.exit(1) if states[0] == "NOT_FOUND" else print(states[0])
"""


@pytest.fixture
def gcloud_dir(tmp_path) -> pathlib.Path:
  """A folder with a fake `gcloud`; it logs its calls to calls.jsonl, reads states from states."""
  (tmp_path / "bin").mkdir()
  script = tmp_path / "bin" / "gcloud"
  script.write_text(FAKE_GCLOUD.format(python=sys.executable))
  script.chmod(0o755)
  return tmp_path


def launch(script: str, *args: str, gcloud_dir: pathlib.Path,
           states: str = "") -> subprocess.CompletedProcess:
  """Runs launch/`script` with the fake gcloud first on PATH."""
  (gcloud_dir / "states").write_text(states)
  env = {**os.environ, "FAKE_GCLOUD": str(gcloud_dir),
         "PATH": f"{gcloud_dir / 'bin'}{os.pathsep}{os.environ['PATH']}"}
  return subprocess.run([sys.executable, f"launch/{script}", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False)


def gcloud_calls(gcloud_dir: pathlib.Path) -> list[list[str]]:
  path = gcloud_dir / "calls.jsonl"
  return [["gcloud", *json.loads(line)] for line in path.read_text().splitlines()] \
      if path.exists() else []


def printed(stdout: str) -> list[list[str]]:
  """The printed commands, split as a shell splits them."""
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def printed_afterwards(stdout: str) -> list[list[str]]:
  """The commands printed as comments: following the logs, deleting."""
  return [shlex.split(line[len("#   "):]) for line in stdout.splitlines()
          if line.startswith("#   ")]


def remote(command: list[str]) -> str:
  """The shell command of a `gcloud ... ssh --command=...`."""
  [flag] = [a for a in command if a.startswith("--command=")]
  return flag[len("--command="):]


def ssh_commands(commands: list[list[str]], name: str) -> list[list[str]]:
  return [c for c in commands if c[:6] == [*GCLOUD, "tpu-vm", "ssh", name]]


def dry_run(script: str, *args: str, gcloud_dir: pathlib.Path) -> str:
  result = launch(script, "--dry-run", *args, gcloud_dir=gcloud_dir)
  assert result.returncode == 0, result.stderr
  assert gcloud_calls(gcloud_dir) == []  # A dry run runs nothing.
  return result.stdout


def run_in_shell(command: str, home: pathlib.Path) -> list[str]:
  """Runs a remote run command in bash in `home`, with a fake .venv/bin/python that records its
  arguments and then sleeps; returns them. Fails if bash waits for the background program."""
  python = home / "distil_jax" / ".venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(f"#!{sys.executable}\nimport json, sys, time\n"
                    f"open({str(home / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
                    "time.sleep(5)\n")
  python.chmod(0o755)
  start = time.monotonic()
  subprocess.run(["bash", "-c", command], cwd=home, capture_output=True, check=True)
  assert time.monotonic() - start < 3  # gcloud's ssh returns at once: nothing holds its output.
  while not (home / "argv.json").exists() and time.monotonic() - start < 10:
    time.sleep(0.05)
  return json.loads((home / "argv.json").read_text())


@pytest.mark.parametrize("flags, accelerator, runtime, where, spot", [
    (V4_32, "v4-32", "tpu-ubuntu2204-base", ["--zone=us-central2-b"], ["--spot"]),
    (V5E_8, "v5litepod-8", "v2-alpha-tpuv5-lite", ["--zone=us-west4-a", "--project=my-project"],
     []),
])
def test_tpu_vm_dry_run_bert_base(flags, accelerator, runtime, where, spot, gcloud_dir,
                                  tmp_path):
  stdout = dry_run("tpu_vm.py", *flags, "--", *OVERRIDES, gcloud_dir=gcloud_dir)
  name = flags[0].removeprefix("--name=")
  tarball = f"/tmp/distil_jax-{name}.tar.gz"
  create, archive, describe, copy, install, start = printed(stdout)
  assert create == [*GCLOUD, "queued-resources", "create", name, f"--node-id={name}", *where,
                    f"--accelerator-type={accelerator}", f"--runtime-version={runtime}", *spot]
  assert archive == ["git", "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
  assert describe == [*GCLOUD, "queued-resources", "describe", name, *where,
                      "--format=value(state.state)"]
  assert copy == [*GCLOUD, "tpu-vm", "scp", tarball, f"{name}:distil_jax.tar.gz", *where,
                  "--worker=all"]
  assert install[:-1] == start[:-1] == [*GCLOUD, "tpu-vm", "ssh", name, *where, "--worker=all"]
  assert remote(install).startswith("mkdir -p distil_jax && tar -xzf distil_jax.tar.gz -C "
                                    "distil_jax && cd distil_jax && ")
  assert remote(install).endswith(" && " + INSTALL)
  argv = run_in_shell(remote(start), tmp_path / "home")
  assert argv == ["-m", "distil_jax.main", "--distributed", "--config=experiments/bert_base.py",
                  flags[-1], *OVERRIDES]
  assert printed_afterwards(stdout) == [
      [*GCLOUD, "tpu-vm", "ssh", name, *where, "--worker=0",
       "--command=tail -f distil_jax/distil.log"],
      [*GCLOUD, "queued-resources", "delete", name, *where, "--force", "--quiet"]]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-16", "v2-alpha-tpuv6e"),
    ("v5litepod-4", "v2-alpha-tpuv5-lite"),
])
def test_runtime_from_accelerator(accelerator, runtime, gcloud_dir):
  flags = [f if not f.startswith("--accelerator") else f"--accelerator={accelerator}"
           for f in V4_32]
  create = printed(dry_run("tpu_vm.py", *flags, gcloud_dir=gcloud_dir))[0]
  assert f"--runtime-version={runtime}" in create
  create = printed(dry_run("tpu_vm.py", *flags, "--runtime=my-runtime",
                           gcloud_dir=gcloud_dir))[0]
  assert "--runtime-version=my-runtime" in create


def test_repo_is_cloned_on_every_worker(gcloud_dir):
  stdout = dry_run("tpu_vm.py", *V4_32, "--repo=https://example.com/me/distil jax.git",
                   gcloud_dir=gcloud_dir)
  commands = printed(stdout)
  assert not [c for c in commands if "scp" in c or c[0] == "git"]
  install = ssh_commands(commands, "distil")[0]
  assert "--worker=all" in install
  assert remote(install).startswith(
      "(test -d distil_jax || git clone 'https://example.com/me/distil jax.git' distil_jax) && "
      "git -C distil_jax pull --ff-only && cd distil_jax && ")
  assert remote(install).endswith(" && " + INSTALL)


@pytest.mark.parametrize("script, flags", [
    ("tpu_vm.py", V4_32),
    ("sweep_tpu.py", ["--name-prefix=sw", *V4_32[1:], "--sweep=distill.temperature=1,2"]),
])
@pytest.mark.parametrize("workdir", ["workdirs/run", "/home/me/run", "gs:/bucket/run", ""])
def test_refuses_a_workdir_not_on_gcs(script, flags, workdir, gcloud_dir):
  flags = [f"--workdir={workdir}" if f.startswith("--workdir=") else f for f in flags]
  result = launch(script, *flags, "--dry-run", gcloud_dir=gcloud_dir)
  assert result.returncode != 0
  assert result.stdout == ""
  assert result.stderr == (f"error: --workdir={workdir} is not a gs:// path: every host must "
                           "see the same workdir, pass --workdir=gs://BUCKET/PATH\n")


@pytest.mark.parametrize("args, message", [
    (["--accelerator=v3-8"], "no default runtime for v3-8"),
    (["--accelerator=v4"], "--accelerator=v4 is not FAMILY-SIZE"),
    (["--name=My_TPU"], "TPU name 'My_TPU' is invalid"),
    (["--", "--config_foo=1"], "'--config_foo=1' after -- is not --config.KEY=VALUE"),
    (["--experiment=experiments/nope.py"], "--experiment=experiments/nope.py is not a file"),
])
def test_refuses_bad_flags_in_one_line(args, message, gcloud_dir):
  result = launch("tpu_vm.py", *V4_32, "--dry-run", *args, gcloud_dir=gcloud_dir)
  assert result.returncode != 0
  assert result.stderr.startswith(f"error: {message}")
  assert result.stderr.count("\n") == 1


def test_delete(gcloud_dir):
  stdout = dry_run("tpu_vm.py", "--name=distil", "--zone=us-central2-b", "--project=p",
                   "--delete", gcloud_dir=gcloud_dir)
  assert printed(stdout) == [[*GCLOUD, "queued-resources", "delete", "distil",
                              "--zone=us-central2-b", "--project=p", "--force", "--quiet"]]
  result = launch("tpu_vm.py", *V4_32, "--delete", gcloud_dir=gcloud_dir)
  assert result.returncode != 0 and "--delete deletes the VM and starts nothing" in result.stderr
  assert gcloud_calls(gcloud_dir) == []


def test_run_executes_what_the_dry_run_prints(gcloud_dir):
  """A fresh VM: created, polled until ACTIVE, the code copied and installed, the run started."""
  name = f"test-launch-{os.getpid()}"
  flags = [f"--name={name}", *V4_32[1:], "--poll-seconds=0", "--", *OVERRIDES]
  stdout = dry_run("tpu_vm.py", *flags, gcloud_dir=gcloud_dir)
  result = launch("tpu_vm.py", *flags, gcloud_dir=gcloud_dir,
                  states="NOT_FOUND WAITING_FOR_RESOURCES PROVISIONING ACTIVE")
  assert result.returncode == 0, result.stderr
  tarball = pathlib.Path(f"/tmp/distil_jax-{name}.tar.gz")
  try:
    with tarfile.open(tarball) as archive:
      assert {"requirements.txt", "requirements-nodeps.txt", "experiments/bert_base.py",
              "distil_jax/main.py"} <= set(archive.getnames())
  finally:
    tarball.unlink()
  describe = printed(stdout)[2]
  expected = [c for c in printed(stdout) if c[0] == "gcloud" and c != describe]
  assert gcloud_calls(gcloud_dir) == [describe, expected[0], *[describe] * 3, *expected[1:]]
  lines = stdout.splitlines(keepends=True)
  waited = [shlex.split(line) for line in lines].index(describe) + 1
  assert result.stdout == "".join([*lines[:waited], f"# {name}: WAITING_FOR_RESOURCES\n",
                                   f"# {name}: PROVISIONING\n", *lines[waited:]])


@pytest.mark.parametrize("states, first_calls", [
    ("SUSPENDED ACTIVE", ["describe", "delete", "create", "describe"]),  # Preempted Spot VM.
    ("ACTIVE", ["describe", "describe"]),  # Still there: reused.
])
def test_run_again_recreates_or_reuses_the_vm(states, first_calls, gcloud_dir):
  result = launch("tpu_vm.py", *V4_32, "--repo=https://example.com/d.git", "--poll-seconds=0",
                  gcloud_dir=gcloud_dir, states=states)
  assert result.returncode == 0, result.stderr
  calls = gcloud_calls(gcloud_dir)
  assert [c[4] for c in calls[:len(first_calls)]] == first_calls
  assert [c[4] for c in calls[len(first_calls):]] == ["ssh", "ssh"]


def test_run_stops_when_the_queued_resource_fails(gcloud_dir):
  result = launch("tpu_vm.py", *V4_32, "--repo=https://example.com/d.git", "--poll-seconds=0",
                  gcloud_dir=gcloud_dir, states="NOT_FOUND WAITING_FOR_RESOURCES FAILED")
  assert result.returncode != 0
  assert result.stderr == ("error: queued resource distil is FAILED: run the same command again "
                           "to delete and recreate it\n")
  assert [c[4] for c in gcloud_calls(gcloud_dir)] == ["describe", "create", "describe",
                                                      "describe"]


def test_sweep_one_vm_per_group(gcloud_dir, tmp_path):
  plan = [{"group": g, "points": [{"overrides": {"distill.temperature": t, "student.num_layers": n},
                                   "workdir": f"T{t}_L{n}"} for t in (1.0, 2.0)]}
          for g, n in enumerate((4, 6, 3))]
  plan_file = tmp_path / "plan.jsonl"
  plan_file.write_text("".join(json.dumps(group) + "\n" for group in reversed(plan)))
  sweeps = ["--sweep=distill.temperature=1,2", "--sweep=student.num_layers=4,6,3"]
  stdout = dry_run("sweep_tpu.py", "--name-prefix=sw", *V5E_8[1:], *sweeps,
                   f"--plan-json={plan_file}", "--", *OVERRIDES, gcloud_dir=gcloud_dir)
  where = ["--zone=us-west4-a", "--project=my-project"]
  commands = printed(stdout)
  creates = [c for c in commands if c[3:5] == ["queued-resources", "create"]]
  assert creates == [[*GCLOUD, "queued-resources", "create", f"sw-g{g}", f"--node-id=sw-g{g}",
                      *where, "--accelerator-type=v5litepod-8",
                      "--runtime-version=v2-alpha-tpuv5-lite"] for g in range(3)]
  assert commands[:3] == creates  # All queue before any waits.
  assert [c for c in commands if c[0] == "git"] == [
      ["git", "archive", "--format=tar.gz", "--output=/tmp/distil_jax-sw.tar.gz", "HEAD"]]
  for g in range(3):
    install, start = ssh_commands(commands, f"sw-g{g}")
    assert "--worker=all" in install and "--worker=all" in start
    assert remote(install).endswith(INSTALL)
    argv = run_in_shell(remote(start), tmp_path / f"home{g}")
    assert argv == ["-m", "distil_jax.sweep", "--distributed", "--config=experiments/bert_base.py",
                    "--workdir=gs://BUCKET/distilbert-v5e", *sweeps, *OVERRIDES, f"--group={g}"]
    assert f"# sw-g{g} runs group {g}: T1.0_L{(4, 6, 3)[g]} T2.0_L{(4, 6, 3)[g]}" in stdout
  assert printed_afterwards(stdout) == [
      command for g in range(3) for command in (
          [*GCLOUD, "tpu-vm", "ssh", f"sw-g{g}", *where, "--worker=0",
           "--command=tail -f distil_jax/distil.log"],
          [*GCLOUD, "queued-resources", "delete", f"sw-g{g}", *where, "--force", "--quiet"])]


def test_sweep_refuses_a_bad_plan(gcloud_dir, tmp_path):
  plan_file = tmp_path / "plan.jsonl"
  plan_file.write_text('{"group": 0, "points": []}\nnot json\n')
  result = launch("sweep_tpu.py", "--name-prefix=sw", *V5E_8[1:], "--sweep=distill.alpha_ce=1,2",
                  f"--plan-json={plan_file}", "--dry-run", gcloud_dir=gcloud_dir)
  assert result.returncode != 0
  assert result.stderr.startswith(f"error: line 2 of --plan-json={plan_file} is not a group")
  assert result.stderr.count("\n") == 1


def test_readme_shows_what_the_launchers_print(gcloud_dir):
  """Each `python launch/... --dry-run` block of launch/README.md, run, prints the next block."""
  readme = (ROOT / "launch" / "README.md").read_text()
  examples = re.findall(r"```bash\n(python launch/[^`]*?--dry-run[^`]*?)```\n\nprints\n\n"
                        r"```text\n(.*?)```", readme, re.DOTALL)
  assert len(examples) == 2
  for command, output in examples:
    argv = shlex.split(command.replace("\\\n", " "))
    assert dry_run(argv[1].removeprefix("launch/"), *argv[2:], gcloud_dir=gcloud_dir) == output
  assert "--accelerator=v4-32" in examples[0][0] and "--accelerator=v5e-8" in examples[1][0]


def test_readme_install_line_is_the_launchers(gcloud_dir):
  """The main README's TPU install line is the one the launcher runs on every worker."""
  install = remote(ssh_commands(printed(dry_run("tpu_vm.py", *V4_32, gcloud_dir=gcloud_dir)),
                                "distil")[0])
  line = install[install.index(".venv/bin/pip install"):]
  assert line == INSTALL
  assert line.replace(".venv/bin/pip", "pip") in (ROOT / "README.md").read_text()
  assert "jax==0.10.2\n" in (ROOT / "requirements.txt").read_text()  # jax[tpu] is the same jax.
