"""The residual predictive coding network, as a Flax NNX module.

Shapes: x [B, D] inputs, z [H, B, N] hidden activities (layer axis first),
outputs [B, C]. Layers are indexed from 0 in code: ``z[0]`` is z_1 of the
paper and ``hidden.kernel[k]`` maps ``z[k]`` to the prediction of ``z[k+1]``.
"""

from typing import Callable, Literal

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

HiddenProducts = Literal["batched", "per_layer"]


class Premultiplier(nnx.Variable):
  """A fixed factor in front of a layer's matrix product (a_ℓ of μPC).

  Its own variable type: not an ``nnx.Param``, so optimisers built with
  ``wrt=nnx.Param`` never update it, yet it is part of ``nnx.state(model)``
  and therefore of every checkpoint.
  """


class Dense(nnx.Module):
  """``multiplier · x @ kernel``, no bias.

  Plain: kernel [in, out], multiplier [], x [..., in] -> [..., out].
  With ``stack=S``: S independent maps, kernel [S, in, out], multiplier [S],
  x [S, B, in] -> [S, B, out] (one batched product).
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
  ):
    lead = () if stack is None else (stack,)
    self.kernel = nnx.Param(init(rngs.params(), lead + (in_features, out_features), in_features))
    self.multiplier = Premultiplier(jnp.full(lead, multiplier, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.multiplier[...]
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) * jnp.matmul(x, self.kernel[...])


class ResidualPCN(nnx.Module):
  """Fully connected residual PCN: input layer, H−1 residual layers, readout.

    μ_1 = a_1 W_1 x,  μ_ℓ = a_ℓ W_ℓ φ(z_{ℓ-1}) + z_{ℓ-1} (ℓ = 2…H),  μ_L = a_L W_L φ(z_H)

  Args:
    in_features: D, the flattened input size.
    width: N, the size of every hidden layer.
    hidden_layers: H ≥ 1, the number of hidden (free) layers; the network has
      L = H + 1 weight matrices.
    out_features: C, the output size.
    activation: a key of ``ACTIVATIONS``.
    parameterization: a key of ``parameterization.PARAMETERIZATIONS``.
    hidden_products: how the stacked residual layers are applied: "batched"
      (one batched matrix product over the layer axis) or "per_layer" (a loop
      of 2-D products). Same result; the fastest depends on the backend.
    rngs: supplies the ``params`` key for the weight initialisation.
  """

  def __init__(
      self,
      in_features: int,
      width: int,
      hidden_layers: int,
      out_features: int,
      *,
      activation: str = "relu",
      parameterization: str = "mupc",
      hidden_products: HiddenProducts = "batched",
      rngs: nnx.Rngs,
  ):
    for name, value in [("in_features", in_features), ("width", width),
                        ("hidden_layers", hidden_layers), ("out_features", out_features)]:
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ResidualPCN needs {name} to be a positive integer, got {value!r}.")
    if activation not in ACTIVATIONS:
      raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    if hidden_products not in ("batched", "per_layer"):
      raise ValueError(f"hidden_products must be 'batched' or 'per_layer', got {hidden_products!r}.")
    p = parameterization_lib.get(parameterization)
    d, n, num_matrices = in_features, width, hidden_layers + 1
    self.activation = activation
    self.parameterization = parameterization
    self.hidden_products = hidden_products
    self.input_layer = Dense(d, n, multiplier=p.input_multiplier(d, n, num_matrices), init=p.init, rngs=rngs)
    self.hidden = Dense(n, n, multiplier=p.hidden_multiplier(d, n, num_matrices), init=p.init,
                        rngs=rngs, stack=hidden_layers - 1)
    self.readout = Dense(n, out_features, multiplier=p.readout_multiplier(d, n, num_matrices),
                         init=p.init, rngs=rngs)

  @property
  def hidden_layers(self) -> int:
    return self.hidden.kernel.shape[0] + 1

  @property
  def width(self) -> int:
    return self.input_layer.kernel.shape[1]

  def phi(self, z: jax.Array) -> jax.Array:
    """The activation φ."""
    return ACTIVATIONS[self.activation](z)

  def residual(self, h: jax.Array, first: int = 0) -> jax.Array:
    """The residual branch a_ℓ h W_ℓ of layers ``first+1 … first+S``.

    Args:
      h: [S, B, N], activated inputs φ(z) (or differences of them) of hidden
        layers ``first … first+S-1``.
      first: index of the layer ``h[0]`` comes from (static).

    Returns:
      [S, B, N]: ``a[first+s] · h[s] @ W[first+s]`` for each s.
    """
    s = h.shape[0]
    kernel = self.hidden.kernel[first:first + s]
    a = self.hidden.multiplier[first:first + s]
    if self.hidden_products == "per_layer":
      products = jnp.stack([h[i] @ kernel[i] for i in range(s)]) if s else h
    else:
      products = jnp.matmul(h, kernel)
    return a[:, None, None] * products

  def residual_predictions(self, z: jax.Array, first: int = 0) -> jax.Array:
    """Predictions [S, B, N] of layers ``first+1 … first+S`` from z [S, B, N]."""
    return self.residual(self.phi(z), first) + z

  def feedforward(self, x: jax.Array) -> jax.Array:
    """The feed-forward pass: hidden activities z [H, B, N] with z_ℓ = μ_ℓ."""
    first = self.input_layer(x)

    def layer(z, params):
      kernel, a = params
      z = a * (self.phi(z) @ kernel) + z
      return z, z

    _, rest = jax.lax.scan(layer, first, (self.hidden.kernel[...], self.hidden.multiplier[...]))
    return jnp.concatenate([first[None], rest])

  def output(self, z_top: jax.Array) -> jax.Array:
    """μ_L = a_L W_L φ(z_H) for the top hidden activity z_top [B, N] -> [B, C]."""
    return self.readout(self.phi(z_top))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Feed-forward prediction [B, C] for inputs x [B, D] (test time: no inference)."""
    return self.output(self.feedforward(x)[-1])
