"""The transformer PCN (a μPC vision transformer), as a Flax NNX module.

Inputs x [B, H·W·C] (flattened, as the pipelines give them) are images of
``image_shape`` (H, W, C), cut into T = (H/p)·(W/p) patches of p·p·C values.
The network is one stage of hidden layers, every activity [B, T, d]:

    entry (patch embedding):  μ_1 = a_e · [patches, onehot(position)] W_e      (no skip)
    attention branch:         A(z) = a_o · Attn(LN(z)) W_o
    MLP branch:               M(z) = a_o · φ(a_i · LN(z) W_1) W_2
    readout:                  μ_L = a_L · mean_t(LN(z_top)) W_L

with LN a layer norm without parameters and Attn multi-head softmax
attention of q = a_i LN(z) W_q, k = a_i LN(z) W_k, v = a_i LN(z) W_v with
logits s·q·k. The learned position embeddings are the rows of W_e that the
one-hot position selects. R blocks of an attention and an MLP branch follow
the entry, as PC layers in one of two ways (``pc_layer``):

    "sublayer":  2R layers, μ = z + A(z) and μ = z + M(z) alternating
    "block":     R layers (the limits paper's), μ = z + A(z) + M(z + A(z))

A residual branch that is not W·φ(z): the engine uses its vector–Jacobian
product (no ``linear_branches``; φ, the activity function the engine sees,
is the identity, and the MLP's φ lives inside its branch). Without
``layer_norm`` every LN above is the identity: the premultipliers sit
inside the branches (after LN where it is on), so no LN absorbs them.

Premultipliers come from the parameterisation table, L counting every PC
layer (2R + 2 or R + 2): under μPC a_e = 1/√fan_in, a_i = 1/√d,
a_o = 1/√fan_in · L^(−α), a_L = 1/d and s = 1/d_head, on N(0, 1) weights;
under standard PC all are 1, s = 1/√d_head, and weights are U(±1/√fan_in).
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


class BlockLayer(NamedTuple):
  """One block PC layer's weights: its attention's and its MLP's."""

  attention: AttentionLayer
  mlp: MLPLayer


PC_LAYERS = ("sublayer", "block")


def check_positive_integers(network: str, **values) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{network} needs {name} to be a positive integer, got {value!r}.")


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
      The weights are per-layer tuples and the engine holds the
      activities per layer.
    pc_layer: "sublayer" (every attention and every MLP a PC layer, 2R + 1
      hidden layers) or "block" (every block one, R + 1 hidden layers).
    layer_norm: False drops every layer norm (the branches' and the readout's).
    rngs: supplies the ``params`` key.
  """

  causal = False  # attention over every token (the language network's is causal)

  def __init__(self, image_shape: Sequence[int], patch_size: int, width: int, blocks: int,
               out_features: int, *, heads: int = 4, mlp_ratio: int = 4,
               activation: str = "gelu", parameterization: str = "mupc",
               depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
               precision: str = "float32", pc_layer: str = "sublayer", layer_norm: bool = True,
               rngs: nnx.Rngs):
    if len(image_shape) != 3 or not all(isinstance(v, int) and v > 0 for v in image_shape):
      raise ValueError(f"TransformerPCN needs image_shape (H, W, C) of positive integers, got "
                       f"{image_shape!r}.")
    check_positive_integers("TransformerPCN", patch_size=patch_size)
    if image_shape[0] % patch_size or image_shape[1] % patch_size:
      raise ValueError(f"The image sides {tuple(image_shape[:2])} must be multiples of the patch "
                       f"size {patch_size}.")
    self.image_shape = tuple(image_shape)
    self.patch_size = patch_size
    tokens = (image_shape[0] // patch_size) * (image_shape[1] // patch_size)
    self._build(patch_size * patch_size * image_shape[2] + tokens, width, blocks, out_features,
                heads=heads, mlp_ratio=mlp_ratio, activation=activation,
                parameterization=parameterization, depth_exponent=depth_exponent,
                precision=precision, pc_layer=pc_layer, layer_norm=layer_norm, rngs=rngs)

  def _build(self, entry_features: int, width: int, blocks: int, out_features: int, *,
             heads: int, mlp_ratio: int, activation: str, parameterization: str,
             depth_exponent: float, precision: str, pc_layer: str, layer_norm: bool,
             rngs: nnx.Rngs) -> None:
    """Checks the shared fields and draws the layers: the entry from
    ``entry_features`` inputs per token, the blocks, the head."""
    name = type(self).__name__
    if pc_layer not in PC_LAYERS:
      raise ValueError(f"pc_layer must be 'sublayer' (a PC layer per attention and per MLP) or "
                       f"'block' (one per block), got {pc_layer!r}.")
    if not isinstance(layer_norm, bool):
      raise ValueError(f"layer_norm must be true or false, got {layer_norm!r}.")
    check_positive_integers(name, width=width, heads=heads, mlp_ratio=mlp_ratio,
                            out_features=out_features)
    if not isinstance(blocks, int) or blocks < 0:
      raise ValueError(f"{name} needs a non-negative number of blocks, got {blocks!r}.")
    if width % heads:
      raise ValueError(f"The width {width} must be a multiple of the number of heads {heads}.")
    check_options(activation, precision)
    parameterization_lib.check_depth_exponent(depth_exponent)
    p = parameterization_lib.get(parameterization)
    d, hidden = width, mlp_ratio * width
    # L: every PC layer, the readout included.
    num_layers = (2 * blocks if pc_layer == "sublayer" else blocks) + 2
    self.pc_layer = pc_layer
    self.layer_norm = layer_norm
    self.heads = heads
    self.activation = activation
    self.parameterization = parameterization
    self.depth_exponent = depth_exponent
    self.precision = precision
    layer = lambda role, fan_in, out, stack=None: Dense(
        fan_in, out, rngs=rngs, stack=stack, precision=precision,
        **p.layer_options(role, fan_in, out, num_layers, depth_exponent))
    self.embed = layer("entry", entry_features, d)
    self.attention_qkv = layer("inner", d, 3 * d, blocks)
    self.attention_out = layer("residual", d, d, blocks)
    self.mlp_up = layer("inner", d, hidden, blocks)
    self.mlp_down = layer("residual", hidden, d, blocks)
    self.head = layer("readout", d, out_features)
    self.logit_scale = Premultiplier(jnp.asarray(p.attention_scale(d // heads), jnp.float32))

  @property
  def blocks(self) -> int:
    return self.attention_qkv.kernel.shape[0]

  @property
  def hidden_layers(self) -> int:
    return 1 + (2 if self.pc_layer == "sublayer" else 1) * self.blocks

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
    """One tuple of the residual layers' weights, bottom to top: 2R
    ``AttentionLayer`` and ``MLPLayer`` alternating, or R ``BlockLayer``;
    kernels in ``dtype`` (default that of the products)."""
    del stage
    dtype = dtype or PRECISIONS[self.precision][0]
    layers = []
    for r in range(self.blocks):
      attention = AttentionLayer(self.attention_qkv.kernel[r].astype(dtype),
                                 self.attention_qkv.multiplier[r],
                                 self.attention_out.kernel[r].astype(dtype),
                                 self.attention_out.multiplier[r])
      mlp = MLPLayer(self.mlp_up.kernel[r].astype(dtype), self.mlp_up.multiplier[r],
                     self.mlp_down.kernel[r].astype(dtype), self.mlp_down.multiplier[r])
      layers += [attention, mlp] if self.pc_layer == "sublayer" else [BlockLayer(attention, mlp)]
    return (tuple(layers),)

  def residual_branch(self, stage: int, weights, h):
    """The branches G_ℓ(z_{ℓ−1}) of the layers ``weights`` holds (sliced to
    them), for their inputs ``h``: a tuple of [B, T, d] (one per layer), or
    an array [S, B, T, d]."""
    del stage
    (layers,) = weights
    outputs = tuple(self._branch(layer, h[i]) for i, layer in enumerate(layers))
    return outputs if isinstance(h, tuple) else jnp.stack(outputs) if outputs else h

  def _norm(self, z: jax.Array) -> jax.Array:
    return layer_norm(z) if self.layer_norm else z

  def _branch(self, layer, z: jax.Array) -> jax.Array:
    if isinstance(layer, BlockLayer):  # the block's attention, then its MLP on the result
      attended = self._branch(layer.attention, z)
      return attended + self._branch(layer.mlp, z + attended)
    precision = PRECISIONS[self.precision][1]
    normed = self._norm(z)
    if isinstance(layer, MLPLayer):
      hidden = ACTIVATIONS[self.activation](layer.inner * matmul(normed, layer.up, self.precision))
      return layer.outer * matmul(hidden, layer.down, self.precision)
    batch, tokens, width = z.shape
    qkv = layer.inner * matmul(normed, layer.qkv, self.precision)
    q, k, v = jnp.split(qkv.reshape(batch, tokens, 3 * self.heads, width // self.heads), 3, axis=2)
    logits = self.logit_scale[...] * jnp.einsum("bqhc,bkhc->bhqk", q, k, precision=precision,
                                                preferred_element_type=jnp.float32)
    if self.causal:  # a token attends to itself and the tokens before it
      logits = jnp.where(jnp.tril(jnp.ones((tokens, tokens), bool)), logits, -jnp.inf)
    mixed = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v, precision=precision,
                       preferred_element_type=jnp.float32)
    return layer.outer * matmul(mixed.reshape(batch, tokens, width), layer.out, self.precision)

  def readout(self, h: jax.Array) -> jax.Array:
    """μ_L from the top activity [B, T, d]: layer norm (if on), mean over tokens, the head."""
    return self.head(jnp.mean(self._norm(h), axis=1))

  def weight_stacks(self, params) -> list[jax.Array]:
    """The weights of each PC layer bottom to top, flattened, each with a
    leading axis of one: the embedding, then per block its attention layer
    (W_q, W_k, W_v, W_o) and its MLP layer (W_1, W_2), or the block's one
    layer (all six), then the head."""
    params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    flat = lambda *arrays: jnp.concatenate([jnp.ravel(a) for a in arrays])[None]
    out = [params["embed"]["kernel"].reshape(1, -1)]
    for r in range(params["attention_qkv"]["kernel"].shape[0]):
      attention = params["attention_qkv"]["kernel"][r], params["attention_out"]["kernel"][r]
      mlp = params["mlp_up"]["kernel"][r], params["mlp_down"]["kernel"][r]
      out += [flat(*attention), flat(*mlp)] if self.pc_layer == "sublayer" else [flat(*attention, *mlp)]
    return out + [params["head"]["kernel"].reshape(1, -1)]

  def feedforward(self, x: jax.Array) -> jax.Array:
    """The feed-forward pass: activities [H, B, T, d], z_ℓ = μ_ℓ."""
    from mupc_flax.pc import forward  # the engine imports the networks' layers
    return forward.feedforward(self, x)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Feed-forward prediction μ_L for inputs x: [B, C] for images [B, H·W·C]
    (the causal transformer: [B, T, V] for token ids [B, T])."""
    from mupc_flax.pc import forward
    return forward.predict(self, x)


def make_network(spec, *, width: int = 64, blocks: int = 4, patch_size: int = 7, heads: int = 4,
                 mlp_ratio: int = 4, activation: str = "gelu", parameterization: str = "mupc",
                 depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
                 precision: str = "float32", pc_layer: str = "sublayer", layer_norm: bool = True,
                 rngs: nnx.Rngs) -> TransformerPCN:
  """The vision transformer for images of ``spec``, ``blocks`` (attention,
  MLP) pairs of width d = ``width``, a PC layer per sublayer or per block."""
  if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
    raise ValueError(f"width ({width}) must be a multiple of heads ({heads}): choose heads that "
                     "divide it.")
  return TransformerPCN(spec.image_shape, patch_size, width, blocks, spec.num_classes, heads=heads,
                        mlp_ratio=mlp_ratio, activation=activation,
                        parameterization=parameterization, depth_exponent=depth_exponent,
                        precision=precision, pc_layer=pc_layer, layer_norm=layer_norm, rngs=rngs)


# The depth of a transformer is its blocks.
KIND = kinds.NetworkKind(make=make_network, smoke=dict(width=16, blocks=1, heads=2),
                         depth_field="blocks")
