"""What works on gs:// paths: each check runs one operation the program needs, timed.

Run by tests/test_gcs.py in a subprocess whose environment points at the emulator
(`gcs_emulator.emulator_env`): `python tests/gcs_checks.py gs://BUCKET OUT_DIR`. Writes
OUT_DIR/report.json, {check: {"seconds", "value" or "error", "warnings"}}, and the arrays each
checkpoint check restored to OUT_DIR/CHECK.npz. Checks never stop on an error: the error is the
finding. The test asserts on the report and reads the bucket over HTTP itself.
"""

import json
import pathlib
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from etils import epath

CHECKS: dict[str, Callable[[epath.Path, pathlib.Path], Any]] = {}


def check(fn: Callable[[epath.Path, pathlib.Path], Any]) -> Callable:
  CHECKS[fn.__name__] = fn
  return fn


def checkpoint_state(step: int) -> dict[str, np.ndarray]:
  """The state saved at `step`; test_gcs.py rebuilds it to compare the restored arrays with."""
  rng = np.random.default_rng(step)
  return {"params": {"kernel": rng.standard_normal((64, 32), dtype=np.float32),
                     "ids": rng.integers(0, 30522, (8,), dtype=np.int32)},
          "step": np.array(step, np.int32)}


def _save_flat(path: pathlib.Path, state: Any) -> None:
  np.savez(path, ids=state["params"]["ids"], kernel=state["params"]["kernel"], step=state["step"])


@check
def epath_files(root: epath.Path, out: pathlib.Path) -> dict[str, Any]:
  """mkdir, write/read, exists, glob, iterdir, rename, replace, stat, unlink, rmtree."""
  run = root / "run"
  run.mkdir(parents=True, exist_ok=True)
  found = {"dir_exists_after_mkdir": run.exists()}
  (run / "config.json").write_text('{"lr": 0.1}')
  (run / "model.json").write_bytes(b"{}")
  found |= {"read_text": (run / "config.json").read_text(),
            "exists": (run / "config.json").exists(), "dir_exists": run.exists(),
            "is_dir": run.is_dir(), "glob": sorted(p.name for p in run.glob("*.json")),
            "iterdir": sorted(p.name for p in run.iterdir()),
            "length": (run / "config.json").stat().length}
  (run / "config.json").rename(run / "renamed.json")
  found["after_rename"] = sorted(p.name for p in run.iterdir())
  try:
    (run / "model.json").rename(run / "renamed.json")
  except FileExistsError as e:
    found["rename_onto_existing"] = f"{type(e).__name__}: {e}"
  (run / "model.json").replace(run / "renamed.json")
  found["after_replace"] = (run / "renamed.json").read_text()
  (run / "renamed.json").unlink()
  (run / "left.txt").write_text("x")
  run.rmtree()
  found["exists_after_rmtree"] = run.exists()
  return found


@check
def epath_recursive_glob(root: epath.Path, out: pathlib.Path) -> list[str]:
  (root / "deep" / "a" / "b.txt").write_text("b")
  return sorted(p.name for p in root.glob("deep/**/*.txt"))


@check
def epath_append(root: epath.Path, out: pathlib.Path) -> dict[str, Any]:
  """Appends twice, as MetricWriter does to metrics.jsonl; and looks in while the file is open."""
  path, seen_while_open = root / "metrics.jsonl", []
  for row in ("1\n", "2\n"):
    with path.open("a") as f:
      f.write(row)
      f.flush()
      seen_while_open.append(path.read_text() if path.exists() else None)
  return {"content": path.read_text(), "seen_while_open": seen_while_open}


@check
def gcsfs_compose_append(root: epath.Path, out: pathlib.Path) -> str:
  """An append that GCS can do: upload the new rows, then compose [old, new] into the old name."""
  import gcsfs

  fs, path = gcsfs.GCSFileSystem(), str(root / "composed.jsonl")
  fs.pipe(path, b"1\n")
  for row in (b"2\n", b"3\n"):
    fs.pipe(path + ".part", row)
    fs.merge(path, [path, path + ".part"])
    fs.rm(path + ".part")
  return fs.cat(path).decode()


@check
def builtin_open(root: epath.Path, out: pathlib.Path) -> str:
  (root / "plain.txt").write_text("x")
  with open(str(root / "plain.txt")) as f:
    return f.read()


def _orbax(directory: epath.Path, out: pathlib.Path, async_save: bool) -> dict[str, Any]:
  """Saves steps 1, 2, 3 with max_to_keep=2, then restores step 3 in a new manager."""
  import jax
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=async_save)
  with ocp.CheckpointManager(directory, options=options) as manager:
    for step in (1, 2, 3):
      manager.save(step, args=ocp.args.StandardSave(jax.tree.map(
          jax.numpy.asarray, checkpoint_state(step))))
    manager.wait_until_finished()
  with ocp.CheckpointManager(directory) as manager:
    steps = list(manager.all_steps())
    restored = manager.restore(3, args=ocp.args.StandardRestore(checkpoint_state(0)))
  _save_flat(out / f"{directory.name}.npz", restored)
  return {"steps": steps, "step_dirs": sorted(p.name for p in directory.iterdir())}


@check
def orbax_async(root: epath.Path, out: pathlib.Path) -> dict[str, Any]:
  return _orbax(root, out, async_save=True)


@check
def orbax_sync(root: epath.Path, out: pathlib.Path) -> dict[str, Any]:
  return _orbax(root, out, async_save=False)


@check
def distil_jax_checkpointer(root: epath.Path, out: pathlib.Path) -> dict[str, Any]:
  """The program's Checkpointer: Composite of state and JSON data state, metrics, keep_last."""
  import jax

  from distil_jax.checkpoint import Checkpointer

  with Checkpointer(root / "run2", save_every_steps=1, keep_last=1, keep_best=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, jax.tree.map(jax.numpy.asarray, checkpoint_state(step)),
                {"position": step * 10})
  with Checkpointer(root / "run2", save_every_steps=1, keep_last=1) as ckpt:
    state, data_state = ckpt.restore(checkpoint_state(0))
    steps = ckpt.latest_step()
  _save_flat(out / "distil_jax_checkpointer.npz", state)
  return {"latest_step": steps, "data_state": data_state}


@check
def tensorboardx(root: epath.Path, out: pathlib.Path) -> list[str]:
  """SummaryWriter("gs://..."): tensorboardX's own GCS writer (google-cloud-storage)."""
  from tensorboardX import SummaryWriter

  writer = SummaryWriter(str(root / "tensorboard"))
  writer.add_scalar("train/loss", 2.5, 1)
  writer.flush()
  writer.add_scalar("train/loss", 1.25, 2)
  writer.close()
  return [p.name for p in (root / "tensorboard").iterdir()]


@check
def text_source(root: epath.Path, out: pathlib.Path) -> list[str]:
  """The program's "text:gs://.../*.txt" source: glob, stat, its units' lines read from the
  bucket."""
  from distil_jax.data import sources

  (root / "data" / "a.txt").write_text("first doc\n\nsecond doc\n")
  (root / "data" / "b.txt").write_text("third doc\n")
  (root / "data" / "c.json").write_text("not text")
  plan = sources.plan(0, f"text:{root}/data/*.txt", None)
  return sorted(text for unit in plan.units for text in sources.read(unit))


def main(bucket: str, out: pathlib.Path) -> None:
  report = {}
  for name, fn in CHECKS.items():
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      try:
        result = {"value": fn(epath.Path(bucket) / name, out)}
      except Exception as e:  # The error is the finding.
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
    report[name] = {"seconds": round(time.perf_counter() - start, 3), **result,
                    "warnings": sorted({str(w.message)[:200] for w in caught
                                        if not issubclass(w.category, ResourceWarning)})}
    print(name, json.dumps(report[name]), flush=True)
  (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main(sys.argv[1], pathlib.Path(sys.argv[2]))
