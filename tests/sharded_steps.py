"""Runs 3 train steps on several meshes of 8 fake CPU devices; writes losses, params, shardings.

Run by tests/test_sharding.py in a subprocess, since the device count is fixed at jax import.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from helpers import random_batch, setup

from distil_jax import distill_step, losses, sharding, stacked

MESHES = {"single": (1, 1, 1), "data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1),
          "data2_fsdp2_tensor2": (2, 2, 2)}
# Two fused runs (a sweep's points) with different temperatures, weights, lr scales and seeds.
FUSED_HYPER = stacked.stack([
    distill_step.Hyper(losses.LossWeights(*map(jnp.float32, (1, 5, 2, 1, 0))), jnp.float32(1),
                       jnp.int32(0)),
    distill_step.Hyper(losses.LossWeights(*map(jnp.float32, (4, 0.5, 1, 0, 0))),
                       jnp.float32(0.5), jnp.int32(1)),
])


def main(out_dir: str) -> None:
  assert jax.device_count() == 8
  batch = random_batch(16, seed=7)
  specs = {}
  runs = {name: (shape, 0) for name, shape in MESHES.items()}
  runs.update({f"fused_{name}": (MESHES[name], 2) for name in ("single", "data2_fsdp2_tensor2")})
  for name, (shape, num_runs) in runs.items():
    devices = jax.devices()[:int(np.prod(shape))]
    # SGD, not Adam: Adam's first updates are ±lr whatever the gradient's size, which turns
    # rounding noise in zero-gradient parameters (the attention key bias) into full steps.
    run = setup(mesh=sharding.make_mesh(shape, devices=devices), accum_steps=2, sgd=True,
                lr=0.05, num_runs=num_runs)
    state, step_losses = run["state"], []
    for _ in range(3):
      state, metrics = run["train"](state, run["teacher"], batch,
                                    FUSED_HYPER if num_runs else distill_step.Hyper())
      step_losses.append(np.asarray(metrics["loss"]))
    flat = traverse_util.flatten_dict(state["params"]["student"], sep="/")
    np.savez(os.path.join(out_dir, f"{name}.npz"), losses=step_losses,
             **{k: np.asarray(v) for k, v in flat.items()})
    specs[name] = {k: [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec]
                   for k, v in flat.items()}
    specs[name]["teacher_query"] = list(run["teacher"]["layer_0"]["attention"]["query"][
        "kernel"].sharding.spec)
    specs[name]["replicated"] = [v.sharding.is_fully_replicated for v in flat.values()]
  with open(os.path.join(out_dir, "specs.json"), "w") as f:
    json.dump(specs, f)


if __name__ == "__main__":
  main(sys.argv[1])
