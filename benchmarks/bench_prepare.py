r"""Data preparation at scale: throughput by processes, memory, packing fill, and the time a run
with prepared data takes to its first batch (locally and on gs://).

  .venv/bin/python -m benchmarks.bench_prepare [--megabytes=300] [--out=/tmp/bench_prepare]

The corpus: the packaged Wikipedia lead sections, one per line, repeated (in a shuffled line
order each time) to `--megabytes` of text. Prints:
1. tokens/s of `prepare` with 1 and with 2 processes (the tokenizer's own threads off, one core
   per process), their ratio, and the 1-process rate against `encode_batch_fast` alone on the
   same text (the Rust tokenizer without reading, packing or writing);
2. the peak resident memory of the preparing processes for a third and for all of the corpus;
3. the fill of rows of 512 (real tokens / positions), packed and unpacked, for article-length
   documents (9 leads joined: about 700 words, the English Wikipedia's mean article) and for
   sentence-length ones (the leads cut at their full stops, as BookCorpus's lines);
4. seconds from `make_datasets` to the first train batch on the prepared corpus, for a third and
   for all of it, on the local disk and in a bucket (the tests' GCS emulator).
"""

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # One core per preparing process.

from absl import app, flags

from distil_jax import resources
from distil_jax.data import default_data_config, load_tokenizer, pack_documents

_MEGABYTES = flags.DEFINE_integer("megabytes", 300, "Text of the corpus.")
_OUT = flags.DEFINE_string("out", "/tmp/bench_prepare", "Scratch directory (emptied).")

VOCAB = 30522


def leads() -> list[str]:
  records = json.loads(resources.wiki_offline_json().read_text()).values()
  return [" ".join(r["extract"].split()) for r in records]


def write_corpus(path: pathlib.Path, megabytes: float) -> int:
  """Leads repeated in a fresh shuffled order to `megabytes`; returns the bytes written."""
  texts, written, rng = leads(), 0, random.Random(0)
  with open(path, "w") as f:
    while written < megabytes * 1e6:
      rng.shuffle(texts)
      block = "\n".join(texts) + "\n"
      f.write(block)
      written += len(block.encode())
  return written


def config(corpus: pathlib.Path, data_dir: str, **overrides):
  c = default_data_config()
  c.update({"sources": (f"text:{corpus}",), "data_dir": data_dir, "max_len": 512,
            "pack": True, "eval_examples": 100, **overrides})
  return c


def timed_prepare(corpus: pathlib.Path, data_dir: pathlib.Path, processes: int) -> dict:
  """Prepares in a fresh interpreter (its peak memory alone): seconds, tokens, peak RSS (MiB)."""
  script = (f"import os, resource, time, json; os.environ['TOKENIZERS_PARALLELISM'] = 'false'\n"
            f"from benchmarks.bench_prepare import config\n"
            f"from distil_jax import resources\n"
            f"from distil_jax.data import load_tokenizer, prepare\n"
            f"tokenizer = load_tokenizer(resources.minilm_dir(), {VOCAB})\n"
            f"start = time.perf_counter()\n"
            f"data = prepare.prepare(config({str(corpus)!r}, {str(data_dir)!r}), tokenizer,"
            f" {processes})\n"
            f"seconds = time.perf_counter() - start\n"
            f"peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            f" resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024\n"
            f"print(json.dumps({{'seconds': seconds, 'tokens': data.tokens, 'peak_mib': peak}}))")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).parents[1], env={**os.environ,
                                                                   "JAX_PLATFORMS": "cpu"})
  return json.loads(out.stdout.strip().splitlines()[-1])


def encode_alone(corpus: pathlib.Path, megabytes: float) -> float:
  """tokens/s of encode_batch_fast alone, one core, on the first `megabytes` of the corpus."""
  tokenizer = load_tokenizer(resources.minilm_dir(), VOCAB)
  texts, size = [], 0
  with open(corpus) as f:
    for line in f:
      texts.append(line.strip())
      size += len(line)
      if size > megabytes * 1e6:
        break
  start = time.perf_counter()
  tokens = sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False))
  return tokens / (time.perf_counter() - start)


def fill(documents: list[str], pack: bool) -> float:
  tokenizer = load_tokenizer(resources.minilm_dir(), VOCAB)
  ids = [e.ids for e in tokenizer.encode_batch_fast(documents, add_special_tokens=False)]
  rows = pack_documents(ids, max_len=512, min_len=12, pack=pack, cls_id=101, sep_id=102,
                        dtype="uint16")
  return float((rows != 0).mean())


def first_batch_seconds(corpus: pathlib.Path, data_dir: str, env: dict | None = None) -> float:
  """make_datasets to the first train batch, in a fresh interpreter, the data prepared."""
  script = (f"import time\nfrom benchmarks.bench_prepare import config\n"
            f"from distil_jax import resources\nfrom distil_jax.data import make_datasets\n"
            f"start = time.perf_counter()\n"
            f"data = make_datasets(config({str(corpus)!r}, {data_dir!r}, batch_size=256),"
            f" resources.minilm_dir(), {VOCAB})\n"
            f"next(data.train)\nprint(time.perf_counter() - start)")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).parents[1],
                       env={**(env or os.environ), "JAX_PLATFORMS": "cpu"})
  return float(out.stdout.strip().splitlines()[-1])


def upload(local: pathlib.Path, target: str, env: dict) -> str:
  """Copies a prepared data_dir into the bucket at `target`; returns it."""
  script = ("import pathlib, sys, fsspec\nfs = fsspec.filesystem('gs')\n"
            "local = pathlib.Path(sys.argv[1])\n"
            "for p in local.rglob('*'):\n"
            "  if p.is_file():\n"
            "    fs.put_file(str(p), f'{sys.argv[2]}/{p.relative_to(local)}')")
  subprocess.run([sys.executable, "-c", script, str(local), target], env=env, check=True)
  return target


def main(argv) -> None:
  del argv
  out = pathlib.Path(_OUT.value)
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  megabytes = _MEGABYTES.value
  small, large = out / "small.txt", out / "large.txt"
  sizes = {"small": write_corpus(small, megabytes / 3), "large": write_corpus(large, megabytes)}
  print(f"corpus: {sizes['large'] / 1e6:.0f} MB ({sizes['small'] / 1e6:.0f} MB for the third), "
        f"{os.cpu_count()} cores\n")

  runs = {(name, p): timed_prepare(corpus, out / f"data_{name}_{p}", p)
          for name, corpus in (("small", small), ("large", large)) for p in (1, 2)}
  alone = encode_alone(large, 20)
  one, two = runs[("large", 1)], runs[("large", 2)]
  rate = lambda r: r["tokens"] / r["seconds"]
  print("| corpus | processes | seconds | tokens | tokens/s | tokens/s per process | "
        "peak RSS (MiB) |\n|---|---|---|---|---|---|---|")
  for (name, p), r in runs.items():
    print(f"| {sizes[name] / 1e6:.0f} MB | {p} | {r['seconds']:.1f} | {r['tokens']:,} | "
          f"{rate(r):,.0f} | {rate(r) / p:,.0f} | {r['peak_mib']:.0f} |")
  print(f"\nscaling, 2 processes / 1: {rate(two) / rate(one):.2f}x (goal >= 1.7x)")
  print(f"encode_batch_fast alone, one core: {alone:,.0f} tokens/s; prepare with 1 process: "
        f"{rate(one) / alone:.2f}x of it (goal >= 0.8x)")
  print(f"peak RSS, all of the corpus / a third: "
        f"{runs[('large', 2)]['peak_mib'] / runs[('small', 2)]['peak_mib']:.2f}x (goal: flat)\n")

  texts = leads()
  articles = [" ".join(texts[i:i + 9]) for i in range(0, len(texts), 9)]
  sentences = [s.strip() + "." for t in texts for s in t.split(". ") if s.strip()]
  print("| documents | words per document | fill packed | fill unpacked |\n|---|---|---|---|")
  for name, documents in (("article-length", articles), ("sentence-length", sentences)):
    words = sum(len(d.split()) for d in documents) / len(documents)
    print(f"| {name} | {words:.0f} | {fill(documents, True):.1%} | "
          f"{fill(documents, False):.1%} |")

  print("\n| corpus | data_dir | seconds to the first batch |\n|---|---|---|")
  for name, corpus in (("small", small), ("large", large)):
    print(f"| {sizes[name] / 1e6:.0f} MB | local | "
          f"{first_batch_seconds(corpus, str(out / f'data_{name}_2')):.1f} |")
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tests"))
  import gcs_emulator
  with gcs_emulator.running("bench-prepare") as emulator:
    for name, corpus in (("small", small), ("large", large)):
      data_dir = upload(out / f"data_{name}_2", f"{emulator.bucket}/{name}", emulator.env)
      seconds = first_batch_seconds(corpus, data_dir, emulator.env)
      print(f"| {sizes[name] / 1e6:.0f} MB | gs:// (emulator) | {seconds:.1f} |")


if __name__ == "__main__":
  app.run(main)
