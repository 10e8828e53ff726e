"""`distil_jax.finetune`: seeds stacked in one program equal separate runs; a run exports to a
HuggingFace classifier that transformers runs; the loop's duties (lock heartbeat, failed saves,
non-finite steps, MFU) hold for fine-tuning as for distillation."""

import json
import threading
import time

import jax
import numpy as np
import pytest
import safetensors.numpy
import transformers
from ml_collections import config_dict

from distil_jax import checkpoint, errors, export, finetune, workdir
from experiments import glue as glue_experiment
from tests import runs

pytestmark = pytest.mark.slow  # Whole fine-tunings (and one in a subprocess).

WORDS = {1: ["good", "great", "fine", "lovely"], 0: ["bad", "dull", "awful", "poor"]}


def _write_sst2(directory, rows: int, seed: int) -> None:
  """An SST-2-shaped task: the label is whether the sentence's words are good or bad."""
  rng = np.random.default_rng(seed)
  lines = ["sentence\tlabel"]
  for _ in range(rows):
    label = int(rng.integers(2))
    words = rng.choice(WORDS[label], int(rng.integers(3, 9)))
    lines.append(f"a {' '.join(words)} film\t{label}")
  (directory / "dev.tsv" if seed else directory / "train.tsv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("glue")
  (directory / "SST-2").mkdir()
  _write_sst2(directory / "SST-2", 64, seed=0)
  _write_sst2(directory / "SST-2", 20, seed=1)
  return directory


def _config(bert_dir, glue_dir, seeds) -> config_dict.ConfigDict:
  config = glue_experiment.get_config()
  config.update(init=str(bert_dir), data_dir=str(glue_dir), seeds=seeds, lr_peaks=(1e-3, 3e-4),
                batch_size=8, epochs=1.0, log_every_steps=2, eval_every_steps=4,
                checkpoint_every_steps=4)
  return config


def _rows(directory, name: str) -> list[dict]:
  return [json.loads(line) for line in (directory / name / "metrics.jsonl").read_text()
          .splitlines() if '"train"' in line]


class _LockWatch:
  """Reads WORKDIR/lock.json every 20 ms on a thread: the oldest heartbeat age it saw."""

  def __init__(self, path):
    self.path, self.oldest, self.reads = path, 0.0, 0
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch)
    self._thread.start()

  def _watch(self):
    while not self._done.wait(0.02):
      try:
        holder = json.loads(self.path.read_text())
      except FileNotFoundError:
        continue
      self.reads += 1
      self.oldest = max(self.oldest, time.time() - holder["heartbeat"])

  def stop(self):
    self._done.set()
    self._thread.join()


STALE_S = 5.0  # Heartbeats every 1.25 s: a loaded 2-core machine still keeps them well inside.


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, bert_dir, glue_dir):
  """Two seeds stacked, run with a stale limit of STALE_S seconds and its lock watched."""
  directory = tmp_path_factory.mktemp("stacked")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(workdir, "STALE_AFTER_S", STALE_S)
    watch = _LockWatch(directory / "lock.json")
    start = time.time()
    try:
      results = finetune.finetune(_config(bert_dir, glue_dir, (0, 1)), directory)
    finally:
      watch.stop()
  return directory, results, watch, time.time() - start


def test_stacked_seeds_equal_separate_runs_and_export(tmp_path, stacked, bert_dir, glue_dir):
  directory, results, _, _ = stacked
  alone = finetune.finetune(_config(bert_dir, glue_dir, (1,)), tmp_path / "alone")
  assert set(results["runs"]) == {"seed0_lr0.001", "seed1_lr0.001", "seed0_lr0.0003",
                                  "seed1_lr0.0003"}
  losses = lambda d, name: [row["loss"] for row in _rows(d, name)]
  for name in ("seed1_lr0.001", "seed1_lr0.0003"):
    assert results["runs"][name] == alone["runs"][name]
    np.testing.assert_allclose(losses(directory, name), losses(tmp_path / "alone", name),
                               rtol=1e-5)
  # The seeds differ: head initialisation, dropout, data order.
  assert losses(directory, "seed0_lr0.001") != losses(directory, "seed1_lr0.001")
  summary = json.loads((directory / "results.json").read_text())["summary"]
  accuracies = [m["accuracy"] for m in results["runs"].values()]
  assert summary["accuracy"]["median"] == pytest.approx(np.median(accuracies))
  assert summary["accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))

  out = export.export_checkpoint(directory, tmp_path / "hf", seed=1)
  reference = export.export_checkpoint(tmp_path / "alone", tmp_path / "hf_alone", seed=1)
  ours, theirs = (safetensors.numpy.load_file(d / "model.safetensors") for d in (out, reference))
  for key, value in theirs.items():  # The first run of a seed: its first learning rate.
    np.testing.assert_allclose(ours[key], value, atol=1e-6, err_msg=key)
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()) and model.config.id2label == {0: "negative", 1: "positive"}
  pipeline = transformers.pipeline("text-classification", model=str(out), device="cpu")
  assert pipeline("a good film")[0]["label"] in ("negative", "positive")
  with pytest.raises(errors.UserError, match="has no run of seed 7"):
    export.export_checkpoint(directory, tmp_path / "none", seed=7)


def test_finetune_keeps_its_lock_fresh_past_the_stale_limit(stacked):
  directory, _, watch, seconds = stacked
  assert seconds > 2 * STALE_S and watch.reads > 50  # The run outlived the limit twice over.
  assert watch.oldest < STALE_S  # Never stale: no other run could have taken it over.
  assert not (directory / "lock.json").exists()


def test_finetune_logs_a_nonzero_mfu_and_its_learning_rate(stacked):
  directory = stacked[0]
  rows = _rows(directory, "seed0_lr0.0003")
  assert [r["step"] for r in rows] == [2, 4, 6, 8]
  assert all(0 < r["mfu"] < 1 for r in rows[1:])  # The first log has no interval yet.
  # Warmup of 1 step (10% of 8), then a linear decay to 0 at step 8.
  np.testing.assert_allclose([r["lr"] for r in rows], [3e-4 * (1 - k / 7) for k in (0, 2, 4, 6)],
                             rtol=1e-5)


def test_finetune_stops_or_skips_nonfinite_steps(tmp_path, bert_dir, glue_dir):
  config = _config(bert_dir, glue_dir, (0,))
  config.update(lr_peaks=(1e6,), warmup_frac=0.0, log_every_steps=1)
  with pytest.raises(errors.Diverged, match=r"^seed0_lr1e\+06: step \d+ is not finite"):
    finetune.finetune(config, tmp_path / "stop")
  with checkpoint.Checkpointer(tmp_path / "stop", save_every_steps=1, keep_last=1) as ckpt:
    (stopped,) = ckpt.all_steps()
    state = ckpt.restore_on_one_device(stopped)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))

  config.update(on_nonfinite="skip", max_skipped_steps=2)
  with pytest.raises(errors.Diverged, match=r"3 steps skipped, more than max_skipped_steps=2"):
    finetune.finetune(config, tmp_path / "skip")
  skipped = [r["skipped_steps"] for r in _rows(tmp_path / "skip", "seed0_lr1e+06")]
  assert skipped[-1] == 3 and skipped == sorted(skipped)


def test_finetune_stops_in_one_line_when_an_async_save_fails(tmp_path, bert_dir, glue_dir):
  process = runs.launch("finetune", "--config=experiments/glue.py", f"--workdir={tmp_path}",
                        f"--config.init={bert_dir}", f"--config.data_dir={glue_dir}",
                        "--config.seeds=(0,)", "--config.batch_size=8", "--config.epochs=50",
                        "--config.checkpoint_every_steps=2", "--config.eval_every_steps=1000")
  deadline = time.time() + 300
  while not (tmp_path / "checkpoints" / "4").exists():
    assert process.poll() is None and time.time() < deadline, process.communicate()[0][-2000:]
    time.sleep(0.05)
  (tmp_path / "checkpoints").rename(tmp_path / "moved")
  (tmp_path / "checkpoints").write_text("not a directory")  # The disk "fails".
  failed = time.time()
  (output,) = runs.finish(process, returncode=1)
  assert time.time() - failed < 60
  assert "Traceback" not in output and output.strip().splitlines()[-1].startswith(
      f"FATAL cannot write checkpoints to {tmp_path}/checkpoints (")
  assert not (tmp_path / "lock.json").exists()
