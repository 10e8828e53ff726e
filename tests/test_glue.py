"""GLUE data (TSV files, tokenisation as HuggingFace's, batches) and metrics (as sklearn/scipy)."""

import itertools
import shutil

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
import transformers

from distil_jax import glue_metrics, resources
from distil_jax.data import glue, tokens

# GLUE's headers (None: CoLA's train/dev files have none), and rows as (texts, label as written)
# with the label ids TFDS gives them, by hand.
HEADERS = {
    "cola": None,
    "sst2": "sentence\tlabel",
    "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
             "sentence2\tscore"),
    "mnli": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"),
    "qnli": "index\tquestion\tsentence\tlabel",
    "rte": "index\tsentence1\tsentence2\tlabel",
    "wnli": "index\tsentence1\tsentence2\tlabel",
}
ROWS = {
    "cola": [(("They drank the pub.",), "0", 0), (("Our friends won't buy this.",), "1", 1)],
    "sst2": [(('a "charming" and often affecting journey . ',), "1", 1),
             (("unflinchingly bleak",), "0", 0)],
    "mrpc": [(("Amrozi accused his brother .", 'Referring to him as " the witness " .'), "1", 1),
             (("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's in 1995 ."), "0", 0)],
    "qqp": [(("How do I learn?", "What is the best way to learn?"), "1", 1),
            (("Why is the sky blue?", "Is the sea blue?"), "0", 0)],
    "stsb": [(("A plane is taking off.", "An air plane is taking off."), "5.000", 5.0),
             (("A man plays a flute.", "A man plays a guitar."), "1.750", 1.75)],
    "mnli": [(("He went home.", "He stayed."), "contradiction", 2),
             (("She reads.", "She reads books."), "neutral", 1),
             (("It rains.", "It is wet."), "entailment", 0)],
    "qnli": [(("Who wrote it?", "It was written by Ann."), "entailment", 0),
             (("When?", "Nobody knows why."), "not_entailment", 1)],
    "rte": [(("Cats purr.", "Dogs purr."), "not_entailment", 1),
            (("Ann is in Rome.", "Ann is in Italy."), "entailment", 0)],
    "wnli": [(("The trophy did not fit.", "The trophy was big."), "1", 1),
             (("Tom thanked Bob.", "Bob thanked Tom."), "0", 0)],
}


def _fields(task: glue.Task, texts: tuple[str, ...], label: str) -> list[str]:
  """A row in the layout of the task's GLUE file, the other columns filled with "x"."""
  if HEADERS[task.name] is None:
    return ["gj04", label, "", texts[0]]
  header = HEADERS[task.name].removeprefix("\ufeff").split("\t")
  values = {**dict(zip(task.columns, texts, strict=True)), task.label_column: label}
  return [values.get(column, "x") for column in header]


def _write(glue_dir, task: glue.Task, split: str, lines: list[str], newline: str = "\n"):
  path = glue.tsv_path(task, split, glue_dir)
  path.parent.mkdir(parents=True, exist_ok=True)
  header = [] if HEADERS[task.name] is None else [HEADERS[task.name]]
  path.write_bytes(newline.join([*header, *lines, ""]).encode())
  return path


@pytest.mark.parametrize("name", list(glue.TASKS))
def test_tsv_files_read_as_glue_lays_them_out(name, tmp_path):
  task = glue.get_task(name)
  rows = ROWS[name]
  for split in ("train", *task.eval_splits):
    _write(tmp_path, task, split, ["\t".join(_fields(task, texts, label))
                                   for texts, label, _ in rows],
           newline="\r\n" if name == "mrpc" else "\n")
    examples = glue.read_tsv(task, split, tmp_path)
    assert examples.texts == tuple(list(column) for column in zip(*[r[0] for r in rows],
                                                                  strict=True))
    np.testing.assert_array_equal(examples.labels, [r[2] for r in rows])
    assert examples.labels.dtype == (np.float32 if name == "stsb" else np.int32)
  assert task.num_labels == (1 if name == "stsb" else max(r[2] for r in rows) + 1)


def _tokenizer_dir(kind: str, tmp_path):
  """MiniLM's tokenizer: its tokenizer.json, or only vocab.txt (ours is then built from it)."""
  if kind == "tokenizer.json":
    return resources.minilm_dir()
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(resources.minilm_dir() / name, tmp_path / name)
  return tmp_path


LONG = "The quick brown fox jumps over the lazy dog near the river bank at dawn."
PAIRS = [(LONG, "Short."), ("Short one.", LONG), (LONG, LONG + " Again, twice."),
         (LONG + " More", LONG), ("Hello there.", "General Kenobi!"), ("Tiny.", "Also tiny.")]


@pytest.mark.parametrize("kind", ["tokenizer.json", "vocab.txt"])
@pytest.mark.parametrize("max_len", [16, 15, 64])
def test_pairs_and_sentences_tokenise_as_huggingface(kind, max_len, tmp_path):
  directory = _tokenizer_dir(kind, tmp_path)
  reference = transformers.AutoTokenizer.from_pretrained(directory)
  tokenizer = tokens.load_tokenizer(directory)
  first, second = (list(column) for column in zip(*PAIRS, strict=True))
  labels = np.arange(len(PAIRS), dtype=np.int32)
  for texts, reference_args in [((first, second), (first, second)), ((first,), (first,))]:
    data = glue.encode(glue.Examples(texts, labels), tokenizer, max_len)
    batch = next(glue.eval_batches(data, len(PAIRS)))
    expected = reference(*reference_args, truncation=True, max_length=max_len,
                         padding="max_length", return_token_type_ids=True)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
      np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
  assert tokenizer.truncation is None  # The caller's tokenizer is left as it was.
  if max_len < 64:
    assert (data.lengths == max_len).sum() >= 3  # Pairs were truncated.


def _data(lengths, max_len=16) -> glue.Encoded:
  """Examples whose input ids and labels are their row numbers."""
  n = len(lengths)
  rows = np.arange(n, dtype=np.int32)
  ids = np.where(np.arange(max_len) < np.array(lengths)[:, None], rows[:, None] + 100, 0)
  return glue.Encoded(ids.astype(np.int32), np.zeros((n, max_len), np.int8),
                      np.array(lengths, np.int32), rows)


def test_epoch_order_depends_on_seed_and_epoch_only():
  order = glue.epoch_order(50, seed=3, epoch=1)
  assert sorted(order) == list(range(50))
  np.testing.assert_array_equal(order, glue.epoch_order(50, seed=3, epoch=1))
  assert not np.array_equal(order, glue.epoch_order(50, seed=4, epoch=1))
  assert not np.array_equal(order, glue.epoch_order(50, seed=3, epoch=2))


def test_train_batches_stack_one_sub_batch_per_seed_and_resume():
  lengths = [3, 5, 9, 4, 2, 7, 3, 6, 5, 4]
  data, seeds = _data(lengths), (3, 7)
  batches = list(itertools.islice(glue.train_batches(data, 4, seeds, buckets=(8, 12)), 5))
  for step, batch in enumerate(batches):  # 2 steps per epoch: 5 steps cross two epochs.
    epoch, index = divmod(step, 2)
    rows = np.stack([glue.epoch_order(10, seed, epoch)[index * 4:(index + 1) * 4]
                     for seed in seeds])
    np.testing.assert_array_equal(batch["labels"], rows)
    longest = np.take(lengths, rows).max()
    length = 8 if longest <= 8 else 12
    assert batch["input_ids"].shape == (2, 4, length)
    np.testing.assert_array_equal(batch["attention_mask"].sum(-1), np.take(lengths, rows))
    np.testing.assert_array_equal(batch["input_ids"][..., 0], rows + 100)
    assert all(v.dtype == np.int32 for v in batch.values())
  resumed = list(itertools.islice(glue.train_batches(data, 4, seeds, start_step=3,
                                                     buckets=(8, 12)), 2))
  for a, b in zip(resumed, batches[3:], strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert next(glue.train_batches(data, 4, seeds))["input_ids"].shape == (2, 4, 16)


def test_eval_batches_cover_every_example_once_in_order():
  data = _data([3, 5, 9, 4, 2, 7, 3, 6, 5, 4])
  batches = list(glue.eval_batches(data, 4, buckets=(4, 8)))
  assert [b["input_ids"].shape for b in batches] == [(4, 16), (4, 8), (4, 8)]
  weights = np.concatenate([b["weights"] for b in batches])
  labels = np.concatenate([b["labels"] for b in batches])
  np.testing.assert_array_equal(weights, [1] * 10 + [0] * 2)
  np.testing.assert_array_equal(labels[weights > 0], np.arange(10))


def test_subsample_is_a_fixed_subset_in_order():
  examples = glue.Examples((list("abcdefghij"),), np.arange(10, dtype=np.int32))
  subset = glue.subsample(examples, 4)
  assert len(subset) == 4 and list(subset.labels) == sorted(set(subset.labels))
  assert subset.texts[0] == [examples.texts[0][i] for i in subset.labels]
  np.testing.assert_array_equal(glue.subsample(examples, 4).labels, subset.labels)
  assert glue.subsample(examples, None) is examples


def test_load_split_reads_tokenises_and_subsamples(tmp_path):
  task = glue.get_task("rte")
  _write(tmp_path, task, "train", ["\t".join(_fields(task, texts, label))
                                   for texts, label, _ in ROWS["rte"] * 5])
  tokenizer = tokens.load_tokenizer(resources.minilm_dir())
  data = glue.load_split(task, "train", tokenizer, 32, glue_dir=tmp_path, max_examples=7)
  assert len(data) == 7 and data.input_ids.shape == (7, 32)
  assert set(data.labels) == {0, 1}
  with pytest.raises(ValueError, match="GLUE task rte has no split 'test': use train or "):
    glue.load_split(task, "test", tokenizer, 32, glue_dir=tmp_path)


def _one_line_error(error_type, fn, *args) -> str:
  with pytest.raises(error_type) as error:
    fn(*args)
  message = str(error.value)
  assert "\n" not in message
  return message


def test_missing_files_say_where_to_get_glue(tmp_path):
  message = _one_line_error(FileNotFoundError, glue.read_tsv, glue.get_task("sst2"), "train",
                            tmp_path / "nowhere")
  assert f"{tmp_path}/nowhere/SST-2/train.tsv not found" in message
  assert "https://gluebenchmark.com/tasks" in message and "holds train.tsv, dev.tsv" in message
  message = _one_line_error(FileNotFoundError, glue.read_tsv, glue.get_task("mnli"),
                            "validation_mismatched", tmp_path)
  assert "MNLI/dev_mismatched.tsv not found" in message
  assert "holds train.tsv, dev_matched.tsv, dev_mismatched.tsv" in message


@pytest.mark.parametrize("name, lines, where, message", [
    ("sst2", ["good\t1", "bad\t0\textra"], "train.tsv:3:",
     "3 tab-separated fields, expected 2: fix or delete this line"),
    ("cola", ["gj04\t1\t\tFine.", "gj04\tFine."], "train.tsv:2:",
     "2 tab-separated fields, expected 4"),
    ("sst2", ["good\t2"], "train.tsv:2:", "label '2' is not one of 0, 1, negative, positive"),
    ("mnli", ["\t".join(["x"] * 10 + ["neutral", "maybe"])], "train.tsv:2:",
     "label 'maybe' is not one of 0, 1, 2, entailment, neutral, contradiction"),
    ("stsb", ["\t".join(["x"] * 9 + ["high"])], "train.tsv:2:", "label 'high' is not a number"),
])
def test_malformed_rows_are_one_line_errors_naming_file_and_line(name, lines, where, message,
                                                                 tmp_path):
  task = glue.get_task(name)
  path = _write(tmp_path, task, "train", lines)
  error = _one_line_error(ValueError, glue.read_tsv, task, "train", tmp_path)
  assert error.startswith(f"{path.parent}/{where}") and message in error


def test_bad_headers_and_encodings_are_one_line_errors(tmp_path):
  task = glue.get_task("qnli")
  path = glue.tsv_path(task, "train", tmp_path)
  path.parent.mkdir(parents=True)
  path.write_text("index\tquestion\ttext\tlabel\n0\tWho?\tAnn.\tentailment\n")
  assert "train.tsv:1: the header has no column 'sentence'" in _one_line_error(
      ValueError, glue.read_tsv, task, "train", tmp_path)
  path.write_bytes(b"index\tquestion\tsentence\tlabel\n0\tWho?\tAnn \xe9.\tentailment\n")
  assert "is not UTF-8" in _one_line_error(ValueError, glue.read_tsv, task, "train", tmp_path)
  assert "choose one of cola, sst2" in _one_line_error(ValueError, glue.get_task, "sst-2")


def _random(seed, n=200, classes=2):
  rng = np.random.RandomState(seed)
  return rng.randint(0, classes, n), rng.randint(0, classes, n)


@pytest.mark.parametrize("seed", range(3))
def test_classification_metrics_equal_sklearn(seed):
  predictions, labels = _random(seed)
  assert glue_metrics.accuracy(predictions, labels) == pytest.approx(
      sklearn.metrics.accuracy_score(labels, predictions), abs=1e-12)
  assert glue_metrics.f1(predictions, labels) == pytest.approx(
      sklearn.metrics.f1_score(labels, predictions), abs=1e-12)
  assert glue_metrics.matthews(predictions, labels) == pytest.approx(
      sklearn.metrics.matthews_corrcoef(labels, predictions), abs=1e-12)
  predictions, labels = _random(seed, classes=3)
  assert glue_metrics.matthews(predictions, labels) == pytest.approx(
      sklearn.metrics.matthews_corrcoef(labels, predictions), abs=1e-12)


def test_degenerate_predictions_score_as_sklearn():
  labels = np.array([0, 1, 1, 0, 1])
  for predictions in (np.zeros(5, int), np.ones(5, int)):
    assert glue_metrics.matthews(predictions, labels) == sklearn.metrics.matthews_corrcoef(
        labels, predictions)
    assert glue_metrics.f1(predictions, labels) == sklearn.metrics.f1_score(
        labels, predictions, zero_division=0)
  assert glue_metrics.f1(np.zeros(3), np.zeros(3)) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_correlations_equal_scipy(seed):
  rng = np.random.RandomState(seed)
  scores = rng.uniform(0, 5, 300)
  predictions = scores + rng.normal(0, 2, 300)
  ties = np.round(predictions)  # Spearman's ranks with ties.
  for x, y in [(predictions, scores), (ties, np.round(scores))]:
    assert glue_metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-10)
    assert glue_metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0],
                                                        abs=1e-10)
  assert np.isnan(glue_metrics.pearson(np.ones(5), scores[:5]))


def test_task_metrics_are_glues():
  rng = np.random.RandomState(0)
  logits, labels = rng.normal(size=(100, 2)), rng.randint(0, 2, 100)
  mrpc = glue_metrics.task_metrics(glue.get_task("mrpc"), logits, labels)
  predictions = logits.argmax(-1)
  assert mrpc == pytest.approx({"f1": sklearn.metrics.f1_score(labels, predictions),
                                "accuracy": sklearn.metrics.accuracy_score(labels, predictions)})
  cola = glue_metrics.task_metrics(glue.get_task("cola"), logits, labels)
  assert cola == pytest.approx({"mcc": sklearn.metrics.matthews_corrcoef(labels, predictions)})
  scores = rng.uniform(0, 5, 100)
  stsb = glue_metrics.task_metrics(glue.get_task("stsb"), logits[:, :1], scores)
  assert stsb == pytest.approx({"pearson": scipy.stats.pearsonr(logits[:, 0], scores)[0],
                                "spearman": scipy.stats.spearmanr(logits[:, 0], scores)[0]})
  assert set(glue_metrics.task_metrics(glue.get_task("mnli"), rng.normal(size=(9, 3)),
                                       rng.randint(0, 3, 9))) == {"accuracy"}


def test_tfds_offline_is_a_one_line_error(monkeypatch):
  def offline(*args, **kwargs):
    raise ConnectionError("Failed to resolve 'dl.fbaipublicfiles.com'")
  monkeypatch.setattr(glue.tfds, "data_source", offline)
  message = _one_line_error(FileNotFoundError, glue.read_tfds, glue.get_task("rte"), "train")
  assert "TFDS glue/rte (train) is neither prepared in the default TFDS data dir" in message
  assert "(ConnectionError)" in message and "https://gluebenchmark.com/tasks" in message


def test_tfds_prepares_the_same_examples_from_the_same_files(tmp_path, monkeypatch):
  """TFDS's own GLUE builder, fed our files instead of downloading them (MRPC aside: TFDS builds
  it from the original corpus), gives the same examples as `read_tsv`."""
  glue_dir = tmp_path / "glue"
  monkeypatch.setattr(glue.tfds.download.DownloadManager, "download_and_extract",
                      lambda self, url: str(glue_dir))
  for name, task in glue.TASKS.items():
    if name == "mrpc":
      continue
    lines = ["\t".join(_fields(task, texts, label)) for texts, label, _ in ROWS[name]]
    splits = ("train", *task.eval_splits)
    for split in splits:
      _write(glue_dir, task, split, lines)
    for split in [s.replace("validation", "test") for s in splits[1:]]:  # TFDS reads them too.
      columns = task.features if name == "cola" else task.columns
      glue.tsv_path(task, split, glue_dir).write_text(
          "\t".join(["index", *columns]) + "\n" + "\t".join(["0"] + ["x"] * len(columns)) + "\n")
    for split in splits:
      ours = glue.read_tsv(task, split, glue_dir)
      theirs = glue.read_tfds(task, split, str(tmp_path / "tfds"))
      assert theirs.labels.dtype == ours.labels.dtype
      rows = lambda e: sorted(zip(*e.texts, e.labels.tolist(), strict=True))
      assert rows(theirs) == rows(ours), name  # TFDS shuffles the records once.
