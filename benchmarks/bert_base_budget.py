r"""What experiments/bert_base.py costs: its corpus in tokens, the fill of its rows, its steps, the
time to prepare it, and its TPU time at an assumed MFU.

  .venv/bin/python -m benchmarks.bert_base_budget [--mfu=0.4]

The corpus (cited, not measured here): English Wikipedia, 7,028,569 articles and over 5.0 billion
words on 26 July 2025 ("Wikipedia:Size of Wikipedia"), and BookCorpus, 11,038 books, 74,004,228
sentences and 984,846,357 words (Zhu et al., 2015, "Aligning Books and Movies"). Measured here,
on the packaged Wikipedia lead sections: WordPiece tokens per word, the fill of packed rows of 512
for article-length documents (Wikipedia's mean article, about 700 words) and for sentence-length
ones (BookCorpus's 13 words a line), and one core's preparing rate (`prepare` with one process on
a sample). From them: the steps of 3 epochs (rows from tokens), the preparation time on one v4
host (120 cores, 240 vCPUs: the bound is given for both) and on the 4 hosts of a v4-32 sharing a
bucket, and the training time on a v4-32 (16 chips of 275 TFLOP/s, bf16) at `--mfu`.
"""

import json
import os
import pathlib
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # The rate of one core.

import numpy as np
from absl import app, flags

from distil_jax import distill_step, models, perf, resources
from distil_jax.data import (
    default_data_config,
    load_tokenizer,
    pack_documents,
    prepare,
    segment_ids,
)
from experiments import bert_base

_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilisation.")

WIKIPEDIA_WORDS, WIKIPEDIA_ARTICLES = 5.0e9, 7_028_569
BOOK_WORDS, BOOK_SENTENCES = 984_846_357, 74_004_228
V4_HOST_CORES, V4_HOST_VCPUS, V4_32_HOSTS, V4_32_CHIPS = 120, 240, 4, 16


def main(argv) -> None:
  del argv
  config = bert_base.get_config()
  tokenizer = load_tokenizer(resources.minilm_dir(), 30522)  # bert-base-uncased's vocabulary.
  leads = [" ".join(r["extract"].split()) for r in
           json.loads(resources.wiki_offline_json().read_text()).values()]
  encoded = [e.ids for e in tokenizer.encode_batch_fast(leads, add_special_tokens=False)]
  per_word = sum(map(len, encoded)) / sum(len(t.split()) for t in leads)
  articles = [[t for ids in encoded[i:i + 9] for t in ids] for i in range(0, len(encoded), 9)]
  sentences = [e.ids for e in tokenizer.encode_batch_fast(
      [s for t in leads for s in t.split(". ") if s], add_special_tokens=False)]
  packed = {name: pack_documents(docs, max_len=512, min_len=12, pack=True, cls_id=101,
                                 sep_id=102, dtype=np.uint16)
            for name, docs in (("wikipedia", articles), ("books", sentences))}
  fill = {name: float((rows != 0).mean()) for name, rows in packed.items()}
  # The work of a row, in tokens and in attention pairs within its documents (measured).
  row_work = {name: perf.batch_work({"attention_mask": segment_ids(rows, 101, 0),
                                     "labels": rows}, logits_at_masked=False)
              for name, rows in packed.items()}
  tokens = {"wikipedia": WIKIPEDIA_WORDS * per_word, "books": BOOK_WORDS * per_word}
  # A document piece adds [CLS] and [SEP]: 2 tokens per article, per book line.
  specials = {"wikipedia": 2 * WIKIPEDIA_ARTICLES, "books": 2 * BOOK_SENTENCES}
  rows = {k: (tokens[k] + specials[k]) / (512 * fill[k]) for k in tokens}
  steps = config.epochs * sum(rows.values()) / config.data.batch_size

  with tempfile.TemporaryDirectory() as scratch:
    corpus = pathlib.Path(scratch) / "sample.txt"
    corpus.write_text("\n".join(leads * 2) + "\n")
    data_config = default_data_config()
    data_config.update({"sources": (f"text:{corpus}",), "data_dir": scratch, "max_len": 512,
                        "pack": True, "eval_examples": 10})
    start = time.perf_counter()
    sample = prepare.prepare(data_config, tokenizer, processes=1)
    rate = sample.tokens / (time.perf_counter() - start)

  teacher = models.PRESETS["bert-base-uncased"]
  student = models.PRESETS["distilbert-base-uncased"]
  step_config = distill_step.StepConfig(student=student, teacher=teacher,
                                        max_predictions=distill_step.max_predictions(512, 0.15))
  # A batch's rows in the corpus's proportions: its work, per row of each kind times its share.
  share = {k: rows[k] / sum(rows.values()) for k in rows}
  work = perf.Work(*(config.data.batch_size * sum(
      share[k] * getattr(row_work[k], field) / len(packed[k]) for k in rows)
      for field in perf.Work._fields))
  flops = perf.train_step_flops(step_config, work)
  hours = flops * steps / (V4_32_CHIPS * perf.PEAK_FLOPS["TPU v4"] * _MFU.value) / 3600

  print(f"WordPiece tokens per word (packaged Wikipedia leads): {per_word:.3f}")
  print("| corpus | words (cited) | tokens | fill of packed rows of 512 | rows |\n"
        "|---|---|---|---|---|")
  for name, words in (("Wikipedia", WIKIPEDIA_WORDS), ("books", BOOK_WORDS)):
    key = name.lower()
    print(f"| {name} | {words / 1e9:.2f}B | {tokens[key] / 1e9:.2f}B | {fill[key]:.1%} | "
          f"{rows[key] / 1e6:.1f}M |")
  print(f"\n{config.epochs:g} epochs of {sum(rows.values()) / 1e6:.1f}M rows in batches of "
        f"{config.data.batch_size}: {steps:,.0f} steps; {flops / 1e15:.2f} PFLOP per step; "
        f"{hours:.1f} h on a v4-32 at {_MFU.value:.0%} MFU ({V4_32_CHIPS * hours:.0f} chip-hours)")
  total = sum(tokens.values())
  print(f"\npreparing: one core tokenizes and packs {rate:,.0f} tokens/s (measured here); "
        f"the corpus's {total / 1e9:.2f}B tokens take")
  for name, cores in (("one v4 host, 120 cores", V4_HOST_CORES),
                      ("one v4 host, 240 vCPUs", V4_HOST_VCPUS),
                      ("a v4-32: 4 hosts x 120 cores", V4_32_HOSTS * V4_HOST_CORES),
                      ("a v4-32: 4 hosts x 240 vCPUs", V4_32_HOSTS * V4_HOST_VCPUS)):
    print(f"  {name}: {total / (rate * cores) / 60:.1f} min")


if __name__ == "__main__":
  app.run(main)
