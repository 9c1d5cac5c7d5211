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
from mupc_flax.model import (ACTIVATIONS, PRECISIONS, Dense, HiddenProducts, Premultiplier,
                             check_options, residual_product)


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
               stack: int | None = None, precision: str = "float32"):
    lead = () if stack is None else (stack,)
    shape = lead + (kernel_size, kernel_size, in_channels, out_channels)
    self.kernel = nnx.Param(init(rngs.params(), shape, in_channels * kernel_size ** 2))
    self.multiplier = Premultiplier(jnp.full(lead, multiplier, jnp.float32))
    self.stride = stride
    self.precision = precision
    self.inference_kernel = "xla"  # the fused Pallas step covers the dense network only

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
    activation, parameterization, depth_exponent, hidden_products, precision: as
      for ``ResidualPCN``; "auto" products are per layer on CPU, batched elsewhere.
    rngs: supplies the ``params`` key.
  """

  def __init__(self, image_shape: Sequence[int], channels: Sequence[int],
               residual_layers: int | Sequence[int], out_features: int, *, kernel_size: int = 3,
               stem_stride: int = 1, activation: str = "relu", parameterization: str = "mupc",
               depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
               hidden_products: HiddenProducts = "auto", precision: str = "float32",
               rngs: nnx.Rngs):
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
    check_options(activation, hidden_products, precision)
    parameterization_lib.check_depth_exponent(depth_exponent)
    if hidden_products == "auto":
      hidden_products = "per_layer" if jax.default_backend() == "cpu" else "batched"
    p = parameterization_lib.get(parameterization)
    num_layers = sum(residual_layers) + len(channels) + 1  # L: every weight layer
    self.image_shape = tuple(image_shape)
    self.activation = activation
    self.parameterization = parameterization
    self.depth_exponent = depth_exponent
    self.hidden_products = hidden_products
    self.precision = precision
    self.inference_kernel = "xla"  # the fused Pallas step covers the dense network only
    self.linear_branches = True
    # XLA's CPU runtime runs a convolution about 3× slower inside a while loop
    # than outside (18 vs 53 ms per inference step at 14×14×8, jax 0.10.2;
    # partial unrolling does not help): there, inference loops are unrolled.
    self.unroll_inference = jax.default_backend() == "cpu"
    # A stacked convolution is a grouped one, whose kernel gradient XLA's CPU
    # runtime computes slowly (2.2 s against 6 ms per step at 14×14×8).
    self.gradient_products = hidden_products
    k = kernel_size
    entries, stacks = [], []
    for s, (c, r) in enumerate(zip(channels, residual_layers)):
      c_in = image_shape[2] if s == 0 else channels[s - 1]
      entries.append(Conv(c_in, c, kernel_size=k, stride=stem_stride if s == 0 else 2, init=p.init,
                          rngs=rngs, multiplier=p.entry_multiplier(c_in * k * k, num_layers),
                          precision=precision))
      stacks.append(Conv(c, c, kernel_size=k, stack=r, init=p.init, rngs=rngs, precision=precision,
                         multiplier=p.residual_multiplier(c * k * k, num_layers, depth_exponent)))
    self.entries = nnx.List(entries)  # the stem, then the downsampling convolutions
    self.stacks = nnx.List(stacks)  # the residual convolutions of each stage
    self.head = Dense(channels[-1], out_features, init=p.init, rngs=rngs,
                      multiplier=p.readout_multiplier(channels[-1], num_layers), precision=precision)

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

  # --- The stage protocol (see ``model``) -----------------------------------------------

  @property
  def stage_layers(self) -> tuple[int, ...]:
    return tuple(1 + stack.kernel.shape[0] for stack in self.stacks)

  def to_stages(self, z: tuple) -> tuple:
    return tuple(z)

  def from_stages(self, stages: tuple) -> tuple:
    return tuple(stages)

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

  # ------------------------------------------------------------------------------------------

  @property
  def _dtype(self):
    return PRECISIONS[self.precision][0]

  def feedforward(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """The feed-forward pass: per stage, activities [1 + R_s, B, H_s, W_s, C_s]."""
    stages, h = [], x
    for s in range(len(self.stacks)):
      z = self.entry(s, h)
      kernels, multipliers = self.residual_weights(s)
      activities = [z]
      for k in range(len(multipliers)):  # unrolled: R is small, and XLA fuses across layers
        z = multipliers[k] * conv(self.phi(z), kernels[k], self.precision) + z
        activities.append(z)
      stages.append(jnp.stack(activities))
      h = self.phi(z)
    return tuple(stages)

  def output(self, z_top: jax.Array) -> jax.Array:
    """μ_L for the top activity [B, H, W, C] -> [B, C_out]."""
    return self.readout(self.phi(z_top))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Feed-forward prediction [B, C_out] for inputs x [B, H·W·C]."""
    return self.output(self.feedforward(x)[-1][-1])
