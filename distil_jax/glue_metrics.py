"""GLUE's metrics in numpy: accuracy, F1, Matthews correlation, Pearson and Spearman."""

import numpy as np

from distil_jax.data import glue


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Binary F1 of class 1 (0 when there is no positive prediction nor label)."""
  predicted, actual = np.asarray(predictions) == 1, np.asarray(labels) == 1
  true_positives = np.sum(predicted & actual)
  denominator = np.sum(predicted) + np.sum(actual)
  return float(2 * true_positives / denominator) if denominator else 0.0


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Matthews correlation coefficient, multi-class (Gorodkin's R_K); 0 when undefined."""
  _, index = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
  actual, predicted = np.split(index, 2)
  confusion = np.zeros((index.max() + 1,) * 2, np.float64)
  np.add.at(confusion, (actual, predicted), 1)
  n, correct = confusion.sum(), np.trace(confusion)
  true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
  covariance = correct * n - true_counts @ predicted_counts
  variance = (n**2 - predicted_counts @ predicted_counts) * (n**2 - true_counts @ true_counts)
  return float(covariance / np.sqrt(variance)) if variance else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Pearson correlation (NaN when either side is constant)."""
  x = np.asarray(predictions, np.float64) - np.mean(predictions)
  y = np.asarray(labels, np.float64) - np.mean(labels)
  norm = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / norm) if norm else float("nan")


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Spearman rank correlation: Pearson's of the ranks, ties sharing their average rank."""
  return pearson(_ranks(predictions), _ranks(labels))


def _ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, equal values getting the mean of the ranks they span."""
  _, index, counts = np.unique(x, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  return ((ends - counts + 1 + ends) / 2)[index.reshape(-1)]


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": matthews, "pearson": pearson,
           "spearman": spearman}


def task_metrics(task: glue.Task, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """GLUE's metrics of `task` for logits [n, num_labels]: class argmax, or the score of a
  regression (STS-B)."""
  logits = np.asarray(logits)
  predictions = logits[:, 0] if task.is_regression else logits.argmax(-1)
  return {name: METRICS[name](predictions, labels) for name in task.metrics}
