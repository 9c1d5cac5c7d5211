"""Parameterisations: the premultipliers and weight initialisation of each.

A parameterisation is one row of the table in ``PARAMETERIZATIONS``. For a
network with input dimension ``D``, width ``N`` and ``L = H + 1`` weight
matrices, each row gives the three premultipliers

    μ_1 = a_1 · W_1 x,   μ_ℓ = a_ℓ · W_ℓ φ(z_{ℓ-1}) + z_{ℓ-1},   μ_L = a_L · W_L φ(z_H)

and the distribution every weight matrix is drawn from. Adding a
parameterisation (for example an output scaling γ on ``a_L``) means adding one
row here; nothing else in the library changes.
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

# (key, shape, fan_in) -> array. ``shape`` may carry a leading layer axis.
Initializer = Callable[[jax.Array, tuple[int, ...], int], jax.Array]
# (D, N, L) -> premultiplier.
Multiplier = Callable[[int, int, int], float]


def uniform_fan_in(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """U(±1/√fan_in): the PyTorch / Equinox default for linear layers."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def standard_normal(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """N(0, 1), independent of fan-in: the premultipliers do the scaling."""
  del fan_in
  return jax.random.normal(key, shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Parameterization:
  """Premultipliers (as functions of D, N, L) and the weight initialiser."""

  input_multiplier: Multiplier
  hidden_multiplier: Multiplier
  readout_multiplier: Multiplier
  init: Initializer


PARAMETERIZATIONS: dict[str, Parameterization] = {
    # Standard PC: plain residual network, PyTorch-default init.
    "sp": Parameterization(
        input_multiplier=lambda d, n, l: 1.0,
        hidden_multiplier=lambda d, n, l: 1.0,
        readout_multiplier=lambda d, n, l: 1.0,
        init=uniform_fan_in,
    ),
    # μPC: Depth-μP premultipliers on an N(0, 1) init.
    "mupc": Parameterization(
        input_multiplier=lambda d, n, l: 1.0 / math.sqrt(d),
        hidden_multiplier=lambda d, n, l: 1.0 / math.sqrt(n * l),
        readout_multiplier=lambda d, n, l: 1.0 / n,
        init=standard_normal,
    ),
}


def get(name: str) -> Parameterization:
  """The parameterisation called ``name``, with a clear error for unknown names."""
  try:
    return PARAMETERIZATIONS[name]
  except KeyError:
    raise ValueError(
        f"Unknown parameterization {name!r}; choose one of "
        f"{sorted(PARAMETERIZATIONS)} (or add a row to "
        "mupc_flax.parameterization.PARAMETERIZATIONS)."
    ) from None
