"""HuggingFace <-> Flax: load BERT/DistilBERT checkpoints, export BERT/DistilBERT directories.

Masked-LM models (`models.Encoder`) and sequence classifiers (`models.Classifier`) both. One
name table maps our parameter paths to both HuggingFace layouts. Reading and writing use
safetensors and numpy only; torch is needed only to read a legacy `pytorch_model.bin`.
Directories may be local or gs:// (etils.epath).
"""

import functools
import json
import os
import pickle
from collections.abc import Sequence

import jax
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging
from etils import epath
from flax import linen as nn
from flax import traverse_util

from distil_jax import errors, models, storage

_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
# Our heads on the encoder (Encoder's and Classifier's), and the HuggingFace names outside the
# model's "bert."/"distilbert." prefix.
_HEADS = ("mlm_head", "head")
_UNPREFIXED = ("cls.", "vocab_", "pre_classifier.", "classifier.")


def _name_table(config: models.ModelConfig, layout: str, num_labels: int | None = None
                ) -> dict[tuple[str, ...], str]:
  """Our parameter path -> its HuggingFace name, for layout "bert" or "distilbert": of the
  Encoder (MLM model), or with `num_labels` of the Classifier."""
  bert = layout == "bert"
  modules = {
      "pooler": "pooler.dense",
      "pre_classifier": "pre_classifier",
      "classifier": "classifier",
      "embeddings/word_embeddings": "embeddings.word_embeddings",
      "embeddings/position_embeddings": "embeddings.position_embeddings",
      "embeddings/norm": "embeddings.LayerNorm",
      "mlm_head/transform": "cls.predictions.transform.dense" if bert else "vocab_transform",
      "mlm_head/norm": "cls.predictions.transform.LayerNorm" if bert else "vocab_layer_norm",
  }
  if not config.is_distilbert:
    modules["embeddings/token_type_embeddings"] = "embeddings.token_type_embeddings"
  if bert:
    layer = {"attention/query": "attention.self.query", "attention/key": "attention.self.key",
             "attention/value": "attention.self.value", "attention/out": "attention.output.dense",
             "attention_norm": "attention.output.LayerNorm", "fc1": "intermediate.dense",
             "fc2": "output.dense", "mlp_norm": "output.LayerNorm"}
  else:
    layer = {"attention/query": "attention.q_lin", "attention/key": "attention.k_lin",
             "attention/value": "attention.v_lin", "attention/out": "attention.out_lin",
             "attention_norm": "sa_layer_norm", "fc1": "ffn.lin1", "fc2": "ffn.lin2",
             "mlp_norm": "output_layer_norm"}
  stack = "encoder.layer" if bert else "transformer.layer"
  for i in range(config.num_layers):
    modules.update({f"layer_{i}/{ours}": f"{stack}.{i}.{theirs}" for ours, theirs in layer.items()})
  prefix = "bert." if bert else "distilbert."
  leaves = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}
  table = {}
  for path in traverse_util.flatten_dict(models.abstract_params(config, num_labels)):
    module = "/".join(path[1:-1] if path[0] in ("encoder", "head") else path[:-1])
    if module in modules:
      name = f"{modules[module]}.{leaves[path[-1]]}"
      table[path] = name if name.startswith(_UNPREFIXED) else prefix + name
  if num_labels is None:
    table["mlm_head", "bias"] = "cls.predictions.bias" if bert else "vocab_projector.bias"
  return table


def _head_names(config: models.ModelConfig, layout: str, num_labels: int | None = None
                ) -> set[str]:
  """HuggingFace names of the heads: the MLM head, or with `num_labels` the classifier's."""
  return {name for path, name in _name_table(config, layout, num_labels).items()
          if path[0] in _HEADS}


def _num_labels(params: dict) -> int | None:
  """The classifier's number of labels, or None for an Encoder's parameters."""
  return None if "head" not in params else int(np.shape(params["head"]["classifier"]["bias"])[0])


def _to_torch_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  """Our array -> HuggingFace's: kernels [*in, *out] become Linear weights [out, in]."""
  if path[-1] != "kernel":
    return x.reshape(-1) if x.ndim == 2 and path[-1] == "bias" else x
  n_in = 2 if path[-2] == "out" else 1
  return x.reshape(int(np.prod(x.shape[:n_in])), -1).T


def to_hf_state_dict(config: models.ModelConfig, params: dict, layout: str) -> dict:
  """Flax params (an Encoder's or a Classifier's) -> a HuggingFace state dict (numpy, float32) in
  `layout` "bert"/"distilbert"."""
  flat = traverse_util.flatten_dict(params)
  return {name: np.ascontiguousarray(_to_torch_layout(path, np.asarray(flat[path], np.float32)))
          for path, name in _name_table(config, layout, _num_labels(params)).items()}


def read_config(directory: epath.PathLike) -> tuple[models.ModelConfig, str]:
  path = epath.Path(directory) / "config.json"
  if not path.exists():
    raise errors.MissingInput(
        f"{path} not found: a HuggingFace checkpoint directory needs config.json "
        "(save one with model.save_pretrained(DIR))")
  try:
    hf = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise errors.ConfigError(f"{path} is not valid JSON ({e}): re-download or re-export it") from e
  kind = hf.get("model_type")
  if kind == "bert":
    unsupported = {"position_embedding_type": ("absolute", None), "is_decoder": (False, None),
                   "hidden_act": ("gelu",)}
    for key, allowed in unsupported.items():
      if hf.get(key) not in allowed:
        raise errors.ConfigError(
            f"{path}: {key}={hf.get(key)!r} is not supported (only {allowed[0]!r}): "
            "use a standard BERT checkpoint")
    config = models.ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"], type_vocab_size=hf["type_vocab_size"],
        layer_norm_eps=hf["layer_norm_eps"], hidden_dropout=hf["hidden_dropout_prob"],
        attention_dropout=hf["attention_probs_dropout_prob"], pad_token_id=hf.get(
            "pad_token_id") or 0)
    return config, "bert"
  if kind == "distilbert":
    if hf.get("activation", "gelu") != "gelu":
      raise errors.ConfigError(f"{path}: activation={hf['activation']!r} is not supported (only "
                               "'gelu'): use a standard DistilBERT checkpoint")
    # A sinusoidal table is stored in the checkpoint like a learned one; it is loaded as is.
    config = models.ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["dim"], num_layers=hf["n_layers"],
        num_heads=hf["n_heads"], intermediate_size=hf["hidden_dim"],
        max_positions=hf["max_position_embeddings"], type_vocab_size=0,
        layer_norm_eps=1e-12, hidden_dropout=hf["dropout"],
        attention_dropout=hf["attention_dropout"], pad_token_id=hf.get("pad_token_id") or 0)
    return config, "distilbert"
  raise errors.ConfigError(
      f"{path}: model_type={kind!r} is not a BERT or DistilBERT checkpoint: "
      "distil_jax loads only model_type 'bert' or 'distilbert'")


def _read_weights(directory: epath.Path) -> dict[str, np.ndarray]:
  shards = sorted(directory.glob("model*.safetensors"))
  if shards:
    state = {}
    for shard in shards:
      try:
        state.update(safetensors.numpy.load_file(shard) if not storage.is_remote(shard)
                     else safetensors.numpy.load(shard.read_bytes()))
      except Exception as e:
        raise errors.ConfigError(f"{shard} is not a readable safetensors file ({e}): "
                                 "re-download or re-export the checkpoint") from e
    return state
  path = directory / "pytorch_model.bin"
  if not path.exists():
    raise errors.MissingInput(
        f"no model.safetensors or pytorch_model.bin in {directory}: "
        "point to a directory written by save_pretrained")
  import torch  # Only legacy checkpoints need torch.
  try:  # weights_only: a pickle that would run code, or build anything but tensors, is refused.
    with path.open("rb") as f:
      state = torch.load(f, weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
    raise errors.ConfigError(
        f"{path} was refused: it is not a plain tensor checkpoint ({_first_line(e)}); load "
        "only trusted files, and convert them to model.safetensors") from None
  return {k: v.float().numpy() for k, v in state.items()}


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _canonical_names(state: dict, layout: str) -> dict:
  """Old BERT checkpoints name LayerNorm params gamma/beta and may lack the model prefix."""
  prefix = "bert." if layout == "bert" else "distilbert."
  out = {}
  for name, x in state.items():
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias")
    if not name.startswith((prefix, *_UNPREFIXED)):
      name = prefix + name
    out[name] = x
  if "cls.predictions.decoder.bias" in out and "cls.predictions.bias" not in out:
    out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
  return out


def from_hf_state_dict(config: models.ModelConfig, state: dict, layout: str, *,
                       num_labels: int | None = None, source: str = "checkpoint",
                       seed: int = 0) -> dict:
  """A HuggingFace state dict -> Flax params of the Encoder, or with `num_labels` of the
  Classifier (any head weights in `state` are used, e.g. BERT's pre-trained pooler). Heads the
  checkpoint lacks are newly initialised (seeded by `seed`), said in one line."""
  table = _name_table(config, layout, num_labels)
  shapes = traverse_util.flatten_dict(nn.meta.unbox(models.abstract_params(config, num_labels)))
  missing = sorted(name for name in table.values() if name not in state)
  flat = {}
  head = _head_names(config, layout, num_labels)
  # A masked LM's head is new only when all of it is missing (else the checkpoint is partial);
  # a classifier takes what it finds (BERT's pre-trained pooler) and initialises the rest.
  if missing and (set(missing) == head if num_labels is None else set(missing) <= head):
    if num_labels is None:
      logging.warning("%s has no MLM head (a %s encoder checkpoint): the MLM head is newly "
                      "initialised; adapt it by MLM training (experiments/teacher_mlm.py) "
                      "before distilling.", source, layout)
    else:
      new = sorted({path[1] for path, name in table.items() if name in missing})
      logging.warning("%s has no %s weights: newly initialised (seed %d) for %d labels.",
                      source, " or ".join(new), seed, num_labels)
    fresh = (models.init_params(config, seed) if num_labels is None
             else {"head": models.init_head(config, num_labels, seed)})
    flat = {path: np.asarray(x) for path, x in traverse_util.flatten_dict(fresh).items()}
  elif missing:
    raise errors.ConfigError(
        f"{source} lacks {len(missing)} weights ({', '.join(missing[:3])}"
        f"{', ...' if len(missing) > 3 else ''}): a partial checkpoint; re-export or "
        "re-download it")
  for path, name in table.items():
    if name not in state:
      continue
    expected = jax.eval_shape(functools.partial(_to_torch_layout, path), shapes[path]).shape
    if state[name].shape != expected and path[:2] == ("head", "classifier"):
      raise errors.ConfigError(
          f"{source}: {name} has shape {state[name].shape}, {num_labels} labels "
          f"need {expected}: fine-tune from a checkpoint without this classifier")
    if state[name].shape != expected:
      raise errors.ConfigError(
          f"{source}: {name} has shape {state[name].shape}, config.json implies "
          f"{expected}: the weights and config.json disagree")
    x = np.asarray(state[name], np.float32)
    flat[path] = (x.T if path[-1] == "kernel" else x).reshape(shapes[path].shape)
  return traverse_util.unflatten_dict(flat)


def resolve(path_or_name: str | os.PathLike) -> epath.Path:
  """A local or gs:// directory as is; otherwise a HuggingFace hub name, downloaded (TPU VMs)."""
  path = epath.Path(path_or_name).expanduser()
  if path.is_dir() or (storage.is_remote(path) and (path / "config.json").exists()):
    return path
  if path.exists() or str(path_or_name).startswith((".", "/", "~", "gs://")):
    raise errors.MissingInput(f"{path_or_name} is not a checkpoint directory: pass a directory "
                              "holding config.json and model.safetensors, or a hub name")
  import huggingface_hub
  try:
    return epath.Path(huggingface_hub.snapshot_download(
        str(path_or_name), allow_patterns=["*.json", "*.safetensors", "vocab.txt"]))
  except Exception as e:
    raise errors.MissingInput(
        f"{path_or_name!r} is neither a local directory nor a reachable HuggingFace hub model "
        f"({type(e).__name__}): pass a local checkpoint directory") from e


def has_mlm_head(path_or_name: str | os.PathLike) -> bool:
  """Whether the checkpoint has trained MLM head weights (a `BertModel` has none)."""
  directory = resolve(path_or_name)
  config, layout = read_config(directory)
  shards = sorted(directory.glob("model*.safetensors"))
  if shards and not storage.is_remote(directory):  # Only the names are needed, not the tensors.
    names = {}
    for shard in shards:
      with safetensors.safe_open(shard, framework="np") as f:
        names.update(dict.fromkeys(f.keys()))
  else:
    names = _read_weights(directory)
  return _head_names(config, layout) <= set(_canonical_names(names, layout))


def load_bert(path_or_name: str | os.PathLike, seed: int = 0, num_labels: int | None = None
              ) -> tuple[models.ModelConfig, dict]:
  """Loads a BERT (or DistilBERT) checkpoint: a local HF directory or a hub name.

  Returns (config, params) with numpy float32 params in our layout: the Encoder's (MLM model),
  or with `num_labels` the Classifier's. Any checkpoint (masked LM, `BertModel`, pre-training or
  sequence classification) loads either way; heads it lacks are freshly initialised (seeded by
  `seed`), said in one line. A classifier for another number of labels is refused.
  """
  directory = resolve(path_or_name)
  config, layout = read_config(directory)
  state = _canonical_names(_read_weights(directory), layout)
  return config, from_hf_state_dict(config, state, layout, num_labels=num_labels,
                                    source=str(directory), seed=seed)


def _classifier_config(num_labels: int, label_names: Sequence[str]) -> dict:
  """HuggingFace's label fields of a sequence classifier (`num_labels=1` is a regression)."""
  if label_names and len(label_names) != num_labels:
    raise errors.ConfigError(
        f"{len(label_names)} label names {tuple(label_names)} for a classifier with "
        f"{num_labels} labels: pass one name per label, or none")
  names = list(label_names) or [f"LABEL_{i}" for i in range(num_labels)]
  return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)},
          "problem_type": "regression" if num_labels == 1 else "single_label_classification"}


def _hf_config(config: models.ModelConfig, num_labels: int | None = None,
               label_names: Sequence[str] = ()) -> dict:
  """config.json of a masked LM, or with `num_labels` of a sequence classifier."""
  task = "MaskedLM" if num_labels is None else "SequenceClassification"
  labels = {} if num_labels is None else _classifier_config(num_labels, label_names)
  if config.is_distilbert:
    if config.layer_norm_eps != 1e-12:
      raise errors.ConfigError(f"DistilBERT fixes LayerNorm eps at 1e-12, this model uses "
                               f"{config.layer_norm_eps}: export it as BERT instead")
    return {"architectures": [f"DistilBertFor{task}"], "model_type": "distilbert",
            "vocab_size": config.vocab_size, "dim": config.hidden_size,
            "n_layers": config.num_layers, "n_heads": config.num_heads,
            "hidden_dim": config.intermediate_size,
            "max_position_embeddings": config.max_positions, "sinusoidal_pos_embds": False,
            "dropout": config.hidden_dropout, "attention_dropout": config.attention_dropout,
            "activation": "gelu", "initializer_range": 0.02, "qa_dropout": 0.1,
            "seq_classif_dropout": models.DISTILBERT_CLASSIFIER_DROPOUT,
            "pad_token_id": config.pad_token_id, "tie_word_embeddings": True, **labels}
  return {"architectures": [f"BertFor{task}"], "model_type": "bert",
          "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
          "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
          "intermediate_size": config.intermediate_size, "hidden_act": "gelu",
          "max_position_embeddings": config.max_positions,
          "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.layer_norm_eps,
          "hidden_dropout_prob": config.hidden_dropout,
          "attention_probs_dropout_prob": config.attention_dropout, "initializer_range": 0.02,
          "position_embedding_type": "absolute", "pad_token_id": config.pad_token_id,
          "classifier_dropout": None, "tie_word_embeddings": True, **labels}


def copy_tokenizer(tokenizer_dir: epath.PathLike, out_dir: epath.PathLike) -> None:
  """Copies the tokenizer files; tokenizer.json is re-saved with padding/truncation off."""
  tokenizer_dir, out_dir = epath.Path(tokenizer_dir), epath.Path(out_dir)
  if not (tokenizer_dir / "vocab.txt").exists():
    raise errors.MissingInput(f"{tokenizer_dir / 'vocab.txt'} not found: pass the directory of "
                              "the teacher's tokenizer as tokenizer_dir")
  for name in _TOKENIZER_FILES:
    if (tokenizer_dir / name).exists():
      (out_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
  if (tokenizer_dir / "tokenizer.json").exists():
    import tokenizers
    tokenizer = tokenizers.Tokenizer.from_str((tokenizer_dir / "tokenizer.json").read_text())
    tokenizer.no_padding()
    tokenizer.no_truncation()
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str())


EXPORT_MARK = "distil_jax_export.json"  # Says which run an export directory came from.


def export_hf(config: models.ModelConfig, params: dict, out_dir: str | os.PathLike,
              tokenizer_dir: str | os.PathLike | None = None,
              label_names: Sequence[str] = (), *, source: str = "",
              overwrite: bool = False) -> epath.Path:
  """Writes a HuggingFace directory: DistilBertForMaskedLM for a student, BertForMaskedLM for a
  BERT; for a Classifier's params DistilBertForSequenceClassification or
  BertForSequenceClassification, its classes named `label_names` (default LABEL_0, ...; one
  label is a regression). No torch needed.

  `out_dir` must be absent or empty, or hold an earlier export of the same `source` (the run's
  workdir, recorded in the directory), which is replaced; with `overwrite`, an export of another
  run is replaced too. A directory holding anything else (a workdir, another model) is never
  written into (`check_export_dir`). The files are written beside `out_dir`, then moved into
  place: an interrupted export leaves the previous one whole.
  """
  out = epath.Path(out_dir)
  check_export_dir(out, source, overwrite)
  hf_config = _hf_config(config, _num_labels(params), label_names)
  layout = "distilbert" if config.is_distilbert else "bert"
  # A bucket has no atomic rename of a directory: there the files are written in place.
  staging = out if storage.is_remote(out) else out.parent / f".{out.name}.export-tmp"
  try:
    if staging.exists():  # Left by an interrupted export, or an export to replace: ours.
      staging.rmtree()
    staging.mkdir(parents=True)
    (staging / EXPORT_MARK).write_text(json.dumps({"source": source}) + "\n")
    (staging / "model.safetensors").write_bytes(safetensors.numpy.save(
        to_hf_state_dict(config, params, layout), metadata={"format": "pt"}))
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_dir is not None:
      copy_tokenizer(tokenizer_dir, staging)
    if staging != out:
      if out.exists():  # Empty, or an export this call may replace (checked above).
        out.rmtree()
      staging.rename(out)
  except OSError as e:
    raise errors.StorageError(
        f"cannot write the export {out} ({type(e).__name__}: {e.strerror or e}): give an --out "
        "on a writable disk with free space; nothing else was changed") from None
  return out


def check_export_dir(out: epath.PathLike, source: str, overwrite: bool = False) -> None:
  """Refuses an output that is a file, a run's workdir, or a directory holding anything but an
  earlier export (of `source`; of any run with `overwrite`): nothing is written into a
  directory that an export did not create."""
  out = epath.Path(out)
  if not out.exists():
    return
  if not out.is_dir():
    raise errors.OutputExists(f"--out={out} is a file: give a directory to export into (it is "
                              "created)")
  names = {p.name for p in out.iterdir()}
  if not names:
    return
  if names & {"model.json", "checkpoints", "sweep.json", "lock.json"}:
    raise errors.OutputExists(f"{out} is a run's workdir, which an export never replaces: "
                              f"export into a new directory, e.g. --out={out}/export")
  mark = out / EXPORT_MARK
  if not mark.exists():
    raise errors.OutputExists(f"{out} holds files that are not an export of distil_jax: choose a "
                              "new or empty --out directory (it is never written into)")
  previous = json.loads(mark.read_text()).get("source")
  if previous != source and not overwrite:
    raise errors.OutputExists(f"{out} holds an export of {previous}: choose a new --out "
                              "directory, or pass --overwrite to replace that export")


def export_distilbert(student_config: models.ModelConfig, student_params: dict,
                      out_dir: str | os.PathLike,
                      tokenizer_dir: str | os.PathLike | None = None) -> epath.Path:
  """Exports a student as a HuggingFace DistilBertForMaskedLM directory."""
  if not student_config.is_distilbert:
    raise errors.ConfigError(
        "export_distilbert needs a student (type_vocab_size=0); this is a BERT "
        "with token-type embeddings: use export_hf to write a BertForMaskedLM")
  return export_hf(student_config, student_params, out_dir, tokenizer_dir)
