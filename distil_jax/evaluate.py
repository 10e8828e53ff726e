r"""Held-out masked-LM evaluation of any BERT or DistilBERT MLM, as it is usually reported.

  python -m distil_jax.evaluate --model=HF_DIR_OR_WORKDIR [--teacher=HF_DIR_OR_WORKDIR] \
      [--text=GLOB] [--json_out=RESULT.json]

15% of the real non-special tokens of every sequence (chosen uniformly, at positions fixed by the
text alone) are replaced by [MASK] and predicted: top-1 accuracy and perplexity (exp of the mean
negative log-likelihood) there; with --teacher, the same for the teacher, the student's accuracy
as a % of the teacher's, their top-1 agreement and KL(teacher || student) at T=1. The model is a
HuggingFace directory (ours or any BertForMaskedLM / DistilBertForMaskedLM), a hub name, or a
distil_jax workdir (its export). The text: every line of the files matching --text, one document
each; by default the held-out documents of the experiments (the first 500 of the offline
Wikipedia, packed into sequences of 128), which no experiment trains on. This is the evaluation
that training runs log.
"""

import dataclasses
import functools
import json

import jax
from absl import app, flags, logging
from etils import epath

from distil_jax import cli, data, distill_step, errors, hf, models, sharding
from distil_jax import workdir as workdir_lib

_MODEL = flags.DEFINE_string("model", None, "The model: HF directory, hub name, or workdir.")
_TEACHER = flags.DEFINE_string("teacher", None, "A teacher to compare with (the same forms).")
_TEXT = flags.DEFINE_string("text", None, "Glob of text files, one document per line; default: "
                            "the experiments' held-out Wikipedia leads.")
_MAX_LEN = flags.DEFINE_integer("max_len", 128, "Tokens per sequence.")
_PACK = flags.DEFINE_bool("pack", True, "Fill sequences with consecutive documents.")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 500, "Held-out documents (default text).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Sequences per batch.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/.cache/distil_jax", "Token-id caches.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Weights and compute of the models (softmax and norms stay float32).")


def load_mlm(name: str, dtype: str = "float32") -> tuple[models.ModelConfig, dict, epath.Path]:
  """(config, params, directory) of an MLM checkpoint, weights and compute in `dtype`; an encoder
  without MLM head is refused."""
  directory = workdir_lib.model_directory(name)
  if not hf.has_mlm_head(directory):
    raise errors.ConfigError(f"{directory} has no MLM head (an encoder checkpoint): evaluate a "
                             "masked-LM checkpoint, e.g. one adapted by experiments/teacher_mlm.py")
  config, params = hf.load_bert(directory)
  config = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
  return config, jax.tree.map(lambda x: x.astype(dtype), params), directory


def data_config(text: str | None, **fields):
  """The data config of the evaluation: all of `text`'s documents, or the held-out default."""
  config = data.default_data_config()
  config.update(fields)
  if text:
    config.sources = (f"text:{text}",)
  return config


def evaluate_models(model: str, teacher: str | None, config, dtype: str = "float32"
                    ) -> dict[str, float]:
  """The metrics of `model` (and `teacher`) on the standard eval batches of data `config`."""
  model_config, params, directory = load_mlm(model, dtype)
  teacher_config = teacher_params = None
  if teacher:
    teacher_config, teacher_params, _ = load_mlm(teacher, dtype)
    if teacher_config.vocab_size != model_config.vocab_size:
      raise errors.ConfigError(
          f"the teacher's vocabulary ({teacher_config.vocab_size}) differs from the model's "
          f"({model_config.vocab_size}): compare models that share a tokenizer")
  batches = data.make_eval_batches(config, directory, model_config.vocab_size,
                                   all_documents=config.sources[0].startswith("text:"))
  mesh = sharding.make_mesh((-1, 1, 1))
  step_config = distill_step.StepConfig(
      student=model_config, teacher=teacher_config,
      max_predictions=distill_step.max_predictions(config.max_len, config.mask_prob))
  shardings = {"student": sharding.param_shardings(models.abstract_params(model_config), mesh)}
  teacher_shardings = (sharding.param_shardings(models.abstract_params(teacher_config), mesh)
                       if teacher else None)
  eval_step = jax.jit(functools.partial(distill_step.eval_step, config=step_config, mesh=mesh))
  (metrics,) = distill_step.evaluate(
      eval_step, sharding.put({"student": params}, shardings),
      sharding.put(teacher_params, teacher_shardings) if teacher else None,
      (data.global_batch(b, sharding.batch_sharding(mesh)) for b in batches))
  if teacher and metrics["teacher_accuracy"] > 0:
    metrics["accuracy_ratio_pct"] = 100 * metrics["student_accuracy"] / metrics[
        "teacher_accuracy"]
  return metrics


def main(argv) -> None:
  del argv
  if not _MODEL.value:
    raise app.UsageError("--model is required: a HF directory, hub name or workdir")
  config = data_config(_TEXT.value, max_len=_MAX_LEN.value, pack=_PACK.value,
                       eval_examples=_EVAL_EXAMPLES.value, batch_size=_BATCH_SIZE.value,
                       data_dir=_DATA_DIR.value)
  metrics = evaluate_models(_MODEL.value, _TEACHER.value, config, _DTYPE.value)
  result = {"model": _MODEL.value, "teacher": _TEACHER.value, "dtype": _DTYPE.value,
            "text": _TEXT.value or f"wiki_offline, first {_EVAL_EXAMPLES.value} documents",
            "max_len": config.max_len, "pack": config.pack, **metrics}
  logging.info("%s", " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
  print(json.dumps(result, indent=2))
  if cli.JSON_OUT.value:
    epath.Path(cli.JSON_OUT.value).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  cli.run(main)
