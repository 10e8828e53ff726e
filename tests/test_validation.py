"""The table of config rules (distil_jax/validation.py): every rule refuses a bad value in one line
naming its key, every experiment passes them all, and every numeric range holds exactly at and
around its ends (hypothesis)."""

import copy
import importlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distil_jax import errors, validation
from experiments import common, glue

TEACHER = validation.teacher_rules(num_layers=4, max_positions=128)
TABLES = {"distill": (validation.DISTILL_RULES, common.get_config),
          "finetune": (validation.FINETUNE_RULES, glue.get_config),
          "teacher": (TEACHER, lambda: _set(common.get_config(), **{"student.num_layers": 2}))}

# A bad value of every rule that is not a range (a range's come from its bounds), by its keys.
BAD = {
    ("mode",): {"mode": "teach"},
    ("dtype",): {"dtype": "float64"},
    ("teacher_param_dtype",): {"teacher_param_dtype": "float16"},
    ("mesh_shape",): {"mesh_shape": (2, -1, -1)},
    ("on_nonfinite",): {"on_nonfinite": "ignore"},
    ("student.layers",): {"student.layers": (0, 0)},
    ("student.layers", "student.num_layers"): {"student.layers": (0, 1, 2),
                                               "student.num_layers": 2},
    ("student.init",): {"student.init": "zeros"},
    ("distill.alpha_ce", "distill.alpha_mlm", "distill.alpha_cos", "distill.alpha_mse"): {
        "distill.alpha_ce": 0.0, "distill.alpha_mlm": 0.0, "distill.alpha_cos": 0.0},
    ("optim.frozen",): {"optim.frozen": ("[",)},
    ("optim.lr_multipliers",): {"optim.lr_multipliers": (("mlm_head", 0.0),)},
    ("data.sources",): {"data.sources": ("books.txt",)},
    ("data.min_len", "data.max_len"): {"data.min_len": 64, "data.max_len": 32},
    ("data.bucket", "data.max_len"): {"data.bucket": (64, 32)},
    ("data.bucket", "data.pack"): {"data.bucket": (32,), "data.pack": True},
    ("data.batch_size", "accum_steps"): {"data.batch_size": 32, "accum_steps": 3},
    ("data.mask_token_frac", "data.random_token_frac"): {"data.mask_token_frac": 0.8,
                                                         "data.random_token_frac": 0.3},
    ("buckets", "max_len"): {"buckets": (32, 200)},
    ("seeds",): {"seeds": (1, 1)},
    ("lr_peaks",): {"lr_peaks": (2e-5, -1.0)},
}
BAD_FOR_TEACHER = {("student.layers",): {"student.layers": (0, 5)}}  # Of a 4-layer teacher.


def _set(config, **values):
  """`config` with dotted keys set to `values`, whatever their types (a bad value may not be of
  the key's type: a user's override is, or a Python caller's)."""
  for key, value in values.items():
    *path, last = key.split(".")
    node = config
    for part in path:
      node = node[part]
    with node.ignore_type():
      node[last] = value
  return config


def _bad_values(table: str, rule: validation.Rule) -> list[dict]:
  if not isinstance(rule, validation.Range):
    return [(BAD_FOR_TEACHER if table == "teacher" else BAD)[rule.keys]]
  (key,) = rule.keys
  values = [rule.low if rule.low_open else rule.low - (1 if rule.integral else 1e-3), "7",
            None]
  if rule.high is not None:
    values.append(rule.high if rule.high_open else rule.high + (1 if rule.integral else 1e-3))
  values.append(rule.low + 0.5 if rule.integral else math.nan)
  return [{key: v} for v in values]


CASES = [pytest.param(table, rule, bad, id=f"{table}:{'+'.join(rule.keys)}={list(bad.values())}")
         for table, (rules, _) in TABLES.items() for rule in rules
         for bad in _bad_values(table, rule)]


@pytest.mark.parametrize("table, rule, bad", CASES)
def test_every_rule_refuses_a_bad_value_in_one_line(table, rule, bad):
  rules, base = TABLES[table]
  config = _set(base(), **bad)
  assert rule.broken(config) is not None
  with pytest.raises(errors.ConfigError) as error:
    validation.check(config, rules)
  message = str(error.value)
  assert "\n" not in message and f"{rule.keys[0]}=" in message and "must be" in message


@pytest.mark.parametrize("name", ["common", "tiny", "teacher_mlm", "teacher_mlm_long",
                                  "bert_base", "reproduction"])
def test_every_experiment_passes_every_rule(name):
  config = importlib.import_module(f"experiments.{name}").get_config()
  validation.check(config, validation.DISTILL_RULES)
  if config.adapt_teacher is not None:
    validation.check(config.adapt_teacher, validation.DISTILL_RULES)
  validation.check(glue.get_config(), validation.FINETUNE_RULES)


def test_a_config_breaking_several_rules_names_them_all():
  config = _set(common.get_config(), **{"data.batch_size": 0, "optim.lr_peak": -1.0,
                                        "dtype": "float64", "optim.frozen": ("[",)})
  with pytest.raises(errors.ConfigError, match=r"^4 config values cannot run: dtype='float64'"):
    validation.check(config, validation.DISTILL_RULES)


RANGES = [(table, rule) for table, (rules, _) in TABLES.items() for rule in rules
          if isinstance(rule, validation.Range)]


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, len(RANGES) - 1),
       value=st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                       st.sampled_from([0, 1, 3, 0.5, 1.0, -1e-9])))
def test_a_range_holds_exactly_its_values(index, value):
  table, rule = RANGES[index]
  config = _set(copy.deepcopy(TABLES[table][1]()), **{rule.keys[0]: value})
  numeric = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
  inside = (numeric and (not rule.integral or isinstance(value, int))
            and (value > rule.low if rule.low_open else value >= rule.low)
            and (rule.high is None or (value < rule.high if rule.high_open
                                       else value <= rule.high)))
  assert (rule.broken(config) is None) == inside, (rule.keys, value)


def test_the_commands_check_their_whole_config_before_anything_else(tmp_path):
  """A bad value is refused before the teacher, the data or the workdir is touched: here the
  teacher and the text do not even exist."""
  from distil_jax import finetune, train
  config = _set(common.get_config(), **{"teacher": str(tmp_path / "none"), "optim.lr_peak": -1.0,
                                        "data.sources": (f"text:{tmp_path}/none/*.txt",)})
  with pytest.raises(errors.ConfigError, match=r"^1 config value cannot run: optim.lr_peak="):
    train.run([config], [tmp_path / "run"])
  glue_config = _set(glue.get_config(), init=str(tmp_path / "none"), batch_size=0)
  with pytest.raises(errors.ConfigError, match=r"^1 config value cannot run: batch_size=0"):
    finetune.finetune(glue_config, tmp_path / "glue")
  assert not list(tmp_path.iterdir())
