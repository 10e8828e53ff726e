"""The vocabulary projection and softmax terms' TPU kernels, run by Pallas' interpreter on the
CPU, against the same terms written in jax.numpy from whole logits (gradients by autodiff)."""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from distil_jax import logit_kernel, sharding

# Small blocks, so that positions and vocabulary each span several blocks and are padded.
BLOCKS = logit_kernel.Blocks(positions=32, vocab=128, embedding_vocab=256, embedding_positions=16)
ROWS, LENGTH, DIM, VOCAB, TEMPERATURE = 4, 20, 32, 300, 2.0


def _inputs(rng: np.random.Generator) -> dict[str, jax.Array]:
  """Both models' features, embeddings and biases, and labels. Position 0's student logits are
  the bias alone, whose maximum is tied between two blocks of the vocabulary: the first one is
  the argmax."""
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  x = {"fs": normal(ROWS, LENGTH, DIM), "es": normal(VOCAB, DIM) * 0.5, "bs": normal(VOCAB),
       "ft": normal(ROWS, LENGTH, DIM), "et": normal(VOCAB, DIM) * 0.5, "bt": normal(VOCAB),
       "labels": jnp.asarray(rng.integers(0, VOCAB, (ROWS, LENGTH)))}
  x["fs"] = x["fs"].at[0, 0].set(0.0)
  x["bs"] = x["bs"].at[jnp.array([70, 250])].set(9.0)
  return x


def reference(fs, es, bs, ft, et, bt, labels, with_teacher=True):
  """The terms from whole float32 logits."""
  s, t = fs @ es.T + bs, ft @ et.T + bt
  logp = jax.nn.log_softmax(s)
  terms = {"nll": -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0],
           "student_argmax": jnp.argmax(s, -1).astype(jnp.float32)}
  if with_teacher:
    p_t = jax.nn.softmax(t / TEMPERATURE)
    kl = jnp.sum(p_t * (jnp.log(p_t) - jax.nn.log_softmax(s / TEMPERATURE)), -1)
    terms |= {"kd": kl * TEMPERATURE**2, "teacher_argmax": jnp.argmax(t, -1).astype(jnp.float32),
              "mse": jnp.sum((s - t) ** 2, -1)}
  return terms


def kernel(fs, es, bs, ft, et, bt, labels, with_teacher=True, mesh=None):
  mesh = mesh or sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  teacher = logit_kernel.Projection(ft, et, bt) if with_teacher else None
  return logit_kernel.logit_terms(logit_kernel.Projection(fs, es, bs), teacher, labels,
                                  TEMPERATURE, mesh, with_mse=True, blocks=BLOCKS)


def check_terms_and_gradients(x, terms_fn=kernel, **kwargs):
  """The terms, and the gradients of the student's features, embedding and bias from a loss that
  weighs each term at each position differently."""
  weights = {name: jnp.linspace(0.5, 1.5, ROWS * LENGTH).reshape(ROWS, LENGTH) * scale
             for name, scale in (("nll", 1.0), ("kd", 0.7), ("mse", 0.01))}
  loss = lambda fn: lambda fs, es, bs: sum(
      jnp.sum(terms * weights[name]) for name, terms in fn(
          fs, es, bs, x["ft"], x["et"], x["bt"], x["labels"], **kwargs).items()
      if name in weights)
  student = (x["fs"], x["es"], x["bs"])
  with pltpu.force_tpu_interpret_mode():
    got = jax.jit(lambda *s: terms_fn(*s, x["ft"], x["et"], x["bt"], x["labels"], **kwargs))(
        *student)
    grads = jax.jit(jax.grad(loss(terms_fn), argnums=(0, 1, 2)))(*student)
  want = reference(*student, x["ft"], x["et"], x["bt"], x["labels"], **kwargs)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=2e-5, err_msg=name)
  for name, g, w in zip(("features", "embedding", "bias"), grads,
                        jax.grad(loss(reference), argnums=(0, 1, 2))(*student), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=5e-5, err_msg=name)
  return got


def test_the_terms_and_gradients_equal_those_of_whole_logits():
  got = check_terms_and_gradients(_inputs(np.random.default_rng(0)))
  assert got["student_argmax"][0, 0] == 70  # The first of the tied maxima, across blocks.


def test_without_a_teacher_only_the_labels_terms():
  check_terms_and_gradients(_inputs(np.random.default_rng(1)), with_teacher=False)


def _terms_without_pallas(position, models, vocab, with_mse, blocks):
  """`logit_kernel._terms`' output tile from whole logits, by autodiff: to run `logit_terms` over
  a mesh, where Pallas' TPU interpreter hangs on this 2-core machine (its device threads wait on
  each other)."""
  del with_mse, blocks
  student, *teacher = [(f, e[:vocab], b[0, :vocab]) for f, e, b in models]
  terms = reference(*student, *(teacher or [student])[0], position[:, 0].astype(jnp.int32),
                    with_teacher=bool(teacher))
  lanes = jnp.stack([terms.get(name, jnp.zeros(len(position))) for name in logit_kernel.TERMS], -1)
  return jnp.pad(lanes, ((0, 0), (0, position.shape[1] - lanes.shape[1])))


def check_over_mesh(mesh_shape: tuple[int, int, int]) -> None:
  """Rows over a mesh's data-parallel axes: the embedding's and bias' gradients summed over
  them once (not once per tensor-parallel device). The kernels are `_terms_without_pallas`."""
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:np.prod(mesh_shape)])
  logit_kernel._terms = _terms_without_pallas
  check_terms_and_gradients(_inputs(np.random.default_rng(2)),
                            functools.partial(kernel, mesh=mesh))


def test_over_a_mesh():
  """`logit_terms` on a 2 x 2 mesh (rows over 2 data-parallel devices, 2 tensor-parallel ones
  doing the same work), in a subprocess: the device count is fixed when jax starts."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)}
  subprocess.run([sys.executable, __file__, "2,1,2"], check=True, env=env, timeout=600)


if __name__ == "__main__":
  check_over_mesh(tuple(int(n) for n in sys.argv[1].split(",")))
