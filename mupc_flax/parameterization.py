"""Parameterisations: the premultipliers and weight initialisation of each.

A parameterisation is one row of the table in ``PARAMETERIZATIONS``. Every
weight layer has a role and a fan-in: an *entry* layer predicts without a
skip (the input layer of the dense network; the stem and the downsampling
convolutions of the convolutional one; the patch embedding of the
transformer), a *residual* layer predicts through an identity skip, and the
*readout* predicts the output. For the dense network with input dimension
``D``, width ``N`` and ``L = H + 1`` weight matrices this is

    μ_1 = a_1 · W_1 x,   μ_ℓ = a_ℓ · W_ℓ φ(z_{ℓ-1}) + z_{ℓ-1},   μ_L = a_L · W_L φ(z_H)

with fan-ins D, N and N. A convolution's fan-in is C_in·k·k, and L counts
every weight layer (every PC layer, for the transformer). A transformer's
residual branch has matrices *inside* it too (attention's query, key and
value maps, the MLP's first matrix): an ``inner`` premultiplier scales those,
and ``attention_scale`` the attention logits q·k.

Each row gives the premultiplier of each role as a function of (fan-in, L),
the distribution every weight is drawn from, and the factors by which the
weight optimiser's learning rate and Adam's ε are scaled per role (used
when ``config.train.optimizer_scaling`` asks for them). Under μPC the residual
branch scales as 1/√fan_in · L^(−α) with the depth exponent α: the paper's
Depth-μP is α = 1/2 (1/√(fan_in·L)); CompleteP (Dey et al., NeurIPS 2025) is
α = 1. Adding a parameterisation (for example an output scaling γ on
``a_L``) means adding one row here; nothing else in the library changes.
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
# (fan_in, L, α) -> premultiplier of a residual branch.
ResidualMultiplier = Callable[[int, int, float], float]

# (role, fan_in, fan_out, L, α) -> (learning-rate factor, Adam ε factor).
OptimizerScale = Callable[[str, int, int, int, float], tuple[float, float]]

# α of the paper (Depth-μP).
DEPTH_EXPONENT = 0.5
ROLES = ("entry", "residual", "readout", "inner")


def uniform_fan_in(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """U(±1/√fan_in): the PyTorch / Equinox default for linear layers."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, (math.prod(shape),), jnp.float32, -bound, bound).reshape(shape)


def standard_normal(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
  """N(0, 1), independent of fan-in: the premultipliers do the scaling."""
  del fan_in
  return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


def _check_role(role: str) -> None:
  if role not in ROLES:
    raise ValueError(f"Unknown weight role {role!r}; choose entry, residual, readout or inner.")


def _unscaled(role: str, fan_in: int, fan_out: int, num_layers: int,
              depth_exponent: float) -> tuple[float, float]:
  """No per-role scaling: every weight at the optimizer's η and ε."""
  _check_role(role)
  return 1.0, 1.0


@dataclasses.dataclass(frozen=True)
class Parameterization:
  """Premultipliers by role (as functions of the layer's fan-in, L and, for
  residual branches, the depth exponent α) and the weight initialiser."""

  entry_multiplier: Multiplier
  residual_multiplier: ResidualMultiplier
  readout_multiplier: Multiplier
  inner_multiplier: Callable[[int], float]  # fan_in -> premultiplier, inside a branch
  attention_scale: Callable[[int], float]  # head dimension -> logit scale
  init: Initializer
  optimizer_scale: OptimizerScale = _unscaled

  def multiplier(self, role: str, fan_in: int, num_layers: int,
                 depth_exponent: float = 0.5) -> float:
    """The premultiplier of a weight by its ``role``: "entry", "residual"
    (the last matrix of a residual branch, scaled with depth), "readout" or
    "inner" (a matrix inside a branch); ``num_layers`` is L, every PC layer
    the readout included."""
    _check_role(role)
    if role == "entry":
      return self.entry_multiplier(fan_in, num_layers)
    if role == "residual":
      return self.residual_multiplier(fan_in, num_layers, depth_exponent)
    if role == "readout":
      return self.readout_multiplier(fan_in, num_layers)
    return self.inner_multiplier(fan_in)

  def layer_options(self, role: str, fan_in: int, fan_out: int, num_layers: int,
                    depth_exponent: float = 0.5) -> dict:
    """What a layer of ``role`` is built with: its premultiplier, its
    weights' optimizer scale (learning-rate and ε factors) and initialiser,
    as keyword arguments of ``layers.Dense`` (and the convolutional ``Conv``)."""
    return dict(multiplier=self.multiplier(role, fan_in, num_layers, depth_exponent),
                optimizer_scale=self.optimizer_scale(role, fan_in, fan_out, num_layers,
                                                     depth_exponent),
                init=self.init)


def mupc_optimizer_scale(role: str, fan_in: int, fan_out: int, num_layers: int,
                         depth_exponent: float) -> tuple[float, float]:
  """Adam's (learning-rate, ε) factors per role under μPC, in this form.

  CompleteP (Dey et al. 2025, α = 1) and Depth-μP (α = 1/2) write their
  rules for weights drawn with variance 1/fan_in and a residual factor
  L^(−α): hidden matrices at lr η/N · L^(α−1) and ε ε/(N · L^α), the
  embedding and the readout at lr η and ε ε/N (the limits paper's
  transformer recipe, α = 1). Here weights are N(0, 1) behind a
  premultiplier a = 1/√N of the width (the depth factor is the same in
  both), and Adam's step on W is a times the effective weight's: the
  learning rate of a hidden matrix is divided by a and its ε multiplied
  by it. N is the fan-in of a residual, inner or readout matrix and the
  fan-out (the width it embeds into) of an entry matrix.
  """
  _check_role(role)
  if role == "entry":
    return 1.0, 1.0 / fan_out
  if role == "readout":
    return 1.0, 1.0 / fan_in
  return (fan_in ** -0.5 * num_layers ** (depth_exponent - 1),
          fan_in ** -1.5 * num_layers ** -depth_exponent)


PARAMETERIZATIONS: dict[str, Parameterization] = {
    # Standard PC: plain residual network, PyTorch-default init, 1/√d_head logits.
    # No depth scaling: α has no effect.
    "sp": Parameterization(
        entry_multiplier=lambda fan_in, l: 1.0,
        residual_multiplier=lambda fan_in, l, alpha: 1.0,
        readout_multiplier=lambda fan_in, l: 1.0,
        inner_multiplier=lambda fan_in: 1.0,
        attention_scale=lambda head_dim: 1.0 / math.sqrt(head_dim),
        init=uniform_fan_in,
    ),
    # μPC: Depth-μP premultipliers on an N(0, 1) init (dense: 1/√D, 1/√(N·L), 1/N).
    # Inside a branch, μP: 1/√fan_in, and 1/d_head on attention logits (Yang et
    # al., "Tensor Programs V", 2022: q·k grows like d_head once q and k align).
    "mupc": Parameterization(
        entry_multiplier=lambda fan_in, l: 1.0 / math.sqrt(fan_in),
        residual_multiplier=lambda fan_in, l, alpha: 1.0 / (math.sqrt(fan_in) * l ** alpha),
        readout_multiplier=lambda fan_in, l: 1.0 / fan_in,
        inner_multiplier=lambda fan_in: 1.0 / math.sqrt(fan_in),
        attention_scale=lambda head_dim: 1.0 / head_dim,
        init=standard_normal,
        optimizer_scale=mupc_optimizer_scale,
    ),
}
"""The parameterisations by name: ``"sp"`` (standard PC) and ``"mupc"`` (μPC: Depth-μP
premultipliers on N(0, 1) weights, μP inside the branches)."""


def check_depth_exponent(depth_exponent: float) -> None:
  """Raises ValueError unless α is in [0, 1] (1/2: Depth-μP, 1: CompleteP)."""
  if not isinstance(depth_exponent, (int, float)) or not 0 <= depth_exponent <= 1:
    raise ValueError(f"depth_exponent must be in [0, 1] (the paper: 0.5; CompleteP: 1), got "
                     f"{depth_exponent!r}.")


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
