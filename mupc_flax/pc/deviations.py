"""Where inference starts, and the errors as deviations from there.

The engine tracks the activities as deviations δ = z − z⁰ from their start
and the errors as e_ℓ = e⁰_ℓ + δ_ℓ − δ_{ℓ-1} − a_ℓ (φ(z_{ℓ-1}) − φ(z⁰_{ℓ-1})) W_ℓ.
This is the same function, but at the feed-forward start e⁰ = 0 by definition
rather than by cancellation of rounded numbers: layers the inference signal
has not reached keep an error of exactly zero (and get exactly zero weight
gradient), and small activity changes keep full relative precision.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mupc_flax.pc import forward, layouts
from mupc_flax.pc.descent import Problem
from mupc_flax.pc.energy import Network
from mupc_flax.pc.options import Plan


def feedforward_stages(model: Network, x: jax.Array, plan: Plan) -> tuple:
  """The feed-forward start, per stage. Written out per layer where
  inference holds layers per layer or unrolls: on XLA's CPU runtime, a loop
  followed by more work (here, the inference loops) runs slower."""
  return forward.as_stages(forward.feedforward(model, x, unrolled=plan.unrolled))


class Start(NamedTuple):
  """Where inference starts, per stage in the plan's layout: activities z⁰,
  φ(z⁰), and the errors there (None at the feed-forward start, where they
  are zero by definition). For a network of general branches, also what
  each residual branch and each stage's entry predict there (``branch``:
  per stage, the branches of layers 1… of the stage; ``entry``: per stage,
  None for the first); None in closed form. ``weights``: per stage, the
  residual weights in the plan's layout."""

  z: tuple
  phi: tuple
  errors: tuple | None
  branch: tuple | None
  entry: tuple | None
  weights: tuple


class Upper(NamedTuple):
  """The layers a phase of inference updates: hidden layer ``index`` of stage
  ``stage`` and every layer above it. ``bottom_shift`` [B, ...]: how far the
  prediction of the lowest of them has moved, which depends only on the
  layers below (fixed while these are updated). ``weights``: their residual
  weights, per stage from ``stage`` up (the first sliced from ``index``)."""

  stage: int
  index: int
  bottom_shift: jax.Array
  weights: tuple


def start(problem: Problem, stages: tuple, errors: tuple | None) -> Start:
  """The start from activities ``stages`` (per stage) with ``errors`` there
  (None: the feed-forward start)."""
  model, plan = problem.model, problem.plan
  arrange = lambda arrays: layouts.arrange_each(arrays, plan.per_layer)
  # The barrier makes XLA compute z⁰, φ(z⁰) (and, for general branches, what
  # the branches predict from them) once. Otherwise it may recompute them
  # inside the fusions that use them, rounded differently (seen: one ulp),
  # and a layer whose input has not moved would see its prediction move.
  stages, phi = jax.lax.optimization_barrier((stages, tuple(model.phi(z) for z in stages)))
  stages, phi = arrange(stages), arrange(phi)
  branch = entry = None
  weights = forward.residual_weights(model, plan.per_layer)
  if not plan.closed_form:
    branch = tuple(model.residual_branch(s, weights[s], h[:-1]) for s, h in enumerate(phi))
    entry = (None,) + tuple(model.entry(s, phi[s - 1][-1]) for s in range(1, len(phi)))
    branch, entry = jax.lax.optimization_barrier((branch, entry))
  return Start(stages, phi, None if errors is None else arrange(errors), branch, entry, weights)


def whole(start: Start) -> Upper:
  """Every hidden layer: the bottom's prediction (a_1 W_1 x) never moves."""
  return Upper(0, 0, jnp.zeros_like(start.z[0][0]), start.weights)


def moved(closed_form: bool, f: Callable, h, h0, f_h0=None, layers: bool = True):
  """How far the prediction f(h) has moved from f(h⁰).

  A linear map of φ, in closed form (``closed_form``): f(h − h⁰), exactly zero
  where h = h⁰ and of full relative precision for small changes. A general
  map: f(h) − f(h⁰) with f(h⁰) = ``f_h0`` from the start, set to exactly
  zero for every sample whose input has not changed (elsewhere it carries
  the rounding of f). ``h`` holds layers (``layers``: a tuple of [B, ...]
  or an array [S, B, ...]) or is one [B, ...] array.
  """
  if closed_form:
    return f(jax.tree.map(jnp.subtract, h, h0))
  first = 2 if layers and not isinstance(h, tuple) else 1  # the axes after the sample axis
  same = jax.tree.map(lambda a, b: jnp.all(a == b, axis=tuple(range(first, a.ndim)), keepdims=True),
                      h, h0)
  shift = jax.tree.map(jnp.subtract, f(h), f_h0)
  # Zeroed in value only (m − m = 0 exactly): the gradient still flows through
  # f, as it must at the wavefront's edge, where h = h⁰ but the error above is not zero.
  return jax.tree.map(lambda same, m: m - jax.lax.stop_gradient(jnp.where(same, m, 0.0)),
                      same, shift)


def errors_from(problem: Problem, start: Start, delta: tuple, upper: Upper) -> tuple[tuple, tuple]:
  """Errors and φ(z) of the ``upper`` layers at their deviations ``delta``
  (per stage from ``upper.stage`` up, the first sliced from ``upper.index``).
  Returns (errors, φ), per stage as ``delta``."""
  model, closed_form = problem.model, problem.plan.closed_form
  errors, phis = [], []
  shift = upper.bottom_shift
  for i, s in enumerate(range(upper.stage, len(start.z))):
    low = upper.index if i == 0 else 0
    d, z0, phi0 = delta[i], start.z[s][low:], start.phi[s][low:]
    phi = jax.tree.map(lambda z, v: model.phi(z + v), z0, d)
    if i:  # the stage's entry layer, predicted from the top of the stage below
      shift = moved(closed_form, lambda h, s=s: model.entry(s, h), phis[-1][-1],
                    start.phi[s - 1][-1], None if start.entry is None else start.entry[s],
                    layers=False)
    branch_shift = moved(closed_form, lambda h, s=s, w=upper.weights[i]: model.residual_branch(s, w, h),
                         phi[:-1], phi0[:-1], None if start.branch is None else start.branch[s][low:])
    shifts = layouts.join(layouts.single(shift, d), jax.tree.map(jnp.add, branch_shift, d[:-1]))
    e = jax.tree.map(jnp.subtract, d, shifts)
    if start.errors is not None:
      e = jax.tree.map(jnp.add, e, start.errors[s][low:])
    errors.append(e)
    phis.append(phi)
  return tuple(errors), tuple(phis)


def bottom_shift(problem: Problem, start: Start, delta: tuple, stage: int,
                 index: int) -> jax.Array:
  """How far the prediction of layer (``stage``, ``index``) has moved at the
  deviations ``delta`` (every layer), through the layer below it."""
  model, closed_form, weights = problem.model, problem.plan.closed_form, start.weights
  if index:  # a residual layer: its skip and its branch
    below = delta[stage][index - 1]
    h = layouts.single(model.phi(start.z[stage][index - 1] + below), delta[stage])
    h0 = start.phi[stage][index - 1:index]
    branch = tuple(w[index - 1:index] for w in weights[stage])
    shift = moved(closed_form, lambda h: model.residual_branch(stage, branch, h), h, h0,
                  None if start.branch is None else start.branch[stage][index - 1:index])
    return shift[0] + below
  if stage:  # a stage's entry layer, from the top of the stage below
    h = model.phi(start.z[stage - 1][-1] + delta[stage - 1][-1])
    return moved(closed_form, lambda h: model.entry(stage, h), h, start.phi[stage - 1][-1],
                 None if start.entry is None else start.entry[stage], layers=False)
  return jnp.zeros_like(start.z[0][0])  # the input projection a_1 W_1 x never moves


def start_errors(problem: Problem, stages: tuple) -> tuple:
  """The errors e_ℓ = z_ℓ − μ_ℓ at activities ``stages`` (per stage)."""
  predictions = forward.predictions(problem.model, stages, problem.x)
  return tuple(z - mu for z, mu in zip(stages, predictions))
