"""The TPU attention kernel, run by Pallas' interpreter on the CPU, against XLA's attention
(`models.SelfAttention`) on packed rows (documents kept apart, padding at the end), and with
dropout against attention written in jax.numpy."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.pallas import tpu as pltpu

from distil_jax import attention, distill_step, models, sharding, tpu

# Two heads of 64 (the kernel's lane-sized head), 128 positions (one block of the kernel's).
CONFIG = models.ModelConfig(vocab_size=50, hidden_size=128, num_layers=2, num_heads=2,
                            intermediate_size=64, max_positions=128)
LENGTH = 128


def _packed_rows(rng: np.random.Generator, rows: int, length: int = LENGTH
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and segment ids: each row three documents of random lengths, then padding."""
  segments = np.zeros((rows, length), np.int32)
  for row in segments:
    ends = np.sort(rng.choice(np.arange(8, length - 8), size=3, replace=False))
    row[:ends[0]], row[ends[0]:ends[1]], row[ends[1]:ends[2]] = 1, 2, 3
  return rng.integers(1, CONFIG.vocab_size, (rows, length)).astype(np.int32), segments


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


def test_the_kernel_over_rows_and_heads_of_a_mesh():
  """Both checks with rows over 2 data-parallel devices, the 2 heads over 2 tensor-parallel ones
  (a subprocess: the device count is fixed when jax starts)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)}
  subprocess.run([sys.executable, __file__, "2,1,2"], check=True, env=env, timeout=300)


def check_dropout_kernel(mesh_shape: tuple[int, int, int], length: int) -> None:
  """The kernel with dropout, and its gradients, against attention written in jax.numpy (the
  gradients by autodiff) that drops the probabilities `attention.dropout_keep` names for each
  row, head, query and key of the whole batch: the same mask whichever device computes a head."""
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:np.prod(mesh_shape)])
  rng = np.random.default_rng(3)
  rows, heads, head_dim, rate, seed = 2, 2, 64, 0.25, jnp.int32(-7)
  _, segments = _packed_rows(rng, rows, length)
  q, k, v = (jnp.asarray(rng.normal(size=(rows, length, heads, head_dim)), jnp.float32)
             for _ in range(3))
  cell = np.arange(rows)[:, None, None, None] * heads + np.arange(heads)[None, :, None, None]
  index = np.arange(length)[:, None] * length + np.arange(length)
  kept = attention.dropout_keep(attention.dropout_key(seed, jnp.asarray(cell)),
                                jnp.asarray(index), rate)

  def reference(q, k, v):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    probs = jax.nn.softmax(jnp.where(models.attention_keep(segments), scores, -1e30), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(kept, probs / (1 - rate), 0.0), v)

  def kernel(q, k, v):
    return attention.flash_attention(q, k, v, jnp.asarray(segments), mesh, rate, seed)

  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)  # A loss that reads every output.
  loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) * weights)
  with pltpu.force_tpu_interpret_mode():
    out = jax.jit(kernel)(q, k, v)
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
  real = segments > 0
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(reference(q, k, v))[real],
                             atol=2e-5, rtol=1e-5)
  for name, got, want in zip("qkv", grads, jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v),
                                    strict=True):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


def test_the_kernel_drops_what_the_mask_names_and_its_gradients_match():
  """Rows of 640 positions: five blocks of queries, whose key and value gradients add up."""
  check_dropout_kernel((1, 1, 1), 640)


def test_dropout_keeps_one_minus_the_rate_independently_per_seed_and_head():
  """0.9 of 2^20 probabilities kept (the count's standard deviation is 0.0003); two seeds, or
  two heads, keep the same probability as independent draws would, 0.9^2 + 0.1^2 of them."""
  index = jnp.arange(2**20)
  keep = lambda seed, cell: np.asarray(attention.dropout_keep(
      attention.dropout_key(jnp.int32(seed), jnp.int32(cell)), index, 0.1))
  assert abs(keep(0, 0).mean() - 0.9) < 0.0015
  for other in (keep(1, 0), keep(0, 1)):
    assert abs(np.mean(keep(0, 0) == other) - 0.82) < 0.0015
  assert attention.dropout_keep(jnp.int32(0), index, 0.0).all()


@pytest.mark.parametrize("slice_name, on, runs", [
    ("v6e-8", True, 0), ("v6e-8", False, 0), ("v5e-8", True, 0), ("v6e-8", True, 2)])
def test_both_models_attend_by_the_kernel_on_tpus_only(slice_name, on, runs):
  """The train step compiled for a slice (libtpu's compile-only devices): one kernel per teacher
  layer, per student layer one forward and one backward kernel, and on a v6e three for the
  logits (`logit_kernel`: forward, and the two gradients; they do not pay on a v5e); none when
  switched off or on the CPU's mesh. A fused group's students share each kernel, vmapped."""
  config = distill_step.StepConfig(student=CONFIG, teacher=CONFIG, teacher_flash_attention=on,
                                   student_flash_attention=on, logit_kernel=on, num_runs=runs)

  def compiled_text(mesh):
    lowered = distill_step.lower(config, optax.sgd(0.1), mesh, 16, LENGTH,
                                 programs=("train",))["train"]
    return (tpu.compile(lowered, slice_name) if mesh.devices.flat[0].platform == "tpu"
            else lowered.compile()).as_text()

  kernels = compiled_text(sharding.make_mesh((-1, 1, 1), devices=tpu.devices(slice_name)))
  assert kernels.count('custom_call_target="tpu_custom_call"') == on * (
      3 * CONFIG.num_layers + 3 * (slice_name == "v6e-8"))
  cpu = compiled_text(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  assert "tpu_custom_call" not in cpu


if __name__ == "__main__":
  mesh_shape = tuple(int(n) for n in sys.argv[1].split(","))
  check_flash_equals_xla(mesh_shape)
  # Pallas' interpreter hung on the 2 x 2 mesh with rows of 256 positions (not on one device).
  check_dropout_kernel(mesh_shape, LENGTH)
