"""Meshes of 8 simulated devices give the single-device losses and parameters."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from distil_jax import sharding

TESTS = pathlib.Path(__file__).parent

pytestmark = pytest.mark.slow  # A subprocess of 8 devices, 6 meshes.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharded")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
  subprocess.run([sys.executable, str(TESTS / "sharded_steps.py"), str(out)], check=True,
                 env=env, timeout=600)
  specs = json.loads((out / "specs.json").read_text())
  return {name: dict(np.load(out / f"{name}.npz")) for name in specs}, specs


@pytest.mark.parametrize("mesh", ["data8", "data2_fsdp4", "data2_fsdp2_tensor2"])
def test_meshes_match_a_single_device(runs, mesh):
  results, _ = runs
  single, sharded = results["single"], results[mesh]
  np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5)
  assert single["losses"][2] < single["losses"][0]
  for key in single:
    np.testing.assert_allclose(sharded[key], single[key], atol=1e-5, err_msg=key)


def test_fused_points_on_a_mesh_match_a_single_device(runs):
  """A fused sweep step under a (data=2, fsdp=2, tensor=2) mesh: point axis replicated, each
  point's parameters sharded as in a single run, results as on one device."""
  results, specs = runs
  single, sharded = results["fused_single"], results["fused_data2_fsdp2_tensor2"]
  assert single["losses"].shape == (3, 2) and single["losses"][0, 0] != single["losses"][0, 1]
  np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5)
  for key in single:
    np.testing.assert_allclose(sharded[key], single[key], atol=1e-5, err_msg=key)
  fused = specs["fused_data2_fsdp2_tensor2"]
  assert fused["layer_0/attention/query/kernel"] == [None, "fsdp", "tensor", None]
  assert fused["embeddings/word_embeddings/embedding"] == [None, "tensor", "fsdp"]


def test_parameters_are_sharded_by_the_rules(runs):
  _, specs = runs
  full = specs["data2_fsdp2_tensor2"]
  assert full["embeddings/word_embeddings/embedding"] == ["tensor", "fsdp"]
  assert full["layer_0/attention/query/kernel"] == ["fsdp", "tensor", None]
  assert full["layer_0/attention/out/kernel"] == ["tensor", None, "fsdp"]
  assert full["layer_1/fc1/kernel"] == ["fsdp", "tensor"]
  assert full["mlm_head/bias"] == ["tensor"]
  assert full["embeddings/position_embeddings/embedding"] == [None, "fsdp"]
  assert full["teacher_query"] == ["fsdp", "tensor", None]
  assert specs["data2_fsdp4"]["layer_1/fc2/kernel"] == ["tensor", "fsdp"]  # tensor has size 1.
  assert all(specs["data8"]["replicated"]) and not any(full["replicated"])


def test_make_mesh_fills_in_and_refuses_bad_shapes():
  devices = jax.devices()[:1] * 8  # Only the count matters for the shape arithmetic.
  with pytest.raises(ValueError, match="does not fit 8 devices"):
    sharding.make_mesh((3, -1, 1), devices=devices)
  with pytest.raises(ValueError, match="at most one of them -1"):
    sharding.make_mesh((-1, -1, 1), devices=devices)
  assert dict(sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:1]).shape) == {
      "data": 1, "fsdp": 1, "tensor": 1}


def test_indivisible_axes_are_replicated():
  mesh_shape = {"data": 1, "fsdp": 4, "tensor": 4}
  assert tuple(sharding.mesh_spec(("vocab", "embed"), (30522, 768), mesh_shape)) == (
      None, "fsdp")
  assert tuple(sharding.mesh_spec(("vocab", "embed"), (30528, 768), mesh_shape)) == (
      "tensor", "fsdp")
  assert tuple(sharding.mesh_spec(("batch", None), (16, 128), mesh_shape)) == (
      ("data", "fsdp"), None)
