"""Building blocks of the built-in networks: activations, product precisions,
premultiplied dense layers and the residual products over a layer axis.

A network of your own may use them (``examples/mixer.py`` does) or not: the
engine sees a network only through ``networks.protocol.PCNetwork``.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mupc_flax import parameterization as parameterization_lib

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,  # tanh approximation, jax's default
}
"""The activity functions φ by name (``activation=`` of the networks): linear, relu, tanh, gelu."""

# The precision of the products: the dtype the residual products take their
# inputs in, and the precision XLA runs every product at (accumulation is
# float32 throughout). "float32" is true float32 everywhere. "tf32" is XLA's
# default, which on NVIDIA GPUs (Ampere on) runs float32 products on TF32
# tensor cores (10-bit mantissa inputs) and on CPU is float32. "bfloat16"
# also stores the residual products' inputs in bfloat16.
PRECISIONS = {
    "float32": (jnp.float32, jax.lax.Precision.HIGHEST),
    "tf32": (jnp.float32, jax.lax.Precision.DEFAULT),
    "bfloat16": (jnp.bfloat16, jax.lax.Precision.DEFAULT),
}


def matmul(h: jax.Array, kernel: jax.Array, precision: str = "float32") -> jax.Array:
  """h [B, in] @ kernel [in, out] in the kernel's dtype, accumulated in float32,
  at the XLA precision of ``precision`` (a key of ``PRECISIONS``)."""
  return jnp.matmul(h.astype(kernel.dtype), kernel, precision=PRECISIONS[precision][1],
                    preferred_element_type=jnp.float32)


def residual_product(kernels, multipliers: jax.Array, h, precision: str = "float32",
                     op: Callable = matmul):
  """``multipliers[s] · op(h[s], kernels[s], precision)`` for each layer s.

  Either layout: ``h`` [S, B, ...] with ``kernels`` [S, ...] (one batched
  operation over the layer axis), or tuples of S inputs [B, ...] and S kernels
  (one operation each). ``op`` is the layer's linear map (``matmul``, or a
  convolution), accumulating in float32 whatever the kernels' dtype. Pass
  kernels already sliced to the layers wanted: a slice taken inside a
  compiled loop can cost a copy per iteration.
  """
  if isinstance(h, tuple):
    return tuple(multipliers[i] * op(h[i], kernels[i], precision) for i in range(len(h)))
  if not len(h):
    return h
  scale = multipliers.reshape(multipliers.shape + (1,) * (h.ndim - 1))
  if op is matmul:  # one batched product
    return scale * matmul(h, kernels, precision)
  return scale * jax.vmap(lambda h, kernel: op(h, kernel, precision))(h, kernels)


class Premultiplier(nnx.Variable):
  """A fixed factor in front of a layer's matrix product (a_ℓ of μPC).

  Its own variable type: not an ``nnx.Param``, so optimisers built with
  ``wrt=nnx.Param`` never update it, yet it is part of ``nnx.state(model)``
  and therefore of every checkpoint.
  """


def weight(value: jax.Array, optimizer_scale: tuple[float, float] | None = None) -> nnx.Param:
  """A weight ``nnx.Param``; ``optimizer_scale`` (learning-rate factor, Adam ε
  factor), from ``Parameterization.optimizer_scale``, rides along as its
  ``lr_scale`` and ``eps_scale`` metadata for the per-role weight optimizer
  (``train.weight_optimizer``)."""
  if optimizer_scale is None:
    return nnx.Param(value)
  lr_scale, eps_scale = optimizer_scale
  return nnx.Param(value, lr_scale=float(lr_scale), eps_scale=float(eps_scale))


class Dense(nnx.Module):
  """``multiplier · x @ kernel``, no bias, at the XLA precision of ``precision``.

  Plain: kernel [in, out], multiplier [], x [..., in] -> [..., out].
  With ``stack=S``: S independent maps, kernel [S, in, out], multiplier [S],
  x [S, B, in] -> [S, B, out] (one batched product). ``optimizer_scale``:
  see ``weight``; ``Parameterization.layer_options`` gives it with the
  multiplier and the initialiser.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      multiplier: float,
      init: parameterization_lib.Initializer,
      rngs: nnx.Rngs,
      stack: int | None = None,
      precision: str = "float32",
      optimizer_scale: tuple[float, float] | None = None,
  ):
    lead = () if stack is None else (stack,)
    self.kernel = weight(init(rngs.params(), lead + (in_features, out_features), in_features),
                         optimizer_scale)
    self.multiplier = Premultiplier(jnp.full(lead, multiplier, jnp.float32))
    self.precision = precision

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.multiplier[...]
    product = jnp.matmul(x, self.kernel[...], precision=PRECISIONS[self.precision][1])
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) * product


def check_options(activation: str, precision: str) -> None:
  """Raises ValueError for an activation or a precision that does not exist
  (the options every built-in network takes)."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}.")


