"""The TPU flash attention kernel, run by Pallas' interpreter on the CPU, against XLA's attention
(`models.SelfAttention`) on packed rows: documents kept apart, padding at the end."""

import functools
import os
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from distil_jax import distill_step, errors, models, sharding, tpu

# Two heads of 64 (the kernel's lane-sized head), 128 positions (one block of the kernel's).
CONFIG = models.ModelConfig(vocab_size=50, hidden_size=128, num_layers=2, num_heads=2,
                            intermediate_size=64, max_positions=128)
LENGTH = 128


def _packed_rows(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and segment ids: each row three documents of random lengths, then padding."""
  segments = np.zeros((rows, LENGTH), np.int32)
  for row in segments:
    ends = np.sort(rng.choice(np.arange(8, LENGTH - 8), size=3, replace=False))
    row[:ends[0]], row[ends[0]:ends[1]], row[ends[1]:ends[2]] = 1, 2, 3
  return rng.integers(1, CONFIG.vocab_size, (rows, LENGTH)).astype(np.int32), segments


def check_flash_equals_xla(mesh_shape: tuple[int, int, int]) -> None:
  """The encoder's last hidden states with each attention, at real tokens, on a mesh."""
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:np.prod(mesh_shape)])
  batch = sharding.batch_sharding(mesh)
  ids, segments = _packed_rows(np.random.default_rng(0), rows=2)
  params = models.init_params(CONFIG, seed=1)

  def hidden(flash: bool) -> np.ndarray:
    encoder = models.Encoder(CONFIG, batch, flash_attention=flash)
    out = jax.jit(lambda p, i, s: encoder.apply({"params": p}, i, s))(params, ids, segments)
    return np.asarray(out.hidden_states[-1])

  xla = hidden(False)
  with pltpu.force_tpu_interpret_mode():
    flash = hidden(True)
  real = segments > 0
  np.testing.assert_allclose(flash[real], xla[real], atol=2e-5, rtol=1e-5)
  # Without segments, documents attend across: the result moves, so the ids are what separates.
  assert not np.allclose(xla[real], np.asarray(jax.jit(
      lambda p, i: models.Encoder(CONFIG, batch).apply({"params": p}, i, (segments > 0)))(
          params, ids).hidden_states[-1])[real], atol=1e-3)


def test_flash_attention_equals_the_xla_attention_on_real_tokens():
  check_flash_equals_xla((1, 1, 1))


def test_flash_attention_over_rows_and_heads_of_a_mesh():
  """Rows over 2 data-parallel devices, the 2 heads over 2 tensor-parallel ones (a subprocess:
  the device count is fixed when jax starts)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)}
  subprocess.run([sys.executable, __file__, "2,1,2"], check=True, env=env, timeout=300)


@pytest.mark.parametrize("flash", [True, False])
def test_the_teacher_attends_by_the_kernel_on_tpus_only(flash):
  """The step's teacher forward compiled for a v5e-8 (libtpu's compile-only devices): one kernel
  per layer with `teacher_flash_attention`, none without; on the CPU's mesh, none."""
  config = distill_step.StepConfig(student=CONFIG, teacher=CONFIG, teacher_flash_attention=flash)
  teacher = models.abstract_params(CONFIG)

  def compiled_text(mesh):
    batch = {k: jax.ShapeDtypeStruct((16, LENGTH), jnp.int32,
                                     sharding=sharding.batch_sharding(mesh))
             for k in ("input_ids", "attention_mask", "labels")}
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh, P())), flax.linen.meta.unbox(teacher))
    lowered = jax.jit(functools.partial(distill_step.shared_outputs, config, mesh=mesh)).lower(
        params, batch)
    return (tpu.compile(lowered, "v5e-8") if mesh.devices.flat[0].platform == "tpu"
            else lowered.compile()).as_text()

  kernels = compiled_text(sharding.make_mesh((-1, 1, 1), devices=tpu.devices("v5e-8")))
  assert kernels.count('custom_call_target="tpu_custom_call"') == (CONFIG.num_layers if flash
                                                                   else 0)
  cpu = compiled_text(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  assert "tpu_custom_call" not in cpu


def test_flash_attention_refuses_dropout():
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  encoder = models.Encoder(CONFIG, sharding.batch_sharding(mesh), flash_attention=True)
  ids, segments = _packed_rows(np.random.default_rng(0), rows=1)
  with pytest.raises(errors.ConfigError, match="no dropout"):
    encoder.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.asarray(ids),
                 jnp.asarray(segments), deterministic=False)


if __name__ == "__main__":
  check_flash_equals_xla(tuple(int(n) for n in sys.argv[1].split(",")))
