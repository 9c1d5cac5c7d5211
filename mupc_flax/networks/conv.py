"""The convolutional residual PCN (a μPC ResNet), as a Flax NNX module.

Inputs x [B, H·W·C] (flattened, as the pipelines give them) are images of
``image_shape`` (H, W, C). The network is a stack of stages, one per
resolution; stage s holds 1 + R_s layers whose activities are [B, H_s, W_s, C_s]:

    stem (stage 0 entry):        μ = a · conv_stem_stride(x, W)        (no skip, no φ on x)
    downsampling (stage s entry): μ = a · conv_stride2(φ(z_top of s−1), W)  (no skip)
    residual:                    μ = a · conv(φ(z_prev), W) + z_prev   (same shape)
    readout:                     μ_L = a_L · mean_{h,w}(φ(z_top)) W_L

All convolutions are k×k with "SAME" padding and no bias. The premultipliers
come from the same parameterisation table as the dense network's, with a
convolution's fan-in C_in·k·k and L counting every weight layer. Under μPC the
weights are N(0, 1); under standard PC, U(±1/√fan_in), PyTorch's default.
With 1×1 images and 1×1 kernels this is exactly the dense ``ResidualPCN``.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mupc_flax import parameterization as parameterization_lib
from mupc_flax.networks import kinds
from mupc_flax.networks.layers import (ACTIVATIONS, PRECISIONS, Dense, Premultiplier, check_options,
                                       residual_product, weight)


def conv(h: jax.Array, kernel: jax.Array, precision: str = "float32", stride: int = 1) -> jax.Array:
  """h [B, H, W, C_in] ⊛ kernel [k, k, C_in, C_out], "SAME" padding, in the
  kernel's dtype, accumulated in float32, at the XLA precision of
  ``precision`` (a key of ``PRECISIONS``) -> [B, ⌈H/stride⌉, ⌈W/stride⌉, C_out]."""
  return jax.lax.conv_general_dilated(
      h.astype(kernel.dtype), kernel, (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=PRECISIONS[precision][1],
      preferred_element_type=jnp.float32)


class Conv(nnx.Module):
  """``multiplier · conv(x, kernel)``, no bias, at the XLA precision of ``precision``.

  kernel [k, k, in, out], multiplier []; with ``stack=S``: S independent
  convolutions, kernel [S, k, k, in, out], multiplier [S].
  """

  def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int, multiplier: float,
               init: parameterization_lib.Initializer, rngs: nnx.Rngs, stride: int = 1,
               stack: int | None = None, precision: str = "float32",
               optimizer_scale: tuple[float, float] | None = None):
    lead = () if stack is None else (stack,)
    shape = lead + (kernel_size, kernel_size, in_channels, out_channels)
    self.kernel = weight(init(rngs.params(), shape, in_channels * kernel_size ** 2),
                         optimizer_scale)
    self.multiplier = Premultiplier(jnp.full(lead, multiplier, jnp.float32))
    self.stride = stride
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.multiplier[...] * conv(x, self.kernel[...], self.precision, self.stride)


class ConvResidualPCN(nnx.Module):
  """Convolutional residual PCN: stem, stages of residual convolutions with
  strided-convolution downsampling between them, global average pooling, readout.

  Args:
    image_shape: (H, W, C) of the inputs.
    channels: C_s of each stage, e.g. (16, 32).
    residual_layers: R_s, the residual layers of each stage (one int: the
      same for every stage). Stage s has 1 + R_s hidden layers.
    out_features: C, the number of outputs.
    kernel_size: k of every convolution.
    stem_stride: the stem's stride; 2 halves the resolution of every stage
      (about 4× less work).
    activation, parameterization, depth_exponent, precision: as for ``ResidualPCN``.
    rngs: supplies the ``params`` key.
  """

  def __init__(self, image_shape: Sequence[int], channels: Sequence[int],
               residual_layers: int | Sequence[int], out_features: int, *, kernel_size: int = 3,
               stem_stride: int = 1, activation: str = "relu", parameterization: str = "mupc",
               depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
               precision: str = "float32", rngs: nnx.Rngs):
    channels = tuple(channels)
    if isinstance(residual_layers, int):
      residual_layers = (residual_layers,) * len(channels)
    residual_layers = tuple(residual_layers)
    if len(image_shape) != 3 or not all(isinstance(v, int) and v > 0 for v in image_shape):
      raise ValueError(f"ConvResidualPCN needs image_shape (H, W, C) of positive integers, got "
                       f"{image_shape!r}.")
    if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
      raise ValueError(f"ConvResidualPCN needs positive channels per stage, got {channels!r}.")
    if len(residual_layers) != len(channels) or not all(
        isinstance(r, int) and r >= 0 for r in residual_layers):
      raise ValueError(f"ConvResidualPCN needs a non-negative number of residual layers for each "
                       f"of the {len(channels)} stages, got {residual_layers!r}.")
    for name, value in [("kernel_size", kernel_size), ("stem_stride", stem_stride)]:
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    check_options(activation, precision)
    parameterization_lib.check_depth_exponent(depth_exponent)
    p = parameterization_lib.get(parameterization)
    num_layers = sum(residual_layers) + len(channels) + 1  # L: every weight layer
    self.image_shape = tuple(image_shape)
    self.activation = activation
    self.parameterization = parameterization
    self.depth_exponent = depth_exponent
    self.precision = precision
    self.linear_branches = True
    k = kernel_size
    entries, stacks = [], []
    for s, (c, r) in enumerate(zip(channels, residual_layers)):
      c_in = image_shape[2] if s == 0 else channels[s - 1]
      entries.append(Conv(c_in, c, kernel_size=k, stride=stem_stride if s == 0 else 2, rngs=rngs,
                          precision=precision,
                          **p.layer_options("entry", c_in * k * k, c, num_layers, depth_exponent)))
      stacks.append(Conv(c, c, kernel_size=k, stack=r, rngs=rngs, precision=precision,
                         **p.layer_options("residual", c * k * k, c, num_layers, depth_exponent)))
    self.entries = nnx.List(entries)  # the stem, then the downsampling convolutions
    self.stacks = nnx.List(stacks)  # the residual convolutions of each stage
    self.head = Dense(channels[-1], out_features, rngs=rngs, precision=precision,
                      **p.layer_options("readout", channels[-1], out_features, num_layers,
                                        depth_exponent))

  @property
  def hidden_layers(self) -> int:
    """All hidden (free) layers, over every stage."""
    return sum(self.stage_layers)

  @property
  def width(self) -> int:
    """Channels of the first stage."""
    return self.entries[0].kernel.shape[-1]

  def phi(self, z: jax.Array) -> jax.Array:
    """The activation φ."""
    return ACTIVATIONS[self.activation](z)

  # --- The PCNetwork protocol ------------------------------------------------------------

  @property
  def stage_layers(self) -> tuple[int, ...]:
    return tuple(1 + stack.kernel.shape[0] for stack in self.stacks)

  def entry(self, stage: int, h: jax.Array) -> jax.Array:
    """The prediction of stage ``stage``'s first layer: the stem's from x
    [B, H·W·C], a downsampling convolution's from φ of the stage below."""
    if stage == 0:
      h = h.reshape((h.shape[0],) + self.image_shape)
    return self.entries[stage](h)

  def residual_weights(self, stage: int, dtype=None) -> tuple[jax.Array, jax.Array]:
    """(kernels [R, k, k, C, C] in ``dtype``, default that of the products, multipliers [R])."""
    stack = self.stacks[stage]
    return stack.kernel[...].astype(dtype or self._dtype), stack.multiplier[...]

  def residual_branch(self, stage: int, weights, h):
    del stage
    return residual_product(*weights, h, self.precision, op=conv)

  def readout(self, h: jax.Array) -> jax.Array:
    """μ_L from φ(z_top) [B, H, W, C]: global average pooling, then the head."""
    return self.head(jnp.mean(h, axis=(1, 2)))

  @staticmethod
  def weight_stacks(params) -> list[jax.Array]:
    """Weights bottom to top with a leading layer axis: stem, stage 0's
    residual stack, downsampling 1, stage 1's stack, …, the head."""
    params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    out = []
    for s in range(len(params["entries"])):
      out += [params["entries"][s]["kernel"][None], params["stacks"][s]["kernel"]]
    return out + [params["head"]["kernel"][None]]

  @property
  def _dtype(self):
    return PRECISIONS[self.precision][0]

  def feedforward(self, x: jax.Array):
    """The feed-forward pass: per stage, activities [1 + R_s, B, H_s, W_s, C_s]
    (one stage: that array)."""
    from mupc_flax.pc import forward  # the engine imports the networks' layers
    return forward.feedforward(self, x)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Feed-forward prediction [B, C_out] for inputs x [B, H·W·C]."""
    from mupc_flax.pc import forward
    return forward.predict(self, x)


def make_network(spec, *, width: int = 16, stages: int = 3, residual_layers: int = 6,
                 kernel_size: int = 3, stem_stride: int = 1, activation: str = "relu",
                 parameterization: str = "mupc",
                 depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
                 precision: str = "float32", rngs: nnx.Rngs) -> ConvResidualPCN:
  """The convolutional network for images of ``spec``: ``stages`` resolutions
  of width·2^s channels, ``residual_layers`` residual convolutions each."""
  if not isinstance(stages, int) or stages < 1:
    raise ValueError(f"stages must be a positive integer, got {stages!r}.")
  if not isinstance(width, int) or width < 1:
    raise ValueError(f"width must be a positive integer, got {width!r}.")
  return ConvResidualPCN(spec.image_shape, tuple(width * 2**s for s in range(stages)),
                         residual_layers, spec.num_classes, kernel_size=kernel_size,
                         stem_stride=stem_stride, activation=activation,
                         parameterization=parameterization, depth_exponent=depth_exponent,
                         precision=precision, rngs=rngs)


# The depth of a convolutional network is its residual layers per stage.
KIND = kinds.NetworkKind(make=make_network, smoke=dict(width=8, residual_layers=1),
                         depth_field="residual_layers")
