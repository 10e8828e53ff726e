"""`distil_jax.evaluate` on a model whose predictions are known by hand."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from distil_jax import errors, evaluate, hf, models, resources
from tests import runs

P_THE, P_CAT = 0.5, 0.2


def _constant_model(directory, p_the: float, p_cat: float):
  """A BERT whose every weight is 0 but the MLM bias: at every position it predicts the same
  distribution, p("the") = `p_the`, p("cat") = `p_cat`, the rest spread evenly."""
  config = models.ModelConfig(vocab_size=30522, hidden_size=16, num_layers=2, num_heads=2,
                              intermediate_size=32, max_positions=128)
  params = jax.tree.map(np.zeros_like, models.init_params(config))
  vocab = (resources.minilm_dir() / "vocab.txt").read_text().splitlines()
  the, cat = vocab.index("the"), vocab.index("cat")
  probabilities = np.full(config.vocab_size, (1 - p_the - p_cat) / (config.vocab_size - 2))
  probabilities[[the, cat]] = p_the, p_cat
  params["mlm_head"]["bias"] = np.log(probabilities).astype(np.float32)
  return hf.export_hf(config, params, directory, resources.minilm_dir())


@pytest.fixture(scope="module")
def constant_model(tmp_path_factory):
  return _constant_model(tmp_path_factory.mktemp("constant"), P_THE, P_CAT)


@pytest.mark.parametrize("word, accuracy, perplexity", [
    ("the", 1.0, 1 / P_THE), ("cat", 0.0, 1 / P_CAT)])
def test_accuracy_and_perplexity_of_a_constant_model(constant_model, tmp_path, word, accuracy,
                                                     perplexity):
  (tmp_path / "text.txt").write_text("\n".join([" ".join([word] * 60)] * 40) + "\n")
  config = evaluate.data_config(str(tmp_path / "*.txt"), data_dir=str(tmp_path / "data"))
  metrics = evaluate.evaluate_models(str(constant_model), str(constant_model), config)
  assert metrics["student_accuracy"] == accuracy
  np.testing.assert_allclose(metrics["student_perplexity"], perplexity, rtol=1e-5)
  # 40 documents of 60 words, packed into sequences of 126 tokens between [CLS] and [SEP].
  assert metrics["positions"] == pytest.approx(0.15 * 40 * 61, abs=20)
  assert metrics["agreement"] == 1.0 and abs(metrics["kl_t1"]) < 1e-6
  if accuracy:
    assert metrics["accuracy_ratio_pct"] == 100.0


def test_teacher_and_student_metrics_each_come_from_their_own_model(constant_model, tmp_path):
  """A teacher that predicts "cat" (p 0.4, "the" 0.1) beside the student that predicts "the":
  every teacher figure is the teacher's own, none the student's."""
  teacher = _constant_model(tmp_path / "teacher", p_the=0.1, p_cat=0.4)
  (tmp_path / "text.txt").write_text("\n".join([" ".join(["the"] * 60)] * 40) + "\n")
  config = evaluate.data_config(str(tmp_path / "*.txt"), data_dir=str(tmp_path / "data"))
  metrics = evaluate.evaluate_models(str(constant_model), str(teacher), config)
  assert metrics["student_accuracy"] == 1.0 and metrics["teacher_accuracy"] == 0.0
  np.testing.assert_allclose([metrics["student_perplexity"], metrics["teacher_perplexity"]],
                             [1 / P_THE, 1 / 0.1], rtol=1e-5)
  assert metrics["agreement"] == 0.0
  # KL(teacher || student) of the two fixed distributions, at every masked position.
  def distribution(p_the, p_cat):
    rest = np.full(30520, (1 - p_the - p_cat) / 30520)
    return np.concatenate([[p_the, p_cat], rest])
  teacher_p, student_p = distribution(0.1, 0.4), distribution(P_THE, P_CAT)
  np.testing.assert_allclose(metrics["kl_t1"],
                             np.sum(teacher_p * np.log(teacher_p / student_p)), rtol=1e-4)


@pytest.mark.slow
def test_the_command_on_a_workdir_and_its_errors(constant_model, tmp_path):
  (tmp_path / "run" / "export").mkdir(parents=True)
  for path in constant_model.iterdir():
    (tmp_path / "run" / "export" / path.name).write_bytes(path.read_bytes())
  (tmp_path / "text.txt").write_text(" ".join(["the"] * 100) + "\n")
  command = [sys.executable, "-m", "distil_jax.evaluate", f"--model={tmp_path / 'run'}",
             f"--text={tmp_path / 'text.txt'}", f"--data_dir={tmp_path / 'data'}",
             f"--json_out={tmp_path / 'result.json'}"]
  subprocess.run(command, cwd=runs.ROOT, check=True, capture_output=True, timeout=300)
  result = json.loads((tmp_path / "result.json").read_text())
  assert result["student_accuracy"] == 1.0 and result["text"] == str(tmp_path / "text.txt")
  with pytest.raises(errors.UserError, match="has no MLM head"):
    evaluate.load_mlm(str(resources.minilm_dir()))
  (tmp_path / "run" / "model.json").write_text("{}")
  (tmp_path / "run" / "export" / "config.json").unlink()
  with pytest.raises(errors.UserError, match="is a workdir without an export"):
    evaluate.load_mlm(str(tmp_path / "run"))
