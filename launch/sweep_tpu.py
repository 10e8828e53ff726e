r"""Runs a sweep on TPU VMs: one VM per group of sweep points, the points of a group fused on it.

  python launch/sweep_tpu.py --name-prefix=sweep --zone=us-central2-b --accelerator=v4-32 \
      --experiment=experiments/bert_base.py --workdir=gs://BUCKET/sweep \
      --sweep='distill.temperature=1,2,4,8' --sweep='distill.alpha_ce=0.5,5' [--dry-run] \
      -- [--config.KEY=VALUE ...]

Plans the sweep here (`python -m distil_jax.sweep ... --plan`: the groups of points that can be
fused, no compute) or reads a saved plan (--plan-json), then for each group K does what
tpu_vm.py does with the VM PREFIX-gK and `distil_jax.sweep --distributed ... --group=K`. All
groups write into the one gs:// workdir; running the same command again resumes them.
--dry-run plans, then prints the commands and runs none of them.
"""

import argparse
import json
import pathlib
import subprocess
import sys
from collections.abc import Sequence

import gcloud
import tpu_vm


def sweep_flags(args: argparse.Namespace, overrides: Sequence[str]) -> list[str]:
  """The flags of `distil_jax.sweep` that every group shares."""
  return [f"--config={args.experiment}", f"--workdir={args.workdir}",
          *(f"--sweep={s}" for s in args.sweep), *overrides]


def read_plan(text: str, source: str) -> list[tuple[int, list[dict]]]:
  """[(group, points)] from the JSON lines of `distil_jax.sweep --plan`."""
  groups = []
  for number, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        group = json.loads(line)
        groups.append((int(group["group"]), list(group["points"])))
      except (ValueError, KeyError, TypeError) as e:
        raise gcloud.LaunchError(f"line {number} of {source} is not a group of the plan "
                                 f"({type(e).__name__}: {e}): pass the output of "
                                 "`python -m distil_jax.sweep ... --plan`") from None
  if not groups:
    raise gcloud.LaunchError(f"{source} has no groups: pass the output of "
                             "`python -m distil_jax.sweep ... --plan`")
  return sorted(groups, key=lambda group: group[0])


def _flag_value(value) -> str:
  """A sweep value as a --config.KEY=VALUE flag writes it (a JSON list is a tuple)."""
  return repr(tuple(value)) if isinstance(value, list) else str(value)


def plan(args: argparse.Namespace, overrides: Sequence[str]) -> list[tuple[int, list[dict]]]:
  """The sweep's groups: from --plan-json, or from `distil_jax.sweep --plan` run here."""
  if args.plan_json:
    path = pathlib.Path(args.plan_json)
    if not path.is_file():
      raise gcloud.LaunchError(f"--plan-json={path} does not exist: save the output of "
                               "`python -m distil_jax.sweep ... --plan` there")
    return read_plan(path.read_text(), f"--plan-json={path}")
  command = [sys.executable, "-m", "distil_jax.sweep", *sweep_flags(args, overrides), "--plan"]
  result = subprocess.run(command, capture_output=True, text=True, cwd=tpu_vm.ROOT, check=False)
  if result.returncode:
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    raise gcloud.LaunchError(f"planning the sweep failed ({last}): run `{gcloud.join(command)}` "
                             "to see why")
  return read_plan(result.stdout, "the plan")


def main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name-prefix", required=True, help="VM names are PREFIX-g0, PREFIX-g1, ...")
  parser.add_argument("--sweep", action="append", required=True,
                      help="KEY=V1,V2,... as distil_jax.sweep takes it (repeat for a grid)")
  parser.add_argument("--plan-json", help="the saved output of `python -m distil_jax.sweep ... "
                      "--plan` with the same flags (default: plan now)")
  tpu_vm.add_flags(parser)
  args, overrides = tpu_vm.parse(parser, argv)
  tpu_vm.check_run_flags(args)
  groups = plan(args, overrides)
  jobs = []
  for group, points in groups:
    # The group's program: its first point's shapes (the others differ only in what fuses).
    tpu_vm.check_fit(args, [*overrides, *(f"--config.{key}={_flag_value(value)}" for key, value
                                          in points[0]["overrides"].items())], len(points))
    tpu = gcloud.Tpu(f"{args.name_prefix}-g{group}", args.zone, args.project)
    print(f"# {tpu.name} runs group {group}: "
          + " ".join(str(point.get("workdir")) for point in points))
    jobs.append((tpu, "distil_jax.sweep", [*sweep_flags(args, overrides), f"--group={group}"]))
  tpu_vm.launch(jobs, args, args.name_prefix)


if __name__ == "__main__":
  tpu_vm.run_main(main, sys.argv[1:])
