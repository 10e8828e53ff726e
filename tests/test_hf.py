"""Loading HuggingFace checkpoints and exporting students, checked by transformers in PyTorch."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers

from distil_jax import errors, hf, models, resources, student
from distil_jax.testing import save_random_bert

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Paris is the capital and most populous city of France.",
             "Photosynthesis converts light energy into chemical energy."]


def _encode(tokenizer_dir, sentences):
  tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
  tokenizer.no_truncation()
  tokenizer.enable_padding(pad_id=0)
  encodings = tokenizer.encode_batch(sentences)
  return (np.array([e.ids for e in encodings]), np.array([e.attention_mask for e in encodings]))


def _logits(config, params, ids, mask):
  return np.asarray(jax.jit(models.Encoder(config).apply)({"params": params}, ids, mask).logits)


def test_real_minilm_matches_hf_bert_model():
  directory = resources.minilm_dir()
  config, params = hf.load_bert(directory)
  assert (config.num_layers, config.hidden_size, config.vocab_size) == (6, 384, 30522)
  ids, mask = _encode(directory, SENTENCES)
  assert (mask == 0).any()  # The batch is padded.
  reference = transformers.BertModel.from_pretrained(directory).eval()
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  hidden = jax.jit(models.Encoder(config).apply)({"params": params}, ids, mask).hidden_states
  error = np.abs(np.asarray(hidden[-1]) - expected.last_hidden_state.numpy()).max()
  assert error < 1e-4


def test_encoder_only_checkpoint_says_the_mlm_head_is_new(caplog):
  with caplog.at_level("WARNING"):
    _, params = hf.load_bert(resources.minilm_dir())
  warnings = [r.getMessage() for r in caplog.records if "MLM head" in r.getMessage()]
  assert len(warnings) == 1 and "\n" not in warnings[0] and "newly initialised" in warnings[0]
  np.testing.assert_array_equal(params["mlm_head"]["norm"]["scale"], 1.0)


def test_exported_student_runs_in_transformers(bert_dir, tmp_path):
  config, params = hf.load_bert(bert_dir)
  student_config, student_params = student.student_from_teacher(config, params, [0, 3])
  out = hf.export_distilbert(student_config, student_params, tmp_path / "hf",
                             tokenizer_dir=bert_dir)
  model, info = transformers.DistilBertForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info
  ids, mask = _encode(out, SENTENCES)
  with torch.no_grad():
    expected = model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  ours = _logits(student_config, student_params, ids, mask)
  assert np.abs(ours - expected.numpy()).max() < 1e-4

  fill_mask = transformers.pipeline("fill-mask", model=str(out), device="cpu")
  text = "Paris is the [MASK] of France."
  top = fill_mask(text, top_k=1)[0]["token"]
  ids, mask = _encode(out, [text])
  position = list(ids[0]).index(103)  # [MASK]
  assert top == _logits(student_config, student_params, ids, mask)[0, position].argmax()


def test_exported_bert_and_distilbert_load_back_identically(bert_dir, tmp_path):
  config, params = hf.load_bert(bert_dir)
  student_config, student_params = student.student_from_teacher(config, params, [1, 2])
  for cfg, p, name in [(config, params, "bert"), (student_config, student_params, "distil")]:
    loaded_config, loaded = hf.load_bert(hf.export_hf(cfg, p, tmp_path / name))
    assert loaded_config == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, p))


def test_legacy_checkpoint_names_and_pytorch_bin(bert_dir, tmp_path):
  """Old BERT checkpoints: LayerNorm gamma/beta, no `bert.` prefix, pytorch_model.bin."""
  state = safetensors.numpy.load_file(bert_dir / "model.safetensors")
  legacy = {k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
            .replace("LayerNorm.bias", "LayerNorm.beta"): torch.tensor(v) for k, v in state.items()}
  (tmp_path / "legacy").mkdir()
  torch.save(legacy, tmp_path / "legacy" / "pytorch_model.bin")
  shutil.copy(bert_dir / "config.json", tmp_path / "legacy")
  _, expected = hf.load_bert(bert_dir)
  _, params = hf.load_bert(tmp_path / "legacy")
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_sinusoidal_distilbert_loads_its_stored_position_table(bert_dir, tmp_path):
  config, params = hf.load_bert(bert_dir)
  student_config, student_params = student.student_from_teacher(config, params, [0])
  out = hf.export_distilbert(student_config, student_params, tmp_path / "sin")
  hf_config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**hf_config, "sinusoidal_pos_embds": True}))
  _, loaded = hf.load_bert(out)
  np.testing.assert_array_equal(loaded["embeddings"]["position_embeddings"]["embedding"],
                                student_params["embeddings"]["position_embeddings"]["embedding"])


@pytest.mark.parametrize("name", ["bert-base-uncased", "distilbert-base-uncased"])
def test_parameter_counts_match_transformers(name):
  config = models.PRESETS[name]
  with torch.device("meta"):
    if config.is_distilbert:
      reference = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig())
    else:
      reference = transformers.BertForMaskedLM(transformers.BertConfig())
  assert models.count_params(config) == reference.num_parameters()


def _bad_checkpoint(bert_dir, tmp_path, **config_changes):
  out = tmp_path / "bad"
  shutil.copytree(bert_dir, out)
  hf_config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**hf_config, **config_changes}))
  return out


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not a BERT or DistilBERT checkpoint"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key' is not"),
    ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ({"num_attention_heads": 5}, "hidden size 32 is not divisible by the number of attention"),
    ({"intermediate_size": 65},
     "intermediate.dense.bias has shape (64,), config.json implies (65,)"),
])
def test_bad_checkpoints_are_refused_with_a_clear_error(bert_dir, tmp_path, changes, message):
  with pytest.raises(ValueError) as error:
    hf.load_bert(_bad_checkpoint(bert_dir, tmp_path, **changes))
  assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_and_corrupt_files_are_refused(bert_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
    hf.load_bert(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    hf.load_bert(tmp_path / "empty")
  out = _bad_checkpoint(bert_dir, tmp_path)
  (out / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
    hf.load_bert(out)
  (out / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="is not a readable safetensors file"):
    hf.load_bert(out)
  (out / "config.json").write_text("{")
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    hf.load_bert(out)


def test_unreachable_hub_name_is_refused(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match="neither a local directory nor a reachable"):
    hf.load_bert("no-such-user/no-such-bert")


def test_export_refuses_a_teacher_as_distilbert(bert_dir, tmp_path):
  config, params = hf.load_bert(bert_dir)
  with pytest.raises(ValueError, match="use export_hf to write a BertForMaskedLM"):
    hf.export_distilbert(config, params, tmp_path / "out")


@pytest.mark.parametrize("name", ["bert.encoder.layer.2.output.dense.weight",
                                  "cls.predictions.transform.dense.bias"])
def test_checkpoint_missing_a_weight_is_refused(bert_dir, tmp_path, name):
  """Only a checkpoint without any MLM-head weight is an encoder checkpoint (fresh head)."""
  out = _bad_checkpoint(bert_dir, tmp_path)
  state = safetensors.numpy.load_file(out / "model.safetensors")
  del state[name]
  safetensors.numpy.save_file(state, out / "model.safetensors")
  with pytest.raises(errors.UserError, match=rf"lacks 1 weights \({name}\): a partial checkpoint"):
    hf.load_bert(out)


def test_a_pickle_that_runs_code_is_refused(bert_dir, tmp_path):
  """A legacy pytorch_model.bin is read with weights_only=True: code in it never runs."""
  import pickle

  out = _bad_checkpoint(bert_dir, tmp_path)
  (out / "model.safetensors").unlink()
  marker = tmp_path / "ran"

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  with open(out / "pytorch_model.bin", "wb") as f:
    pickle.dump({"bert.embeddings.word_embeddings.weight": Payload()}, f)
  with pytest.raises(errors.UserError, match="was refused: it is not a plain tensor checkpoint"):
    hf.load_bert(out)
  assert not marker.exists()


def test_random_bert_helper_builds_what_it_says(tmp_path):
  directory = save_random_bert(tmp_path / "b", with_tokenizer=False, num_hidden_layers=2)
  assert json.loads((directory / "config.json").read_text())["num_hidden_layers"] == 2


def test_count_params_table_shows_the_papers_sizes():
  from distil_jax import count_params
  text = count_params.table(["bert-base-uncased"])
  assert "109,514,298" in text and "66,985,530" in text and "-38.8%" in text


def test_has_mlm_head_tells_encoder_checkpoints_apart(bert_dir):
  assert hf.has_mlm_head(bert_dir)
  assert not hf.has_mlm_head(resources.minilm_dir())
