"""`distil_jax.compile`: an experiment's steps compiled for TPU slices here (libtpu's compile-only
devices), and a program too big for its slice refused in one FATAL line naming what fits; the
launchers run that check before they create anything."""

import pytest

import distil_jax.compile as compile_command
from distil_jax import sharding, tpu, train
from tests import runs
from tests.test_launch import gcloud_calls, gcloud_dir, launch  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # The real TPU compiler: 10 to 30 s a program on 2 cores.


@pytest.mark.parametrize("slice_name, devices, kind", [("v5e-8", 8, "TPU v5 lite"),
                                                       ("v4-32", 16, "TPU v4")])
def test_a_tiny_run_compiles_for_a_slice(bert_dir, corpus, slice_name, devices, kind):
  config = runs.config(bert_dir, corpus, **{"data.batch_size": 32, "accum_steps": 2})
  assert len(tpu.devices(slice_name)) == devices  # One per chip: a v4 chip is one megacore.
  assert {d.device_kind for d in tpu.devices(slice_name)} == {kind}
  reports = compile_command.compile_for_slice(config, slice_name)
  for name, report in reports.items():
    assert report.slice_name == slice_name and report.chips == devices, name
    assert 0 < report.total_bytes < report.hbm_bytes and report.fits, name
    assert report.flops > 0 and report.bytes_accessed > 0, name
  train = reports["train"]
  assert 0 < train.mfu < 1 and train.tokens_per_second_per_chip > 0
  # Two micro-batches: the loop's cost counted twice, more than the eval step's.
  assert train.flops > 2 * reports["eval"].flops


def test_a_fused_group_shares_the_teacher_on_a_slice(bert_dir, corpus):
  """Two runs fused for a v5e-8 (vmapped there, `distill_step.runs_in_turn`): more FLOPs than one
  run, fewer than two, as the teacher's forward is shared."""
  config = runs.config(bert_dir, corpus, **{"data.batch_size": 32})
  one, two = (tpu.analyze(_train_step(config, "v5e-8", n), "v5e-8") for n in (1, 2))
  assert two.fits and one.flops < two.flops < 2 * one.flops


def test_a_fused_group_scatters_no_more_than_one_run_on_a_slice(bert_dir, corpus):
  """Vmapped over runs, a gathered label logit's gradient became a scatter into the whole logits,
  which XLA on TPU copied between layouts: 0.3 of the bytes of 4 bert_base runs fused on a v4-32.
  The fused step holds one run's scatters (the embeddings' gradients), no more."""
  config = runs.config(bert_dir, corpus, **{"data.batch_size": 32})
  scatters = lambda n: _train_step(config, "v4-32", n).as_text().count(" scatter(")
  assert scatters(2) == scatters(1) > 0


def test_a_program_too_big_for_its_slice_ends_in_one_fatal_line(bert_dir, corpus):
  """Logits of 512 rows of 128 per chip (about 19 GiB): the compiler refuses them on a v5e chip's
  16 GiB, and the command compiles with more micro-batches until one fits (here the first: 2)."""
  process = runs.launch("compile", "--config=tests/configs/random_teacher.py",
                        f"--config.teacher={bert_dir}", f"--config.data.sources=('text:{corpus}',)",
                        "--slice=v5e-8", "--config.data.batch_size=4096",
                        "--config.data.max_len=128")
  (output,) = runs.finish(process, returncode=1)
  assert "Traceback" not in output
  last = output.strip().splitlines()[-1]
  assert last.startswith("FATAL the program does not fit a v5e-8: it needs ")
  assert last.endswith("GiB of HBM per chip, more than the 15.75 GiB XLA can use; "
                       "--config.accum_steps=2 fits (micro-batches of 256 rows per device)")


def test_the_launcher_checks_the_fit_before_it_creates_anything(bert_dir, corpus,
                                                                gcloud_dir):  # noqa: F811
  flags = ["--name=tiny", "--zone=us-west4-a", "--accelerator=v5e-8", "--dry-run",
           "--experiment=tests/configs/random_teacher.py", "--workdir=gs://BUCKET/tiny", "--",
           f"--config.teacher={bert_dir}", f"--config.data.sources=('text:{corpus}',)"]
  fits = launch("tpu_vm.py", *flags, gcloud_dir=gcloud_dir)
  assert fits.returncode == 0, fits.stderr
  assert fits.stdout.startswith("# fit check: ") and "| v5e-8 | 8 |" in fits.stdout
  # 2047 rows per chip: refused at once, as no number of micro-batches that halves them exists.
  too_big = launch("tpu_vm.py", *flags, "--config.data.batch_size=16376", gcloud_dir=gcloud_dir)
  assert too_big.returncode != 0 and gcloud_calls(gcloud_dir) == []
  assert too_big.stderr.startswith("error: the program does not fit a v5e-8")
  assert "; micro-batches of 2047 rows per device do not fit, and 2047 rows do not halve: " in (
      too_big.stderr)
  assert too_big.stderr.strip().endswith("(no VM was created; --no-fit-check skips this check)")


def _train_step(config, slice_name: str, runs: int):
  """The train step of `runs` fused runs of `config`, compiled for `slice_name`."""
  model, teacher = train.model_configs(config, train.teacher_shape(config))
  mesh = sharding.make_mesh(config.mesh_shape, devices=tpu.devices(slice_name))
  lowered = train.lowered([config] * runs, model, teacher, mesh, 10, programs=("train",))
  return tpu.compile(lowered["train"], slice_name)
