"""The transformer encoder: BERT (teacher) and DistilBERT (student) from one Flax module.

Both are post-LayerNorm encoders with exact (erf) GELU and a tied MLM head, as in HuggingFace.
A config with `type_vocab_size=0` is a DistilBERT: no token-type embeddings. The attention mask
holds segment ids: 0 for padding, and tokens of equal non-zero ids attend to each other, their
positions counted from 0 at each segment's first token; a 0/1 mask (one segment per row) is
HuggingFace's padding mask. A packed row of several documents is thus the documents run apart.
`Classifier` puts HuggingFace's sequence-classification head on the same encoder (BERT: pooler
+ classifier; DistilBERT: pre_classifier + classifier) instead of the MLM head. Every parameter
carries logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`) so that `distil_jax.sharding`
maps them onto a device mesh by rules.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from distil_jax import attention, errors

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of an encoder. `type_vocab_size=0` makes it a DistilBERT."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  dtype: str = "float32"  # Compute dtype ("bfloat16" on TPU); softmax and norms stay float32.
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise errors.ConfigError(
          f"hidden size {self.hidden_size} is not divisible by the number of attention heads "
          f"{self.num_heads}: choose a head count that divides it")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_positions"):
      if getattr(self, name) <= 0:
        raise errors.ConfigError(
            f"model config: {name} must be positive, got {getattr(self, name)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def is_distilbert(self) -> bool:
    return self.type_vocab_size == 0


# Shapes of the public checkpoints, for parameter counts and the paper's recipe.
PRESETS = {
    "bert-base-uncased": ModelConfig(vocab_size=30522, hidden_size=768, num_layers=12,
                                     num_heads=12, intermediate_size=3072),
    "distilbert-base-uncased": ModelConfig(vocab_size=30522, hidden_size=768, num_layers=6,
                                           num_heads=12, intermediate_size=3072,
                                           type_vocab_size=0),
}


# HuggingFace's `seq_classif_dropout` default: DistilBERT's classifier dropout (BERT's is the
# hidden dropout).
DISTILBERT_CLASSIFIER_DROPOUT = 0.2


class EncoderOutput(NamedTuple):
  """MLM logits ([batch, seq or k, vocab], float32; or, not projected, the head's features
  [batch, seq or k, hidden] that `mlm_decoder` projects) and the output of the embeddings and of
  every layer ([batch, seq, hidden] each; `hidden_states[-1]` is the last layer's)."""
  logits: Array
  hidden_states: tuple[Array, ...]


def _init(names: Sequence[str | None], init: nn.initializers.Initializer | None = None):
  return nn.with_logical_partitioning(init or nn.initializers.normal(0.02), tuple(names))


def _zeros(names: Sequence[str | None]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names))


def _layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype,
                      param_dtype=config.param_dtype, name=name,
                      scale_init=_init(("embed",), nn.initializers.ones_init()),
                      bias_init=_zeros(("embed",)))


def _dense(config: ModelConfig, features, axes: Sequence[str | None], name: str, axis=-1):
  """Dense layer whose kernel has logical `axes` (input axes, then output axes)."""
  n_in = 1 if isinstance(axis, int) else len(axis)
  return nn.DenseGeneral(features, axis=axis, dtype=config.dtype,
                         param_dtype=config.param_dtype, name=name,
                         kernel_init=_init(axes), bias_init=_zeros(axes[n_in:]))


def _gelu(x: Array) -> Array:
  return nn.gelu(x, approximate=False)  # HuggingFace "gelu" is the exact erf form.


class Embeddings(nn.Module):
  """Word + position (+ token-type) embeddings, then LayerNorm and dropout."""
  config: ModelConfig

  def setup(self):
    c = self.config
    embed = lambda n, names: nn.Embed(n, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                      embedding_init=_init(names))
    self.word_embeddings = embed(c.vocab_size, ("vocab", "embed"))
    self.position_embeddings = embed(c.max_positions, (None, "embed"))
    if not c.is_distilbert:
      self.token_type_embeddings = embed(c.type_vocab_size, (None, "embed"))
    self.norm = _layer_norm(c, "norm")
    self.dropout = nn.Dropout(c.hidden_dropout)

  def __call__(self, input_ids: Array, token_type_ids: Array | None, positions: Array,
               deterministic: bool):
    x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
    if not self.config.is_distilbert:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      x = x + self.token_type_embeddings(token_type_ids)
    return self.dropout(self.norm(x), deterministic=deterministic)

  def attend(self, x: Array) -> Array:
    """Projects hidden states onto the word embeddings (the tied MLM decoder)."""
    return self.word_embeddings.attend(x)


def segment_positions(segments: Array) -> Array:
  """Each token's position in its segment: from 0 at each segment's first token (padding counts
  on from the segment before it, as HuggingFace's positions do)."""
  index = jnp.arange(segments.shape[-1])
  first = jnp.concatenate([jnp.zeros_like(segments[:, :1], bool),
                           (segments[:, 1:] != segments[:, :-1]) & (segments[:, 1:] > 0)], axis=1)
  return index - jax.lax.cummax(jnp.where(first, index, 0), axis=1)


def attention_keep(segments: Array) -> Array:
  """[batch, 1, query, key]: a real query attends to the keys of its segment; padding queries
  (whose outputs nobody reads) to every real key, as HuggingFace's."""
  return attention.attends(segments[:, :, None], segments[:, None, :])[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_kept_in(scores: Array, dtype) -> Array:
  """Softmax of float32 `scores` over the last axis, computed in float32 and returned, and kept
  for the backward pass, in `dtype`: in bfloat16 the attention probabilities, the largest
  activations a step keeps, take half the memory and the bytes of float32's."""
  return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _softmax_forward(scores: Array, dtype) -> tuple[Array, Array]:
  probs = softmax_kept_in(scores, dtype)
  return probs, probs


def _softmax_backward(dtype, probs: Array, grad: Array) -> tuple[Array]:
  del dtype
  p, g = probs.astype(jnp.float32), grad.astype(jnp.float32)
  return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_kept_in.defvjp(_softmax_forward, _softmax_backward)


class SelfAttention(nn.Module):
  """Multi-head self-attention within segments (`attention_keep`); scores and softmax in
  float32, the probabilities kept in the compute dtype (`softmax_kept_in`). With `flash_mesh`,
  the TPU kernel `attention.flash_attention` on that mesh instead (its dropout drawn in the
  kernel from a seed of the "dropout" stream)."""
  config: ModelConfig
  flash_mesh: Mesh | None = None

  @nn.compact
  def __call__(self, x: Array, segments: Array, keep: Array, deterministic: bool) -> Array:
    c = self.config
    heads = (c.num_heads, c.head_dim)
    q, k, v = (_dense(c, heads, ("embed", "heads", "kv"), name)(x)
               for name in ("query", "key", "value"))
    if self.flash_mesh is not None:
      rate = 0.0 if deterministic else c.attention_dropout
      seed = None
      if rate:
        bits = jax.random.bits(self.make_rng("dropout"), dtype=jnp.uint32)
        seed = jax.lax.bitcast_convert_type(bits, jnp.int32)
      out = attention.flash_attention(q, k, v, segments, self.flash_mesh, rate, seed)
    else:
      scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                          preferred_element_type=jnp.float32) / np.sqrt(c.head_dim)
      scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
      probs = softmax_kept_in(scores, v.dtype)
      probs = nn.Dropout(c.attention_dropout)(probs, deterministic=deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return _dense(c, c.hidden_size, ("heads", "kv", "embed"), "out", axis=(-2, -1))(out)


class EncoderLayer(nn.Module):
  """Post-LN transformer block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""
  config: ModelConfig
  flash_mesh: Mesh | None = None  # As `SelfAttention`'s.

  @nn.compact
  def __call__(self, x: Array, segments: Array, keep: Array, deterministic: bool) -> Array:
    c = self.config
    dropout = lambda y: nn.Dropout(c.hidden_dropout)(y, deterministic=deterministic)
    attend = SelfAttention(c, self.flash_mesh, name="attention")
    x = _layer_norm(c, "attention_norm")(x + dropout(attend(x, segments, keep, deterministic)))
    h = _gelu(_dense(c, c.intermediate_size, ("embed", "mlp"), "fc1")(x))
    h = _dense(c, c.hidden_size, ("mlp", "embed"), "fc2")(h)
    return _layer_norm(c, "mlp_norm")(x + dropout(h))


class MlmHead(nn.Module):
  """dense + GELU + LayerNorm, then the decoder tied to the word embeddings, plus a bias."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, embeddings: Embeddings, project: bool = True) -> Array:
    c = self.config
    # The transform is square; its output axis is named "mlp" so it shards like a hidden axis.
    x = _gelu(_dense(c, c.hidden_size, ("embed", "mlp"), "transform")(x))
    x = _layer_norm(c, "norm")(x)
    bias = self.param("bias", _zeros(("vocab",)), (c.vocab_size,), c.param_dtype)
    if not project:
      return x
    return embeddings.attend(x).astype(jnp.float32) + bias.astype(jnp.float32)


def mlm_decoder(config: ModelConfig, params: dict) -> tuple[Array, Array]:
  """The MLM head's vocabulary projection of its features (an `Encoder(project=False)` output's
  `logits`): the tied word embeddings in the compute dtype, and the bias. The head computes
  float32 (features @ embedding^T in the compute dtype) + bias."""
  return (params["embeddings"]["word_embeddings"]["embedding"].astype(config.dtype),
          params["mlm_head"]["bias"])


class Encoder(nn.Module):
  """BERT or DistilBERT with its MLM head.

  `logit_positions` ([batch, k] indices) computes the MLM logits only at those positions: the
  vocabulary projection dominates a small model's FLOPs, and the losses often need only the
  masked positions. `activation_sharding` (e.g. batch over the data-parallel mesh axes) pins the
  residual stream between layers, so that XLA does not shard it like the parameters.
  `flash_attention` computes the attention with the TPU kernel `attention.flash_attention` on
  `activation_sharding`'s mesh.
  """
  config: ModelConfig
  activation_sharding: jax.sharding.NamedSharding | None = None
  flash_attention: bool = False

  def setup(self):
    self.embeddings = Embeddings(self.config)
    flash_mesh = self.activation_sharding.mesh if self.flash_attention else None
    self.layers = [EncoderLayer(self.config, flash_mesh, name=f"layer_{i}")
                   for i in range(self.config.num_layers)]
    self.mlm_head = MlmHead(self.config)

  def encode(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
             *, deterministic: bool = True) -> tuple[Array, ...]:
    """The output of the embeddings and of every layer, without the MLM head.

    `attention_mask` holds segment ids (module docstring)."""
    pin = lambda y: y if self.activation_sharding is None else jax.lax.with_sharding_constraint(
        y, self.activation_sharding)
    x = pin(self.embeddings(input_ids, token_type_ids, segment_positions(attention_mask),
                            deterministic))
    keep = attention_keep(attention_mask)
    hidden_states = [x]
    for layer in self.layers:
      x = pin(layer(x, attention_mask, keep, deterministic))
      hidden_states.append(x)
    return tuple(hidden_states)

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               *, logit_positions: Array | None = None, deterministic: bool = True,
               project: bool = True) -> EncoderOutput:
    """The MLM logits (at `logit_positions`, or everywhere) and the hidden states; without
    `project`, the head's features in place of the logits (`mlm_decoder` projects them)."""
    hidden_states = self.encode(input_ids, attention_mask, token_type_ids,
                                deterministic=deterministic)
    x = hidden_states[-1]
    if logit_positions is not None:
      x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)
    return EncoderOutput(self.mlm_head(x, self.embeddings, project), hidden_states)


class ClassifierHead(nn.Module):
  """[CLS]'s last hidden state -> logits, as HuggingFace's heads: BERT's pooler (dense + tanh),
  dropout, classifier; DistilBERT's pre_classifier (dense + ReLU), dropout 0.2, classifier."""
  config: ModelConfig
  num_labels: int

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    c = self.config
    if c.is_distilbert:
      x = nn.relu(_dense(c, c.hidden_size, ("embed", "mlp"), "pre_classifier")(x))
      rate = DISTILBERT_CLASSIFIER_DROPOUT
    else:
      x = jnp.tanh(_dense(c, c.hidden_size, ("embed", "mlp"), "pooler")(x))
      rate = c.hidden_dropout
    x = nn.Dropout(rate)(x, deterministic=deterministic)
    return _dense(c, self.num_labels, ("mlp", None), "classifier")(x).astype(jnp.float32)


class Classifier(nn.Module):
  """Sequence classification: the encoder (no MLM head) and a `ClassifierHead` on [CLS], as
  HuggingFace's `BertForSequenceClassification` / `DistilBertForSequenceClassification`.

  Parameters: {"encoder": the Encoder's without "mlm_head", "head": {"pooler" or
  "pre_classifier", "classifier"}}. `num_labels=1` is a regression (STS-B). Returns float32
  logits [batch, num_labels]; a DistilBERT ignores `token_type_ids`.
  """
  config: ModelConfig
  num_labels: int
  activation_sharding: jax.sharding.Sharding | None = None

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               *, deterministic: bool = True) -> Array:
    encoder = Encoder(self.config, self.activation_sharding, name="encoder")
    hidden = encoder.encode(input_ids, attention_mask, token_type_ids,
                            deterministic=deterministic)[-1]
    return ClassifierHead(self.config, self.num_labels, name="head")(hidden[:, 0], deterministic)


def _model(config: ModelConfig, num_labels: int | None) -> nn.Module:
  return Encoder(config) if num_labels is None else Classifier(config, num_labels)


def abstract_params(config: ModelConfig, num_labels: int | None = None) -> dict:
  """Shapes of the parameters, with their logical axis names (`nn.LogicallyPartitioned` leaves):
  the Encoder's, or with `num_labels` the Classifier's."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: _model(config, num_labels).init(jax.random.key(0), ids, ids)
                        )["params"]


def init_params(config: ModelConfig, seed: int = 0, num_labels: int | None = None) -> dict:
  """Randomly initialised parameters (BERT's init: normal(0.02), zero biases, unit LN scales) of
  the Encoder, or with `num_labels` of the Classifier."""
  return _random_params(config, num_labels, jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_params(config: ModelConfig, num_labels: int | None, key: Array) -> dict:
  ids = jnp.zeros((1, 1), jnp.int32)
  return nn.meta.unbox(_model(config, num_labels).init(key, ids, ids)["params"])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_head(config: ModelConfig, num_labels: int, key: Array) -> dict:
  cls = jnp.zeros((1, config.hidden_size), config.dtype)
  return nn.meta.unbox(ClassifierHead(config, num_labels).init(key, cls, True)["params"])


def init_head(config: ModelConfig, num_labels: int, seed: int = 0) -> dict:
  """A new `ClassifierHead` (BERT's init), the "head" of the Classifier's parameters."""
  return _random_head(config, num_labels, jax.random.key(seed))


def classifier_params(config: ModelConfig, encoder_params: dict, num_labels: int,
                      seed: int = 0) -> dict:
  """Classifier parameters from an Encoder's (its MLM head dropped) and a new head seeded by
  `seed`: the start of fine-tuning a model trained here (a teacher or a distilled student)."""
  encoder = {k: v for k, v in encoder_params.items() if k != "mlm_head"}
  expected = nn.meta.unbox(abstract_params(config, num_labels)["encoder"])
  if jax.tree.map(np.shape, encoder) != jax.tree.map(np.shape, expected):
    raise errors.ConfigError(
        "the encoder parameters do not have the shapes of the model config: pass "
        "the config they were trained with")
  return {"encoder": encoder, "head": init_head(config, num_labels, seed)}


def count_params(config: ModelConfig) -> int:
  """Number of parameters (the tied decoder counted once, as HuggingFace does)."""
  leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(config)))
  return sum(int(np.prod(x.shape)) for x in leaves)
