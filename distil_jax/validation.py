"""Every config value checked before anything is written or computed: the table of rules.

A rule reads one or more keys of a config and says what they must be. `check(config, rules)`
raises one `ConfigError` naming every broken rule with its key, its value and what it must be.
`DISTILL_RULES` are those of `main` and `sweep` (experiments/common.py's keys), `DATA_RULES`
those of a data config (within them, and the evaluation's); `teacher_rules` check a student and
its sequences against the teacher's shape; `FINETUNE_RULES` those of `finetune`
(experiments/glue.py's keys).
"""

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from distil_jax import errors

DTYPES = ("float32", "bfloat16")  # What the steps compute in, on CPU, GPU and TPU alike.


@dataclasses.dataclass(frozen=True)
class Rule:
  """`keys` must satisfy `ok(*values)`; `must` says how, for the error message."""
  keys: tuple[str, ...]
  must: str
  ok: Callable[..., bool]

  def broken(self, config: ml_collections.ConfigDict) -> str | None:
    """The error of `config` against this rule, or None if it holds."""
    values = [_get(config, key) for key in self.keys]
    try:
      holds = bool(self.ok(*values))
    except Exception:  # A value of the wrong kind (a string for a number, a bad regex, ...).
      holds = False
    if holds:
      return None
    shown = ", ".join(f"{key}={value!r}" for key, value in zip(self.keys, values, strict=True))
    return f"{shown}: {'it' if len(self.keys) == 1 else 'they'} must be {self.must}"


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split("."):
    config = config[part]
  return config


def _integer(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Range(Rule):
  """A number (an integer if `integral`) from `low` to `high` (None: unbounded), each end
  included unless open."""
  low: float = 0
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  integral: bool = False


def integer(key: str, low: int, high: int | None = None) -> Range:
  """An integer in [low, high] (no upper bound without `high`)."""
  must = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
  return Range((key,), must, lambda v: _integer(v) and low <= v and (high is None or v <= high),
               low, high, integral=True)


def number(key: str, low: float, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Range:
  """A finite number in the interval from `low` to `high`, each end closed unless `*_open`."""
  interval = (f"{'(' if low_open else '['}{low:g}, "
              f"{'inf)' if high is None else f'{high:g}' + (')' if high_open else ']')}")
  above = lambda v: v > low if low_open else v >= low
  below = lambda v: high is None or (v < high if high_open else v <= high)
  return Range((key,), f"a number in {interval}", lambda v: _number(v) and above(v) and below(v),
               low, high, low_open, high_open)


def one_of(key: str, *values: Any) -> Rule:
  return Rule((key,), "one of " + ", ".join(map(repr, values)), lambda v: v in values)


def _regexes(patterns: Sequence[str]) -> bool:
  return all(isinstance(p, str) and re.compile(p) is not None for p in patterns)


def _mesh(shape: Sequence[int]) -> bool:
  return (len(shape) == 3 and all(_integer(s) and (s >= 1 or s == -1) for s in shape)
          and list(shape).count(-1) <= 1)


_SOURCE = re.compile(r"^(wiki_offline|(text|jsonl|parquet|tfds):.+)$")

# The rules of a data config (`data.default_data_config()`'s keys): a run's config.data, and
# the evaluation's.
DATA_RULES = (
    Rule(("sources",), "a non-empty tuple of 'wiki_offline', 'text:GLOB', 'jsonl:GLOB', "
         "'parquet:GLOB' or 'tfds:NAME'",
         lambda v: len(v) > 0 and all(_SOURCE.match(s) for s in v)),
    integer("max_len", 3),
    integer("min_len", 3),
    Rule(("min_len", "max_len"), "min_len <= max_len", lambda low, high: low <= high),
    Rule(("bucket", "max_len"), "bucket lengths ascending, each in [3, max_len)",
         lambda bucket, high: all(_integer(b) and b >= 3 for b in bucket)
         and list(bucket) == sorted(set(bucket)) and all(b < high for b in bucket)),
    Rule(("bucket", "pack"), "no buckets with packed rows (they are full)",
         lambda bucket, pack: not (bucket and pack)),
    integer("batch_size", 1),
    integer("eval_batch_size", 0),
    number("mask_prob", 0, 1, low_open=True),
    number("mask_token_frac", 0, 1),
    number("random_token_frac", 0, 1),
    Rule(("mask_token_frac", "random_token_frac"), "fractions that sum to at most 1",
         lambda mask, random: mask + random <= 1),
    number("mlm_smoothing", 0),
    integer("eval_examples", 0),
    integer("seed", 0),
    integer("read_threads", 1),
)

# The rules of a distillation (or MLM) run: experiments/common.py's keys.
DISTILL_RULES = (
    one_of("mode", "distill", "mlm"),
    one_of("dtype", *DTYPES),
    one_of("teacher_param_dtype", *DTYPES),
    integer("total_steps", 1),
    number("epochs", 0),
    integer("accum_steps", 1),
    integer("seed", 0),
    Rule(("mesh_shape",), "3 sizes (data, fsdp, tensor), each >= 1 or one of them -1", _mesh),
    one_of("on_nonfinite", "stop", "skip"),
    integer("max_skipped_steps", 0),
    integer("log_every_steps", 1),
    integer("eval_every_steps", 1),
    integer("eval_batches", 0),
    integer("checkpoint_every_steps", 1),
    integer("keep_checkpoints", 1),
    integer("student.num_layers", 1),
    Rule(("student.layers",), "a tuple of distinct layer indices >= 0",
         lambda v: all(_integer(i) and i >= 0 for i in v) and len(set(v)) == len(v)),
    Rule(("student.layers", "student.num_layers"), "as many layers as student.num_layers, or ()",
         lambda layers, n: not layers or len(layers) == n),
    one_of("student.init", "teacher", "random"),
    number("distill.temperature", 0, low_open=True),
    number("distill.alpha_ce", 0),
    number("distill.alpha_mlm", 0),
    number("distill.alpha_cos", 0),
    number("distill.alpha_mse", 0),
    Rule(("distill.alpha_ce", "distill.alpha_mlm", "distill.alpha_cos", "distill.alpha_mse"),
         "not all 0 (the loss would be 0)", lambda *alphas: any(alphas)),
    integer("distill.max_predictions", 0),
    integer("distill.logit_chunk", 0),
    number("optim.lr_peak", 0, low_open=True),
    number("optim.warmup_frac", 0, 1),
    number("optim.b1", 0, 1, high_open=True),
    number("optim.b2", 0, 1, high_open=True),
    number("optim.eps", 0, low_open=True),
    number("optim.weight_decay", 0),
    number("optim.clip_norm", 0, low_open=True),
    Rule(("optim.frozen",), "a tuple of Python regular expressions", _regexes),
    Rule(("optim.lr_multipliers",), "a tuple of (regular expression, factor > 0) pairs",
         lambda pairs: all(len(p) == 2 and _regexes(p[:1]) and _number(p[1]) and p[1] > 0
                           for p in pairs)),
    *(dataclasses.replace(rule, keys=tuple(f"data.{k}" for k in rule.keys))
      for rule in DATA_RULES),
    Rule(("data.batch_size", "accum_steps"), "a batch_size that accum_steps divides",
         lambda batch, accum: batch % accum == 0),
)


def teacher_rules(num_layers: int, max_positions: int, mode: str = "distill"
                  ) -> tuple[Rule, ...]:
  """The student (of a distillation) and the sequences that a teacher of `num_layers` layers and
  `max_positions` position embeddings allows."""
  n = num_layers
  rules = (integer("data.max_len", 3, max_positions),)
  if mode == "distill":
    rules += (integer("student.num_layers", 1, n),
              Rule(("student.layers",), f"teacher layer indices below the teacher's {n} layers",
                   lambda layers: all(i < n for i in layers)))
  return rules


# The rules of a fine-tuning: experiments/glue.py's keys.
FINETUNE_RULES = (
    one_of("dtype", *DTYPES),
    integer("max_len", 3),
    Rule(("buckets", "max_len"), "bucket lengths ascending, each in [3, max_len)",
         lambda bucket, high: all(_integer(b) and b >= 3 for b in bucket)
         and list(bucket) == sorted(set(bucket)) and all(b < high for b in bucket)),
    integer("batch_size", 1),
    integer("max_train_examples", 0),
    Rule(("seeds",), "a non-empty tuple of distinct integers >= 0",
         lambda v: len(v) > 0 and all(_integer(s) and s >= 0 for s in v)
         and len(set(v)) == len(v)),
    Rule(("lr_peaks",), "a non-empty tuple of learning rates > 0",
         lambda v: len(v) > 0 and all(_number(x) and x > 0 for x in v)),
    number("epochs", 0, low_open=True),
    number("warmup_frac", 0, 1),
    number("weight_decay", 0),
    number("b1", 0, 1, high_open=True),
    number("b2", 0, 1, high_open=True),
    number("eps", 0, low_open=True),
    number("clip_norm", 0, low_open=True),
    Rule(("mesh_shape",), "3 sizes (data, fsdp, tensor), each >= 1 or one of them -1", _mesh),
    one_of("on_nonfinite", "stop", "skip"),
    integer("max_skipped_steps", 0),
    integer("log_every_steps", 1),
    integer("eval_every_steps", 1),
    integer("checkpoint_every_steps", 1),
    integer("keep_checkpoints", 1),
)


def check(config: ml_collections.ConfigDict, rules: Sequence[Rule]) -> None:
  """Raises one `ConfigError` naming every rule that `config` breaks."""
  problems = [p for rule in rules if (p := rule.broken(config))]
  if problems:
    raise errors.ConfigError(f"{len(problems)} config value{'s' if len(problems) > 1 else ''} "
                             f"cannot run: {'; '.join(problems)} (fix them with "
                             "--config.KEY=VALUE)")
