"""Compiling for TPU slices with libtpu's compile-only devices, here on the CPU: the slice table,
the compiler's memory and cost of small programs against hand counts, and the loop correction."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from distil_jax import errors, sharding, tpu

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="compile-only TPU devices need libtpu (Linux x86_64)")
GIB = 2**30


def abstract(shape, mesh, spec=None):
  """An f32 argument of this shape, replicated on the mesh unless `spec` says otherwise."""
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec or P()))


@pytest.mark.parametrize("name,chips,hosts,kind", [
    ("v4-32", 16, 4, "TPU v4"),  # 32 TensorCores: 16 megacore chips, 4 hosts of 2x2x1.
    ("v5p-8", 4, 1, "TPU v5"),
    ("v5p-128", 64, 16, "TPU v5"),
    ("v5e-8", 8, 1, "TPU v5 lite"),
    ("v5e-1", 1, 1, "TPU v5 lite"),
    ("v6e-16", 16, 2, "TPU v6 lite"),  # Hosts of 8 chips, as in Google's v5e and v6e tables.
])
def test_slice_devices(name, chips, hosts, kind):
  devices = tpu.devices(name)
  assert len(devices) == chips == tpu.get_slice(name).chips
  assert {d.device_kind for d in devices} == {kind}
  assert len({d.process_index for d in devices}) == hosts == tpu.get_slice(name).hosts


def test_every_slice_has_a_device_per_chip():
  for name, s in tpu.SLICES.items():
    family, number = name.split("-")
    per_name = 2 if family in ("v4", "v5p") else 1  # Cloud counts v4 and v5p in TensorCores.
    assert len(tpu.devices(name)) == int(number) // per_name == s.chips, name
    assert s.chip.cores == per_name


def test_slice_names():
  assert tpu.get_slice("v5litepod-8") is tpu.get_slice("v5e-8")
  with pytest.raises(errors.ConfigError, match=r"unknown TPU slice 'v4-24': known slices are "
                     r"v4-8, v4-16, v4-32, .*v6e-256"):
    tpu.get_slice("v4-24")


def test_libtpu_loads_on_demand_and_quietly():
  """Importing loads no libtpu; `devices` does, and its complaints about the missing TPU VM's
  settings (on stderr, from C++) become debug logs."""
  code = ("from absl import logging; from jax._src.lib import xla_client; "
          "from distil_jax import tpu; print(xla_client.pjrt_plugin_loaded('tpu')); "
          "logging.set_verbosity(logging.DEBUG); print(len(tpu.devices('v5e-8')))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
  assert result.stdout.split() == ["False", "8"]
  lines = result.stderr.splitlines()
  assert any("TPU_WORKER_HOSTNAMES" in line for line in lines)
  assert all(line.startswith("DEBUG:absl:libtpu: ") for line in lines), result.stderr


def test_compiles_stay_out_of_the_persistent_cache():
  """conftest.py caches every compile; a compile-only executable could not be loaded back."""
  cache = pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  mesh = sharding.make_mesh((1, 1, 1), devices=tpu.devices("v5e-1"))

  def tpu_cache_probe(x):
    return x * 3

  tpu.compile(jax.jit(tpu_cache_probe).lower(abstract((8, 128), mesh)), "v5e-1")
  assert not list(cache.glob("jit_tpu_cache_probe-*"))
  assert jax.config.jax_persistent_cache_min_compile_time_secs == min_time


def test_loop_correction_matches_the_analytic_and_unrolled_flops():
  """k matmuls of n x n in a scan, one more after it: XLA counts the scan's body once."""
  n, k = 512, 4
  mesh = sharding.make_mesh((1, 1, 1), devices=tpu.devices("v5e-1"))
  a = abstract((n, n), mesh)

  def scanned(c, w):
    c, _ = lax.scan(lambda c, _: (jnp.tanh(c @ w), None), c, None, length=k)
    return c @ w

  def unrolled(c, w):
    for _ in range(k):
      c = jnp.tanh(c @ w)
    return c @ w

  cost = lambda f: tpu.Cost.of(tpu.compile(jax.jit(f).lower(a, a), "v5e-1"))
  whole, after_loop = cost(scanned), cost(lambda c, w: c @ w)
  corrected = tpu.loop_corrected(whole, after_loop, k)
  matmul_flops = (k + 1) * 2 * n**3
  assert whole.flops == pytest.approx(2 * 2 * n**3, rel=0.01)  # The body, once, and the last.
  assert corrected.flops == pytest.approx(matmul_flops, rel=0.01)
  assert corrected.flops == pytest.approx(cost(unrolled).flops, rel=0.01)
  # Every matmul reads two n x n operands and writes one at least once: XLA's count of the
  # whole program falls short of that, the corrected count does not (nor twice it).
  least_traffic = (k + 1) * 3 * n * n * 4
  assert whole.bytes_accessed < least_traffic <= corrected.bytes_accessed < 2 * least_traffic
  assert tpu.loop_corrected(whole, after_loop, 1) == whole
  with pytest.raises(errors.ConfigError, match="costs more than the whole"):
    tpu.loop_corrected(after_loop, whole, k)


D, H, ACCUM, BATCH = 512, 1024, 4, 1024  # Features, hidden units, micro-batches, rows in each.
OPTIMIZER = optax.sgd(0.1, momentum=0.9)


def loss(params, x, y):
  return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def update(params, state, grads):
  updates, state = OPTIMIZER.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def mlp_arguments(name):
  """Replicated parameters and momentum; micro-batches sharded over the chips."""
  mesh = sharding.make_mesh((-1, 1, 1), devices=tpu.devices(name))
  params = {"w1": abstract((D, H), mesh), "w2": abstract((H, D), mesh)}
  state = jax.tree.map(lambda x: abstract(x.shape, mesh), jax.eval_shape(OPTIMIZER.init, params))
  xs = abstract((ACCUM, BATCH, D), mesh, P(None, sharding.BATCH_AXES))
  return params, state, xs


def train_step(params, state, xs, ys):
  """Gradients summed over ACCUM micro-batches in a scan, then one optimizer update."""
  def micro_batch(grads, batch):
    return jax.tree.map(jnp.add, grads, jax.grad(loss)(params, *batch)), None
  grads, _ = lax.scan(micro_batch, jax.tree.map(jnp.zeros_like, params), (xs, ys))
  return update(params, state, jax.tree.map(lambda g: g / ACCUM, grads))


@pytest.mark.parametrize("name,chips", [("v5e-8", 8), ("v4-32", 16)])
def test_mlp_train_step(name, chips):
  params, state, xs = mlp_arguments(name)
  donating = lambda f: jax.jit(f, donate_argnums=(0, 1))
  step = tpu.compile(donating(train_step).lower(params, state, xs, xs), name)
  after_loop = tpu.Cost.of(tpu.compile(donating(update).lower(params, state, params), name))
  rows = BATCH // chips  # Of each micro-batch, on each chip.
  # Forward 2 matmuls, backward 3 (no gradient for the input): 2 * rows * D * H FLOPs each.
  model_flops = ACCUM * 5 * 2 * rows * D * H
  report = tpu.analyze(step, name, loop_trips=ACCUM, loop_free_cost=after_loop,
                       useful_flops=model_flops, tokens_per_step=ACCUM * BATCH)

  weights = 2 * D * H * 4  # Both matrices, f32, on every chip; the momentum as much again.
  assert report.argument_bytes == 2 * weights + 2 * ACCUM * rows * D * 4
  assert report.alias_bytes == 2 * weights  # Parameters and momentum, donated.
  assert report.output_bytes >= 2 * weights and report.code_bytes > 0
  assert report.fits and report.hbm_bytes == {"v5e-8": 15.75, "v4-32": 30.75}[name] * GIB
  assert tpu.Cost.of(step).flops < 0.3 * model_flops  # XLA's count: one micro-batch.
  assert report.flops == pytest.approx(model_flops, rel=0.05)  # With the update, the adds.

  peak, bandwidth = {"v5e-8": (197e12, 819e9), "v4-32": (275e12, 1200e9)}[name]
  bound = max(report.flops / peak, report.bytes_accessed / bandwidth)
  assert report.bound_seconds == pytest.approx(bound)
  assert report.bound_by == "hbm"  # Each micro-batch reads every weight for 128 or 64 rows.
  assert report.mfu == pytest.approx(model_flops / (bound * peak))
  assert report.tokens_per_second_per_chip == pytest.approx(ACCUM * BATCH / chips / bound)
  assert json.loads(json.dumps(report.as_dict()))["fits"] is True


def test_unrolled_step_costs_what_the_corrected_scan_does():
  name = "v5e-8"
  params, state, xs = mlp_arguments(name)

  def unrolled(params, state, xs, ys):
    grads = jax.tree.map(jnp.zeros_like, params)
    for i in range(ACCUM):
      grads = jax.tree.map(jnp.add, grads, jax.grad(loss)(params, xs[i], ys[i]))
    return update(params, state, jax.tree.map(lambda g: g / ACCUM, grads))

  cost = lambda f, *args: tpu.Cost.of(tpu.compile(jax.jit(f).lower(*args), name))
  corrected = tpu.loop_corrected(cost(train_step, params, state, xs, xs),
                                 cost(update, params, state, params), ACCUM)
  assert corrected.flops == pytest.approx(cost(unrolled, params, state, xs, xs).flops, rel=0.03)


def test_a_program_too_big_for_the_chips():
  # An n x n f32 array is 9 GiB; with its result, 18 GiB on a 16 GiB v5e chip. (TPUs pad the
  # last two dimensions of f32 arrays to multiples of 8 and 128: n and n / 8 are.)
  n = 48 * 1024
  mesh = sharding.make_mesh((-1, 1, 1), devices=tpu.devices("v5e-8"))
  double = jax.jit(lambda a: 2 * a + 1)
  with pytest.raises(tpu.DoesNotFit, match="does not fit a v5e-8: it needs 18.0. GiB") as info:
    tpu.compile(double.lower(abstract((n, n), mesh)), "v5e-8")
  assert isinstance(info.value, errors.ConfigError)
  assert info.value.needed_bytes == pytest.approx(2 * n * n * 4, rel=1e-3)
  assert info.value.usable_bytes == 15.75 * GIB

  # Sharded over the 8 chips, each holds an eighth of the array and of the result.
  sharded = abstract((n, n), mesh, P(sharding.BATCH_AXES))
  report = tpu.analyze(tpu.compile(double.lower(sharded), "v5e-8"), "v5e-8")
  assert report.argument_bytes == report.output_bytes == n * n * 4 // 8
  assert report.fits and report.total_bytes < 2.3 * GIB
  assert report.bound_by == "hbm"
  assert report.bytes_accessed == pytest.approx(2 * n * n * 4 // 8, rel=0.01)  # Read, write.

  table = tpu.format_table([report, info.value]).splitlines()
  assert len(table) == 4 and table[2].startswith("| v5e-8 | 8 | 2.25 (15.75) | 1.12 |")
  assert table[3].startswith("| v5e-8 | 8 | 18.0") and "does not fit" in table[3]
  assert not dataclasses.replace(report, temp_bytes=16 * GIB).fits

  other = tpu.DoesNotFit("v5e-8", "RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem.\n"
                                  "Details follow.")
  assert str(other) == ("the program does not fit a v5e-8: RESOURCE_EXHAUSTED: Ran out of memory "
                        "in memory space vmem.; shard it over more chips, or use a smaller batch "
                        "or a bigger slice")
  assert other.needed_bytes is None and "| v5e-8 | 8 | ? (15.75)" in tpu.format_table([other])


def test_buffers_over_the_usable_hbm_are_refused_though_xla_compiled_them(monkeypatch):
  # XLA compiled 8 fused bert_base runs for a v4-32 whose buffers add up to 32.56 GiB of the
  # 30.75 usable: the program is refused as if XLA had, naming both figures.
  mesh = sharding.make_mesh((-1, 1, 1), devices=tpu.devices("v5e-8"))
  program = jax.jit(lambda a: 2 * a).lower(abstract((1024, 1024), mesh))
  analyze = tpu.analyze
  monkeypatch.setattr(tpu, "analyze", lambda compiled, name: dataclasses.replace(
      analyze(compiled, name), temp_bytes=16 * GIB))
  with pytest.raises(tpu.DoesNotFit, match=r"does not fit a v5e-8: it needs 16.0\d GiB of HBM "
                     r"per chip, more than the 15.75 GiB XLA can use"):
    tpu.compile(program, "v5e-8")
  monkeypatch.setattr(tpu, "analyze", analyze)
  assert tpu.compile(program, "v5e-8") is not None
