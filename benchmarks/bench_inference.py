r"""Size and CPU inference time of teachers and students in PyTorch (the paper's Table 3).

  .venv/bin/python -m benchmarks.bench_inference [--teacher=HF_DIR --student=HF_DIR] \
      [--sentences=200 --repeats=3]

Rows: bert-base-uncased's shape and its 6-layer student (random weights: the time does not depend
on them), and a teacher and student given as HuggingFace MLM directories (by default the packaged
MiniLM and its 3-layer student built from layers 0, 2, 5). Each model runs its MLM forward on the
same sentences (the first Wikipedia lead sentences of the offline corpus), one at a time (batch
1, no padding), in transformers on this CPU; the time is the median over `repeats` passes after
one pass of warm-up, the two models alternating. The paper: 110M vs 66M parameters, 668 s vs
410 s on STS-B's dev set (1.63x).
"""

import json
import re
import statistics
import tempfile
import time

import torch
import transformers
from absl import app, flags

from distil_jax import hf, models, resources, student

_TEACHER = flags.DEFINE_string("teacher", None, "Teacher MLM directory (default: MiniLM).")
_STUDENT = flags.DEFINE_string("student", None, "Student MLM directory (default: 3 of its "
                               "layers).")
_SENTENCES = flags.DEFINE_integer("sentences", 200, "Sentences per pass.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes of each model.")


def sentences(count: int) -> list[str]:
  """The first sentence of each of the first `count` lead sections of the offline corpus."""
  records = json.loads(resources.wiki_offline_json().read_text()).values()
  firsts = (re.split(r"(?<=[.!?])\s", r["extract"].strip(), maxsplit=1)[0] for r in records)
  return [s for s in firsts if len(s.split()) >= 5][:count]


def seconds_per_pass(models_: dict[str, torch.nn.Module], inputs: list[dict], repeats: int
                     ) -> dict[str, float]:
  """Median seconds of one pass over `inputs` of each model, the models alternating."""
  times = {name: [] for name in models_}
  with torch.inference_mode():
    for repeat in range(repeats + 1):
      for name, model in models_.items():
        start = time.perf_counter()
        for encoded in inputs:
          model(**encoded)
        if repeat:  # The first pass warms up.
          times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def random_pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
  """A preset's teacher shape and its half-depth student, random weights, in transformers."""
  config = models.PRESETS[name]
  params = models.init_params(config)
  layers = student.every_other_layer(config.num_layers, config.num_layers // 2)
  return _in_transformers((config, params), student.student_from_teacher(config, params, layers))


def _in_transformers(*models_: tuple) -> tuple[torch.nn.Module, ...]:
  """(config, params) pairs as transformers MLMs, through our export."""
  with tempfile.TemporaryDirectory() as directory:
    return tuple(transformers.AutoModelForMaskedLM.from_pretrained(
        hf.export_hf(config, params, f"{directory}/{i}")).eval()
                 for i, (config, params) in enumerate(models_))


def given_pair() -> tuple[torch.nn.Module, torch.nn.Module, str]:
  """The --teacher and --student directories (default: MiniLM and its 3-layer student)."""
  if _TEACHER.value and _STUDENT.value:
    load = lambda d: transformers.AutoModelForMaskedLM.from_pretrained(d).eval()
    return load(_TEACHER.value), load(_STUDENT.value), "given teacher and student"
  config, params = hf.load_bert(resources.minilm_dir())
  teacher, pupil = _in_transformers(
      (config, params), student.student_from_teacher(config, params, [0, 2, 5]))
  return teacher, pupil, "MiniLM-L6-H384 and its 3-layer student"


def main(argv) -> None:
  del argv
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(resources.minilm_dir()))
  inputs = [dict(tokenizer(s, return_tensors="pt", truncation=True, max_length=128))
            for s in sentences(_SENTENCES.value)]
  tokens = sum(x["input_ids"].shape[1] for x in inputs)
  print(f"{len(inputs)} sentences ({tokens} tokens), batch 1, {torch.get_num_threads()} torch "
        f"threads, median of {_REPEATS.value} passes\n")
  print("| models | model | parameters | s per pass | ms per sentence | speed-up |")
  print("|---|---|---|---|---|---|")
  pairs = [(*random_pair("bert-base-uncased"), "bert-base-uncased shape (random)"),
           given_pair()]
  for teacher, pupil, label in pairs:
    for encoded in inputs:  # DistilBERT takes no token types.
      encoded.pop("token_type_ids", None)
    seconds = seconds_per_pass({"teacher": teacher, "student": pupil}, inputs, _REPEATS.value)
    for name, model in (("teacher", teacher), ("student", pupil)):
      print(f"| {label} | {name} ({model.config.num_hidden_layers} layers) | "
            f"{model.num_parameters():,} | {seconds[name]:.2f} | "
            f"{1000 * seconds[name] / len(inputs):.1f} | "
            f"{seconds['teacher'] / seconds[name]:.2f}x |")


if __name__ == "__main__":
  app.run(main)
