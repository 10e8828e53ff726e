r"""Max abs errors of our Flax models against HuggingFace's PyTorch ones, and parameter counts.

  .venv/bin/python -m benchmarks.parity

Rows: a random BERT (padded batch, token types) against BertForMaskedLM; the packaged MiniLM
against BertModel on real sentences; a student exported and reloaded as DistilBertForMaskedLM;
a full-depth student with the token-type vector folded in against the teacher, in PyTorch.
"""

import tempfile
from collections.abc import Sequence

import jax
import numpy as np
import tokenizers
import torch
import transformers
from absl import app

from distil_jax import count_params, hf, models, resources, student, testing

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Paris is the capital and most populous city of France.",
             "Photosynthesis converts light energy into chemical energy."]


def _encode(directory, sentences=SENTENCES):
  tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  tokenizer.no_truncation()
  tokenizer.enable_padding(pad_id=0)
  encodings = tokenizer.encode_batch(sentences)
  return np.array([e.ids for e in encodings]), np.array([e.attention_mask for e in encodings])


def _flax(config, params, ids, mask, **kwargs):
  return jax.jit(models.Encoder(config).apply)({"params": params}, ids, mask, **kwargs)


def _torch(model, ids, mask, **kwargs):
  with torch.no_grad():
    return model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        output_hidden_states=True, **kwargs)


def _max_error(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def measure(work: str) -> list[tuple[str, float]]:
  rows = []
  bert_dir = testing.save_random_bert(f"{work}/bert")
  config, params = hf.load_bert(bert_dir)
  ids, mask = _encode(bert_dir)
  token_types = (np.arange(ids.shape[1]) > 4).astype(np.int64)[None].repeat(len(ids), 0)
  ours = _flax(config, params, ids, mask, token_type_ids=token_types)
  theirs = _torch(transformers.BertForMaskedLM.from_pretrained(bert_dir), ids, mask,
                  token_type_ids=torch.tensor(token_types))
  rows.append(("random BERT vs BertForMaskedLM: logits", _max_error(ours.logits, theirs.logits)))
  rows.append(("random BERT vs BertForMaskedLM: hidden states (all layers)", max(
      _max_error(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True))))

  minilm = resources.minilm_dir()
  minilm_config, minilm_params = hf.load_bert(minilm)
  ids, mask = _encode(minilm)
  ours = _flax(minilm_config, minilm_params, ids, mask)
  theirs = _torch(transformers.BertModel.from_pretrained(minilm), ids, mask)
  rows.append(("MiniLM vs BertModel, real sentences: last hidden state",
               _max_error(ours.hidden_states[-1], theirs.last_hidden_state)))

  ids, mask = _encode(bert_dir)
  for name, layers in (("3-layer student", [0, 2, 3]), ("full-depth student", range(4))):
    student_config, student_params = student.student_from_teacher(config, params, layers)
    out = hf.export_distilbert(student_config, student_params, f"{work}/{name}", bert_dir)
    exported = _torch(transformers.DistilBertForMaskedLM.from_pretrained(out), ids, mask)
    rows.append((f"{name} exported, DistilBertForMaskedLM vs Flax: logits", _max_error(
        exported.logits, _flax(student_config, student_params, ids, mask).logits)))
  teacher = _torch(transformers.BertForMaskedLM.from_pretrained(bert_dir), ids, mask)
  rows.append(("full-depth student (PyTorch) vs teacher (PyTorch): logits",
               _max_error(exported.logits, teacher.logits)))
  return rows


def main(argv: Sequence[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as work:
    rows = measure(work)
  width = max(len(name) for name, _ in rows)
  print(f"| {'check (float32)':<{width}} | max abs error |")
  print(f"|{'-' * (width + 2)}|---------------|")
  for name, error in rows:
    print(f"| {name:<{width}} | {error:13.2e} |")
  print()
  print(count_params.table(["bert-base-uncased", str(resources.minilm_dir())]))


if __name__ == "__main__":
  app.run(main)
