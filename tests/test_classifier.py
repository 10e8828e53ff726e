"""The sequence classifier against transformers' BertForSequenceClassification and
DistilBertForSequenceClassification: logits, loading from any checkpoint, export."""

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import linen as nn

from distil_jax import hf, models, sharding, student
from distil_jax.testing import save_random_bert

PAIRS = [("The quick brown fox jumps over the lazy dog.", "A fox jumps."),
         ("Paris is the capital of France.", "Is it?"),
         ("Photosynthesis converts light.", "Plants convert light energy into chemical energy.")]
LABELS = ("entailment", "neutral", "contradiction")


@pytest.fixture(scope="module", params=["BertForSequenceClassification",
                                        "DistilBertForSequenceClassification"])
def classifier_dir(request, tmp_path_factory):
  """A random 3-label sequence classifier (pooler and heads drawn large) saved by transformers."""
  return save_random_bert(tmp_path_factory.mktemp(request.param), architecture=request.param,
                          num_labels=3)


def _inputs(directory) -> dict[str, np.ndarray]:
  """PAIRS tokenised by transformers' tokenizer, padded; with token types 0/1."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  first, second = zip(*PAIRS, strict=True)
  inputs = dict(tokenizer(list(first), list(second), padding=True, return_tensors="np",
                          return_token_type_ids=True))
  assert (inputs["attention_mask"] == 0).any() and (inputs["token_type_ids"] == 1).any()
  return inputs


def _logits(config, params, inputs) -> np.ndarray:
  num_labels = params["head"]["classifier"]["bias"].shape[0]
  return np.asarray(models.Classifier(config, num_labels).apply(
      {"params": params}, inputs["input_ids"], inputs["attention_mask"],
      inputs["token_type_ids"]))


def _hf_logits(model, config, inputs) -> np.ndarray:
  names = ["input_ids", "attention_mask"] + ([] if config.is_distilbert else ["token_type_ids"])
  with torch.no_grad():
    return model.eval()(**{k: torch.tensor(inputs[k]) for k in names}).logits.numpy()


def test_logits_match_transformers(classifier_dir):
  config, params = hf.load_bert(classifier_dir, num_labels=3)
  inputs = _inputs(classifier_dir)
  expected = _hf_logits(transformers.AutoModelForSequenceClassification.from_pretrained(
      classifier_dir), config, inputs)
  ours = _logits(config, params, inputs)
  assert ours.dtype == np.float32 and ours.shape == (3, 3)
  assert np.abs(expected).max() > 1.0  # The heads matter.
  assert np.abs(ours - expected).max() < 1e-4


def test_export_loads_in_transformers_identically_and_runs_in_a_pipeline(classifier_dir,
                                                                         tmp_path):
  config, params = hf.load_bert(classifier_dir, num_labels=3)
  out = hf.export_hf(config, params, tmp_path / "out", tokenizer_dir=classifier_dir,
                     label_names=LABELS)
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()), info
  expected = "DistilBert" if config.is_distilbert else "Bert"
  assert type(model).__name__ == f"{expected}ForSequenceClassification"
  assert model.config.id2label == dict(enumerate(LABELS))
  assert model.config.problem_type == "single_label_classification"
  inputs = _inputs(out)
  ours = _logits(config, params, inputs)
  assert np.abs(ours - _hf_logits(model, config, inputs)).max() < 1e-4
  _, reloaded = hf.load_bert(out, num_labels=3)
  jax.tree.map(np.testing.assert_array_equal, reloaded, jax.tree.map(np.asarray, params))

  classify = transformers.pipeline("text-classification", model=str(out), device="cpu")
  first, second = PAIRS[0]
  top = classify({"text": first, "text_pair": second})
  assert top["label"] == LABELS[ours[0].argmax()]


def test_mlm_checkpoints_get_new_seeded_heads(bert_dir, tmp_path, caplog):
  mlm_config, mlm_params = hf.load_bert(bert_dir)
  with caplog.at_level("WARNING"):
    config, params = hf.load_bert(bert_dir, num_labels=2, seed=1)
  warnings = [r.getMessage() for r in caplog.records if "newly initialised" in r.getMessage()]
  assert len(warnings) == 1 and "no classifier or pooler weights" in warnings[0]
  assert "\n" not in warnings[0]
  assert config == mlm_config and set(params["head"]) == {"pooler", "classifier"}
  assert "mlm_head" not in params["encoder"]
  encoder = {k: v for k, v in mlm_params.items() if k != "mlm_head"}
  jax.tree.map(np.testing.assert_array_equal, params["encoder"], encoder)
  # The same heads as a classifier started from parameters trained here (a workdir).
  from_params = models.classifier_params(config, mlm_params, 2, seed=1)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, from_params), params)
  other_seed = hf.load_bert(bert_dir, num_labels=2, seed=2)[1]
  assert not np.array_equal(other_seed["head"]["classifier"]["kernel"],
                            params["head"]["classifier"]["kernel"])

  student_config, student_params = student.student_from_teacher(mlm_config, mlm_params, [0, 3])
  out = hf.export_distilbert(student_config, student_params, tmp_path / "student")
  caplog.clear()
  with caplog.at_level("WARNING"):
    _, params = hf.load_bert(out, num_labels=2)
  assert "no classifier or pre_classifier weights" in caplog.text
  assert set(params["head"]) == {"pre_classifier", "classifier"}
  jax.tree.map(np.testing.assert_array_equal, params["encoder"],
               jax.tree.map(np.asarray, {k: v for k, v in student_params.items()
                                         if k != "mlm_head"}))


def test_pretrained_pooler_comes_from_the_checkpoint(tmp_path, caplog):
  """bert-base-uncased is a BertForPreTraining: it ships bert.pooler.dense.*."""
  directory = save_random_bert(tmp_path / "pretraining", architecture="BertForPreTraining")
  state = safetensors.numpy.load_file(directory / "model.safetensors")
  with caplog.at_level("WARNING"):
    _, params = hf.load_bert(directory, num_labels=2)
  assert "no classifier weights" in caplog.text
  pooler = params["head"]["pooler"]
  np.testing.assert_array_equal(pooler["kernel"], state["bert.pooler.dense.weight"].T)
  np.testing.assert_array_equal(pooler["bias"], state["bert.pooler.dense.bias"])
  assert np.abs(pooler["bias"]).max() > 0.1  # Not BERT's zero init.


def test_regression_exports_as_a_regression(bert_dir, tmp_path):
  config, params = hf.load_bert(bert_dir, num_labels=1)
  out = hf.export_hf(config, params, tmp_path / "stsb", tokenizer_dir=bert_dir)
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["problem_type"] == "regression" and hf_config["id2label"] == {"0": "LABEL_0"}
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()) and model.num_labels == 1
  inputs = _inputs(out)
  score = transformers.pipeline("text-classification", model=str(out), device="cpu")(
      {"text": PAIRS[0][0], "text_pair": PAIRS[0][1]})["score"]
  ours = _logits(config, params, inputs)[0, 0]
  assert abs(score - ours) < 1e-5  # A regression's score is its logit.


def test_classifier_for_another_label_count_is_refused(classifier_dir, tmp_path):
  with pytest.raises(ValueError) as error:
    hf.load_bert(classifier_dir, num_labels=2)
  assert "classifier.bias has shape (3,), 2 labels need (2,)" in str(error.value)
  assert "\n" not in str(error.value)
  config, params = hf.load_bert(classifier_dir, num_labels=3)
  with pytest.raises(ValueError, match="2 label names .* for a classifier with 3 labels"):
    hf.export_hf(config, params, tmp_path / "out", label_names=("no", "yes"))
  assert not (tmp_path / "out").exists()


def test_encoder_params_of_another_shape_are_refused(bert_dir):
  config, params = hf.load_bert(bert_dir)
  params = {k: v for k, v in params.items() if k != "layer_3"}
  with pytest.raises(ValueError, match="do not have the shapes of the model config"):
    models.classifier_params(config, params, 2)


@pytest.mark.parametrize("type_vocab_size", [2, 0])
def test_every_classifier_parameter_has_logical_axes_and_shards(type_vocab_size):
  config = models.ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                              intermediate_size=32, type_vocab_size=type_vocab_size)
  abstract = models.abstract_params(config, num_labels=3)
  boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim
             for x in boxed)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  shardings = sharding.param_shardings(abstract, mesh)
  head = shardings["head"]
  dense = head["pre_classifier" if type_vocab_size == 0 else "pooler"]
  assert dense["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert head["classifier"]["kernel"].spec == jax.sharding.PartitionSpec("tensor", None)
