"""`distil_jax.finetune`: seeds stacked in one program equal separate runs; a run exports to a
HuggingFace classifier that transformers runs."""

import json

import numpy as np
import pytest
import safetensors.numpy
import transformers
from ml_collections import config_dict

from distil_jax import errors, export, finetune
from experiments import glue as glue_experiment

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


def test_stacked_seeds_equal_separate_runs_and_export(tmp_path, bert_dir, glue_dir):
  stacked = finetune.finetune(_config(bert_dir, glue_dir, (0, 1)), tmp_path / "stacked")
  alone = finetune.finetune(_config(bert_dir, glue_dir, (1,)), tmp_path / "alone")
  assert set(stacked["runs"]) == {"seed0_lr0.001", "seed1_lr0.001", "seed0_lr0.0003",
                                  "seed1_lr0.0003"}
  losses = lambda d, name: [json.loads(line)["loss"] for line in (
      d / name / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
  for name in ("seed1_lr0.001", "seed1_lr0.0003"):
    assert stacked["runs"][name] == alone["runs"][name]
    np.testing.assert_allclose(losses(tmp_path / "stacked", name),
                               losses(tmp_path / "alone", name), rtol=1e-5)
  # The seeds differ: head initialisation, dropout, data order.
  assert losses(tmp_path / "stacked", "seed0_lr0.001") != losses(tmp_path / "stacked",
                                                                  "seed1_lr0.001")
  summary = json.loads((tmp_path / "stacked" / "results.json").read_text())["summary"]
  accuracies = [m["accuracy"] for m in stacked["runs"].values()]
  assert summary["accuracy"]["median"] == pytest.approx(np.median(accuracies))
  assert summary["accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))

  out = export.export_checkpoint(tmp_path / "stacked", tmp_path / "hf", seed=1)
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
    export.export_checkpoint(tmp_path / "stacked", tmp_path / "none", seed=7)
