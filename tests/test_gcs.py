"""gs:// workdirs and data against a local GCS emulator: what works, what fails, and how long.

tests/gcs_checks.py runs the operations in a subprocess with the emulator's environment; these
tests read its report, and read the bucket over plain HTTP to confirm what it claims.
"""

import json
import pathlib
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import safetensors.numpy
from gcs_checks import checkpoint_state
from tensorboardX.proto import event_pb2

from tests import runs

pytestmark = pytest.mark.slow  # A GCS emulator and runs on gs://.

TESTS = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def checks(gcs, tmp_path_factory):
  """The report of tests/gcs_checks.py, and the folder of the arrays it restored."""
  gcs.write("sentinel.txt", b"keep me")  # Outside every check's prefix.
  out = tmp_path_factory.mktemp("gcs_checks")
  env = {**gcs.env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(TESTS.parent)}
  subprocess.run([sys.executable, str(TESTS / "gcs_checks.py"), gcs.bucket, str(out)],
                 check=True, env=env, timeout=300)
  return json.loads((out / "report.json").read_text()), out


def test_emulator_lists_only_the_offset_range(gcs):
  # tensorstore deletes a key range by listing [startOffset, endOffset): unmended, everything.
  for name in ("offsets/1/a", "offsets/10/a", "offsets/2/a"):
    gcs.write(name, name.encode())
  base = f"http://127.0.0.1:{gcs.port}/storage/v1/b/{gcs.bucket[5:]}/o"
  query = "prefix=offsets/&startOffset=offsets/1/&endOffset=offsets/10"
  with urllib.request.urlopen(f"{base}?{query}", timeout=10) as response:
    assert [item["name"] for item in json.load(response)["items"]] == ["offsets/1/a"]
  with urllib.request.urlopen(f"{base}/offsets%2F2%2Fa?alt=media", timeout=10) as response:
    generation = response.headers["x-goog-generation"]
  with urllib.request.urlopen(f"{base}/offsets%2F2%2Fa", timeout=10) as response:
    assert generation == json.load(response)["generation"]


def test_emulator_moves_objects(gcs):
  gcs.write("moves/a", b"a")
  base = f"http://127.0.0.1:{gcs.port}/storage/v1/b/{gcs.bucket[5:]}/o"
  request = urllib.request.Request(f"{base}/moves%2Fa/moveTo/o/moves%2Fb", b"", method="POST")
  urllib.request.urlopen(request, timeout=10).close()
  assert gcs.names("moves/") == ["moves/b"] and gcs.read("moves/b") == b"a"
  with pytest.raises(urllib.error.HTTPError, match="404"):
    urllib.request.urlopen(request, timeout=10)


def test_no_operation_waits_for_a_timeout(checks):
  # A gcsfs bucket-type probe costs 60 s, a retried 501 35 s: both would show here.
  report, _ = checks
  assert {name: r["seconds"] for name, r in report.items() if r["seconds"] > 10} == {}


def test_epath_files(checks, gcs):
  value = checks[0]["epath_files"]["value"]
  assert value == {
      "dir_exists_after_mkdir": False,  # GCS has no directories: mkdir writes nothing.
      "read_text": '{"lr": 0.1}', "exists": True, "dir_exists": True, "is_dir": True,
      "glob": ["config.json", "model.json"], "iterdir": ["config.json", "model.json"],
      "length": 11, "after_rename": ["model.json", "renamed.json"],
      "rename_onto_existing": "FileExistsError: gs://distil-jax-test/epath_files/run/renamed.json "
                              "already exists. Cannot rename "
                              "gs://distil-jax-test/epath_files/run/model.json.",
      "after_replace": "{}", "exists_after_rmtree": False}
  assert gcs.names("epath_files/") == []


def test_recursive_glob_is_refused(checks):
  assert checks[0]["epath_recursive_glob"]["error"].startswith(
      "NotImplementedError: Recursive `**` pattern not supported")


def test_append_overwrites(checks, gcs):
  # gcsfs opens "a" as "w" with a warning, and uploads only on close: each append loses the past.
  result = checks[0]["epath_append"]
  assert result["value"] == {"content": "2\n", "seen_while_open": [None, "1\n"]}
  assert result["warnings"] == [
      "Append mode 'a' is not supported in GCS. Using overwrite mode instead."]
  assert gcs.read("epath_append/metrics.jsonl") == b"2\n"


def test_compose_appends(checks, gcs):
  assert checks[0]["gcsfs_compose_append"]["value"] == "1\n2\n3\n"
  assert gcs.names("gcsfs_compose_append/") == ["gcsfs_compose_append/composed.jsonl"]


def test_builtin_open_does_not_know_gs(checks):
  assert checks[0]["builtin_open"]["error"] == (
      "FileNotFoundError: [Errno 2] No such file or directory: "
      "'gs://distil-jax-test/builtin_open/plain.txt'")


def _assert_restored(out: pathlib.Path, check: str, step: int) -> None:
  restored, saved = np.load(out / f"{check}.npz"), checkpoint_state(step)
  for key, want in {**saved["params"], "step": saved["step"]}.items():
    assert restored[key].dtype == want.dtype and restored[key].tobytes() == want.tobytes(), key


@pytest.mark.parametrize("check", ["orbax_async", "orbax_sync"])
def test_orbax_keeps_two_steps_and_restores_bit_for_bit(checks, gcs, check):
  report, out = checks
  assert report[check]["value"] == {"steps": [2, 3], "step_dirs": ["2", "3"]}
  steps = {name.split("/")[1] for name in gcs.names(f"{check}/")}
  assert steps == {"2", "3"}
  _assert_restored(out, check, step=3)


def test_distil_jax_checkpointer(checks, gcs):
  report, out = checks
  assert report["distil_jax_checkpointer"]["value"] == {
      "latest_step": 2, "data_state": {"position": 20}}
  assert {name.split("/")[3] for name in gcs.names("distil_jax_checkpointer/run2/checkpoints/")
          } == {"2"}
  _assert_restored(out, "distil_jax_checkpointer", step=2)


def test_checkpoint_deletions_leave_other_objects(checks, gcs):
  del checks  # Its old steps are deleted by now.
  assert gcs.read("sentinel.txt") == b"keep me"
  assert gcs.read("gcsfs_compose_append/composed.jsonl") == b"1\n2\n3\n"


def _events(data: bytes) -> list[tuple[int, str, float]]:
  """(step, tag, value) of the scalars in a TFRecord file of TensorBoard events."""
  scalars, offset = [], 0
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    offset += 12 + length + 4
  return scalars


def test_tensorboardx_writes_events_to_gcs(checks, gcs):
  (name,) = checks[0]["tensorboardx"]["value"]
  assert name.startswith("events.out.tfevents.")
  data = gcs.read(f"tensorboardx/tensorboard/{name}")
  assert _events(data) == [(1, "train/loss", 2.5), (2, "train/loss", 1.25)]


def test_text_source_reads_gcs_files(checks):
  assert checks[0]["text_source"]["value"] == ["first doc", "second doc", "third doc"]


def test_a_run_on_gs_resumes_after_sigterm_and_exports(gcs, bert_dir, corpus, tmp_path):
  """Teacher, text and workdir all on gs:// (the token cache stays local): train, SIGTERM,
  resume, export, equal to the same run on local disks."""
  for path in bert_dir.iterdir():
    gcs.write(f"teacher/{path.name}", path.read_bytes())
  gcs.write("text/wiki.txt", corpus.read_bytes())
  flags = ["--config.total_steps=10", "--config.checkpoint_every_steps=2",
           "--config.eval_every_steps=5"]
  local = tmp_path / "local"
  runs.finish(runs.start("main", local, bert_dir, corpus, *flags))

  remote = (f"{gcs.bucket}/run", f"{gcs.bucket}/teacher", f"{gcs.bucket}/text/*.txt")
  start = lambda: runs.start("main", *remote, *flags, env=gcs.env, data_dir=tmp_path / "cache")
  process = start()
  deadline = time.time() + 300
  while not any(n.startswith("run/checkpoints/4/") for n in gcs.names("run/checkpoints/")):
    assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  (output,) = runs.finish(process)
  assert "Preempted: saved step" in output
  (output,) = runs.finish(start())
  assert "Resumed from step" in output and "Exported to gs://" in output

  names = gcs.names("run/")
  assert {"run/config.json", "run/model.json", "run/metrics.jsonl",
          "run/export/model.safetensors", "run/export/config.json",
          "run/export/tokenizer.json"} <= set(names)
  assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)
  assert "run/lock.json" not in names
  expected = runs.train_losses(local)
  losses = runs.train_losses(text=gcs.read("run/metrics.jsonl").decode())
  assert sorted(losses) == list(range(1, 11))
  np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=1e-6)
  weights = safetensors.numpy.load(gcs.read("run/export/model.safetensors"))
  for name, value in safetensors.numpy.load_file(local / "export" / "model.safetensors").items():
    np.testing.assert_allclose(weights[name], value, atol=1e-6, err_msg=name)
