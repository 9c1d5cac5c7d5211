"""Parameterisations: the premultipliers and weight initialisation of each.

A parameterisation is one row of the table in ``PARAMETERIZATIONS``. Every
weight layer has a role and a fan-in: an *entry* layer predicts without a
skip (the input layer of the dense network; the stem and the downsampling
convolutions of the convolutional one), a *residual* layer predicts through
an identity skip, and the *readout* predicts the output. For the dense
network with input dimension ``D``, width ``N`` and ``L = H + 1`` weight
matrices this is

    μ_1 = a_1 · W_1 x,   μ_ℓ = a_ℓ · W_ℓ φ(z_{ℓ-1}) + z_{ℓ-1},   μ_L = a_L · W_L φ(z_H)

with fan-ins D, N and N. A convolution's fan-in is C_in·k·k, and L counts
every weight layer. Each row gives the premultiplier of each role as a
function of (fan-in, L) and the distribution every weight is drawn from.
Adding a parameterisation (for example an output scaling γ on ``a_L``) means
adding one row here; nothing else in the library changes.
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

# (key, shape, fan_in) -> array. ``shape`` may carry a leading layer axis.
# The initialisers draw a flat vector and reshape it: the same numbers (threefry
# is counter-based), but XLA compiles the draw of a 4- or 5-axis shape in about
# 1–3 s on a CPU, against 0.25 s for a flat one, and every new shape compiles.
Initializer = Callable[[jax.Array, tuple[int, ...], int], jax.Array]
# (fan_in, L) -> premultiplier.
Multiplier = Callable[[int, int], float]


def uniform_fan_in(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """U(±1/√fan_in): the PyTorch / Equinox default for linear layers."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, (math.prod(shape),), jnp.float32, -bound, bound).reshape(shape)


def standard_normal(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """N(0, 1), independent of fan-in: the premultipliers do the scaling."""
  del fan_in
  return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Parameterization:
  """Premultipliers by role (as functions of the layer's fan-in and L) and the
  weight initialiser."""

  entry_multiplier: Multiplier
  residual_multiplier: Multiplier
  readout_multiplier: Multiplier
  init: Initializer


PARAMETERIZATIONS: dict[str, Parameterization] = {
    # Standard PC: plain residual network, PyTorch-default init.
    "sp": Parameterization(
        entry_multiplier=lambda fan_in, l: 1.0,
        residual_multiplier=lambda fan_in, l: 1.0,
        readout_multiplier=lambda fan_in, l: 1.0,
        init=uniform_fan_in,
    ),
    # μPC: Depth-μP premultipliers on an N(0, 1) init (dense: 1/√D, 1/√(N·L), 1/N).
    "mupc": Parameterization(
        entry_multiplier=lambda fan_in, l: 1.0 / math.sqrt(fan_in),
        residual_multiplier=lambda fan_in, l: 1.0 / math.sqrt(fan_in * l),
        readout_multiplier=lambda fan_in, l: 1.0 / fan_in,
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
