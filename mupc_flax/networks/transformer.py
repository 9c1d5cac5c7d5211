"""The transformer PCN (a μPC vision transformer), as a Flax NNX module.

Inputs x [B, H·W·C] (flattened, as the pipelines give them) are images of
``image_shape`` (H, W, C), cut into T = (H/p)·(W/p) patches of p·p·C values.
The network is one stage of 1 + 2R hidden layers, every activity [B, T, d]:

    entry (patch embedding):  μ_1 = a_e · [patches, onehot(position)] W_e      (no skip)
    attention layer:          μ = z + a_o · Attn(LN(z)) W_o
    MLP layer:                μ = z + a_o · φ(a_i · LN(z) W_1) W_2
    readout:                  μ_L = a_L · mean_t(LN(z_top)) W_L

with R attention and R MLP layers alternating, LN a layer norm without
parameters, and Attn multi-head softmax attention of q = a_i LN(z) W_q,
k = a_i LN(z) W_k, v = a_i LN(z) W_v with logits s·q·k. The learned position
embeddings are the rows of W_e that the one-hot position selects. Each
attention and each MLP sublayer is one PC layer with its own activity: a
residual branch that is not W·φ(z), so the engine uses its vector–Jacobian
product (it declares no ``linear_branches``; φ, the activity function the
engine sees, is the identity, and the MLP's φ lives inside its branch).

Premultipliers come from the parameterisation table, L counting every PC
layer (2R + 2): under μPC a_e = 1/√fan_in, a_i = 1/√d, a_o = 1/√fan_in ·
L^(−α), a_L = 1/d and s = 1/d_head, on N(0, 1) weights; under standard PC
all are 1, s = 1/√d_head, and weights are U(±1/√fan_in).
"""

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mupc_flax import parameterization as parameterization_lib
from mupc_flax.networks import kinds
from mupc_flax.networks.layers import ACTIVATIONS, PRECISIONS, Dense, Premultiplier, check_options, matmul


class AttentionLayer(NamedTuple):
  """One attention PC layer's weights: qkv [d, 3d] (q, k, v side by side),
  out [d, d], and their premultipliers a_i, a_o."""

  qkv: jax.Array
  inner: jax.Array
  out: jax.Array
  outer: jax.Array


class MLPLayer(NamedTuple):
  """One MLP PC layer's weights: up [d, m·d], down [m·d, d], and their
  premultipliers a_i, a_o."""

  up: jax.Array
  inner: jax.Array
  down: jax.Array
  outer: jax.Array


def layer_norm(z: jax.Array, epsilon: float = 1e-6) -> jax.Array:
  """Normalises the last axis to zero mean and unit variance (no parameters)."""
  mean = jnp.mean(z, axis=-1, keepdims=True)
  centred = z - mean
  return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + epsilon)


class TransformerPCN(nnx.Module):
  """Vision-transformer PCN: patch embedding, R attention and R MLP layers
  alternating, mean pooling over tokens, readout.

  Args:
    image_shape: (H, W, C) of the inputs.
    patch_size: p; H and W must be multiples of it.
    width: d, the size of every token's activity.
    blocks: R, the number of (attention, MLP) pairs; 2R + 1 hidden layers.
    out_features: C, the number of outputs.
    heads: attention heads; d must be a multiple.
    mlp_ratio: m, the MLP's hidden size over d.
    activation: the MLP's φ, a key of ``ACTIVATIONS``.
    parameterization, depth_exponent, precision: as for ``ResidualPCN``.
      Attention and MLP layers alternate, so the weights are per-layer
      tuples and the engine holds the activities per layer.
    rngs: supplies the ``params`` key.
  """

  def __init__(self, image_shape: Sequence[int], patch_size: int, width: int, blocks: int,
               out_features: int, *, heads: int = 4, mlp_ratio: int = 4,
               activation: str = "gelu", parameterization: str = "mupc",
               depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
               precision: str = "float32", rngs: nnx.Rngs):
    if len(image_shape) != 3 or not all(isinstance(v, int) and v > 0 for v in image_shape):
      raise ValueError(f"TransformerPCN needs image_shape (H, W, C) of positive integers, got "
                       f"{image_shape!r}.")
    for name, value in [("patch_size", patch_size), ("width", width), ("heads", heads),
                        ("mlp_ratio", mlp_ratio), ("out_features", out_features)]:
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"TransformerPCN needs {name} to be a positive integer, got {value!r}.")
    if not isinstance(blocks, int) or blocks < 0:
      raise ValueError(f"TransformerPCN needs a non-negative number of blocks, got {blocks!r}.")
    if image_shape[0] % patch_size or image_shape[1] % patch_size:
      raise ValueError(f"The image sides {tuple(image_shape[:2])} must be multiples of the patch "
                       f"size {patch_size}.")
    if width % heads:
      raise ValueError(f"The width {width} must be a multiple of the number of heads {heads}.")
    check_options(activation, precision)
    parameterization_lib.check_depth_exponent(depth_exponent)
    p = parameterization_lib.get(parameterization)
    d, hidden = width, mlp_ratio * width
    num_layers = 2 * blocks + 2  # L: every PC layer, the readout included
    self.image_shape = tuple(image_shape)
    self.patch_size = patch_size
    self.heads = heads
    self.activation = activation
    self.parameterization = parameterization
    self.depth_exponent = depth_exponent
    self.precision = precision
    tokens = (image_shape[0] // patch_size) * (image_shape[1] // patch_size)
    patch = patch_size * patch_size * image_shape[2]
    inner = lambda fan_in, out, stack: Dense(fan_in, out, multiplier=p.inner_multiplier(fan_in),
                                             init=p.init, rngs=rngs, stack=stack, precision=precision)
    outer = lambda fan_in, stack: Dense(
        fan_in, d, multiplier=p.residual_multiplier(fan_in, num_layers, depth_exponent),
        init=p.init, rngs=rngs, stack=stack, precision=precision)
    self.embed = Dense(patch + tokens, d, multiplier=p.entry_multiplier(patch + tokens, num_layers),
                       init=p.init, rngs=rngs, precision=precision)
    self.attention_qkv = inner(d, 3 * d, blocks)
    self.attention_out = outer(d, blocks)
    self.mlp_up = inner(d, hidden, blocks)
    self.mlp_down = outer(hidden, blocks)
    self.head = Dense(d, out_features, multiplier=p.readout_multiplier(d, num_layers), init=p.init,
                      rngs=rngs, precision=precision)
    self.logit_scale = Premultiplier(jnp.asarray(p.attention_scale(d // heads), jnp.float32))

  @property
  def blocks(self) -> int:
    return self.attention_qkv.kernel.shape[0]

  @property
  def hidden_layers(self) -> int:
    return 1 + 2 * self.blocks

  @property
  def width(self) -> int:
    return self.embed.kernel.shape[1]

  @property
  def tokens(self) -> int:
    h, w, _ = self.image_shape
    return (h // self.patch_size) * (w // self.patch_size)

  def phi(self, z: jax.Array) -> jax.Array:
    """The identity: the nonlinearities live inside the branches."""
    return z

  # --- The PCNetwork protocol (one stage) -------------------------------------------------

  @property
  def stage_layers(self) -> tuple[int, ...]:
    return (self.hidden_layers,)

  def patches(self, x: jax.Array) -> jax.Array:
    """Inputs [B, H·W·C] -> patches with their one-hot positions [B, T, p·p·C + T]."""
    h, w, c = self.image_shape
    p = self.patch_size
    images = x.reshape(x.shape[0], h // p, p, w // p, p, c)
    patches = images.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape[0], self.tokens, p * p * c)
    positions = jnp.broadcast_to(jnp.eye(self.tokens, dtype=patches.dtype),
                                 (x.shape[0], self.tokens, self.tokens))
    return jnp.concatenate([patches, positions], axis=-1)

  def entry(self, stage: int, h: jax.Array) -> jax.Array:
    """The prediction of the first layer, the patch embedding of x [B, D] -> [B, T, d]."""
    del stage
    return self.embed(self.patches(h))

  def residual_weights(self, stage: int = 0, dtype=None) -> tuple[tuple]:
    """One tuple of the 2R residual layers' weights, bottom to top
    (``AttentionLayer`` and ``MLPLayer`` alternating), kernels in ``dtype``
    (default that of the products)."""
    del stage
    dtype = dtype or PRECISIONS[self.precision][0]
    layers = []
    for r in range(self.blocks):
      layers.append(AttentionLayer(self.attention_qkv.kernel[r].astype(dtype),
                                   self.attention_qkv.multiplier[r],
                                   self.attention_out.kernel[r].astype(dtype),
                                   self.attention_out.multiplier[r]))
      layers.append(MLPLayer(self.mlp_up.kernel[r].astype(dtype), self.mlp_up.multiplier[r],
                             self.mlp_down.kernel[r].astype(dtype), self.mlp_down.multiplier[r]))
    return (tuple(layers),)

  def residual_branch(self, stage: int, weights, h):
    """The branches G_ℓ(z_{ℓ−1}) of the layers ``weights`` holds (sliced to
    them), for their inputs ``h``: a tuple of [B, T, d] (one per layer), or
    an array [S, B, T, d]."""
    del stage
    (layers,) = weights
    outputs = tuple(self._branch(layer, h[i]) for i, layer in enumerate(layers))
    return outputs if isinstance(h, tuple) else jnp.stack(outputs) if outputs else h

  def _branch(self, layer, z: jax.Array) -> jax.Array:
    precision = PRECISIONS[self.precision][1]
    normed = layer_norm(z)
    if isinstance(layer, MLPLayer):
      hidden = ACTIVATIONS[self.activation](layer.inner * matmul(normed, layer.up, self.precision))
      return layer.outer * matmul(hidden, layer.down, self.precision)
    batch, tokens, width = z.shape
    qkv = layer.inner * matmul(normed, layer.qkv, self.precision)
    q, k, v = jnp.split(qkv.reshape(batch, tokens, 3 * self.heads, width // self.heads), 3, axis=2)
    logits = self.logit_scale[...] * jnp.einsum("bqhc,bkhc->bhqk", q, k, precision=precision,
                                                preferred_element_type=jnp.float32)
    mixed = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v, precision=precision,
                       preferred_element_type=jnp.float32)
    return layer.outer * matmul(mixed.reshape(batch, tokens, width), layer.out, self.precision)

  def readout(self, h: jax.Array) -> jax.Array:
    """μ_L from the top activity [B, T, d]: layer norm, mean over tokens, the head."""
    return self.head(jnp.mean(layer_norm(h), axis=1))

  def weight_stacks(self, params) -> list[jax.Array]:
    """The weights of each PC layer bottom to top, flattened, each with a
    leading axis of one: the embedding, then per block its attention layer
    (W_q, W_k, W_v, W_o) and its MLP layer (W_1, W_2), then the head."""
    params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    flat = lambda *arrays: jnp.concatenate([jnp.ravel(a) for a in arrays])[None]
    out = [params["embed"]["kernel"].reshape(1, -1)]
    for r in range(params["attention_qkv"]["kernel"].shape[0]):
      out.append(flat(params["attention_qkv"]["kernel"][r], params["attention_out"]["kernel"][r]))
      out.append(flat(params["mlp_up"]["kernel"][r], params["mlp_down"]["kernel"][r]))
    return out + [params["head"]["kernel"].reshape(1, -1)]

  def feedforward(self, x: jax.Array) -> jax.Array:
    """The feed-forward pass: activities [1 + 2R, B, T, d], z_ℓ = μ_ℓ."""
    from mupc_flax.pc import forward  # the engine imports the networks' layers
    return forward.feedforward(self, x)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Feed-forward prediction [B, C] for inputs x [B, H·W·C]."""
    from mupc_flax.pc import forward
    return forward.predict(self, x)


def make_network(spec, *, width: int = 64, blocks: int = 4, patch_size: int = 7, heads: int = 4,
                 mlp_ratio: int = 4, activation: str = "gelu", parameterization: str = "mupc",
                 depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
                 precision: str = "float32", rngs: nnx.Rngs) -> TransformerPCN:
  """The vision transformer for images of ``spec``, ``blocks`` (attention,
  MLP) pairs of width d = ``width``."""
  if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
    raise ValueError(f"width ({width}) must be a multiple of heads ({heads}): choose heads that "
                     "divide it.")
  return TransformerPCN(spec.image_shape, patch_size, width, blocks, spec.num_classes, heads=heads,
                        mlp_ratio=mlp_ratio, activation=activation,
                        parameterization=parameterization, depth_exponent=depth_exponent,
                        precision=precision, rngs=rngs)


# The depth of a transformer is its blocks.
KIND = kinds.NetworkKind(make=make_network, smoke=dict(width=16, blocks=1, heads=2),
                         depth_field="blocks")
