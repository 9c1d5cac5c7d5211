"""Inference: minimising the energy over the hidden activities, weights fixed.

From the feed-forward start z⁰, inference takes up to T steps of an
optimiser on the activities (the paper: plain gradient descent,
z ← z − β ∂F/∂z, T = H). The engine sees every network through the
``PCNetwork`` protocol: a stack of stages, each an entry layer and residual
layers of one shape; the dense network is the one-stage case. How it
computes (layout, unrolling, closed form or vector–Jacobian products, the
Pallas kernel) is the ``Plan`` of ``Inference.engine`` for the network.

It tracks the activities as deviations δ = z − z⁰ from their start and the
errors as e_ℓ = e⁰_ℓ + δ_ℓ − δ_{ℓ-1} − a_ℓ (φ(z_{ℓ-1}) − φ(z⁰_{ℓ-1})) W_ℓ.
This is the same function, but at the feed-forward start e⁰ = 0 by definition
rather than by cancellation of rounded numbers: layers the inference signal
has not reached keep an error of exactly zero (and get exactly zero weight
gradient), and small activity changes keep full relative precision. Every
optimiser keeps that exactness as long as a zero gradient with a zero state
gives a zero update, which holds for any elementwise optax transformation
whose state starts at zero (momentum, Nesterov, Adam, RMSProp, …).
"""

import dataclasses
import itertools
import math
from typing import Callable, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from mupc_flax.errors import FieldError
from mupc_flax.pc import forward, layouts, pallas_step
from mupc_flax.pc.energy import (Loss, Network, count_correct, energy_gradients, energy_terms,
                                 loss_of)
from mupc_flax.pc.options import Engine, Plan, plan

Schedule = Literal["plain", "wavefront"]
"""How inference visits the layers: every layer at every step (``"plain"``), or only those
the error signal can have reached from the feed-forward start (``"wavefront"``, same result)."""
# What inference descends on: the activities (PC) or the errors (ePC).
Method = Literal["states", "errors"]
# The inference optimisers that ``Inference.lr`` and ``momentum`` describe.
Optimizer = Literal["gd", "momentum", "nesterov"]
"""The named inference optimisers: gradient descent, heavy-ball momentum, Nesterov momentum."""


@dataclasses.dataclass(frozen=True)
class Inference:
  """How inference runs: what it descends on, the optimiser, its steps and when it stops.

  Attributes:
    steps: T, the number of steps on the free variables (the activities, or
      the errors); with a ``tolerance``, the most steps taken. None:
      ``steps_per_layer`` × H on a network of H hidden layers (the paper's
      T = H at 1), resolved once per network (``resolved``).
    method: "states" (PC, the paper: the free variables are the activities
      z) or "errors" (error-parameterised PC, Goemaere et al. 2025: the free
      variables are the errors ε, the activities follow from them by the
      error-perturbed forward pass z_ℓ = μ_ℓ(z_{ℓ−1}) + ε_ℓ, and every layer
      gets a signal at the first step; its fixed point is the same
      equilibrium). Either way the weights learn from the energy at the
      final activities.
    lr: β, the activity learning rate of the named optimisers, applied to the
      gradient of the batch *mean* energy (each sample moves by β/B times its
      own gradient). None with an optax ``optimizer``, which holds its own.
    schedule: "plain" updates every layer at every step. "wavefront" gives the
      same result from the feed-forward start with about half the work when
      T = H: after t steps only the top t+1 layers can have a non-zero error,
      so step t touches only those (in ``phases`` phases of static shape).
      None: "wavefront" for the states, "plain" for the errors (which have
      no front).
    phases: number of phases the growing wavefront is cut into (more phases,
      less work, more compiled code).
    optimizer: "gd" (the paper: δ ← δ − β g), "momentum" (heavy ball:
      v ← μ v + g, δ ← δ − β v), "nesterov" (δ ← δ − β (g + μ v) with v as
      for heavy ball), or any elementwise ``optax.GradientTransformation``
      (e.g. ``optax.adam(0.1)``), whose updates are added to the activities
      as jpc does with its activity optimiser.
    momentum: μ of "momentum" and "nesterov", in [0, 1).
    tolerance: 0 runs exactly ``steps`` steps. Above 0, inference stops
      early once ‖∂F/∂z‖ (∂F/∂ε for the errors; over every layer and sample of the global batch)
      has fallen below ``tolerance`` times its value at the first step: an
      approximate equilibrium.
    step_guard: 0 (the paper) keeps β. Above 0, that many power iterations
      with Hessian–vector products estimate λ_max, the top eigenvalue of the
      energy's Hessian over the free variables at the start of inference
      (agreed over devices), and β is capped to ``GUARD_MARGIN`` times the
      optimiser's stability bound over λ_max (``stability_bound``): with
      λ_max per sample and the per-sample step β/B, (β/B)·λ_max < 2 for gd,
      2(1 + μ) for heavy ball, 2(1 + μ)/(1 + 2μ) for Nesterov. The named
      optimisers only.
    output_precision: γ, the weight of the output term in the energy,
      F = Σ ½‖e_ℓ‖² + γ ℓ_out (1: the paper). The weight gradients are
      divided by γ, so their size does not change with it; γ → 0 brings
      the equilibrium's gradient to BP's (weak nudging).
    engine: how the engine computes (layouts, unrolling, closed forms,
      kernels; ``pc.Engine``): the same result at any setting.
    steps_per_layer: T per hidden layer where ``steps`` is None.

  A value it cannot take raises ``FieldError`` naming the field.
  """

  steps: int | None = None
  lr: float | None = 0.5
  schedule: Schedule | None = None
  phases: int = 8
  optimizer: Optimizer | optax.GradientTransformation = "gd"
  momentum: float = 0.0
  tolerance: float = 0.0
  engine: Engine = Engine()
  method: Method = "states"
  step_guard: int = 0
  output_precision: float = 1.0
  steps_per_layer: int = 1

  def resolved(self, hidden_layers: int) -> "Inference":
    """This inference with T set: ``steps``, or ``steps_per_layer`` × H."""
    if self.steps is not None:
      return self
    return dataclasses.replace(self, steps=self.steps_per_layer * hidden_layers)

  def __post_init__(self):
    if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
      raise FieldError("steps", f"Inference steps must be a non-negative integer, got {self.steps!r}.")
    if self.method not in get_args(Method):
      raise FieldError("method", f"Unknown inference method {self.method!r}; choose 'states' or 'errors'.")
    if self.schedule is not None and self.schedule not in get_args(Schedule):
      raise FieldError("schedule", f"Unknown inference schedule {self.schedule!r}; choose 'plain' or 'wavefront'.")
    if not isinstance(self.steps_per_layer, int) or self.steps_per_layer < 1:
      raise FieldError("steps_per_layer", f"Inference steps_per_layer must be a positive "
                       f"integer, got {self.steps_per_layer!r}.")
    if not isinstance(self.phases, int) or self.phases < 1:
      raise FieldError("phases", f"Inference phases must be a positive integer, got {self.phases!r}.")
    if isinstance(self.optimizer, optax.GradientTransformation):
      if self.lr is not None:
        raise FieldError("lr", "An optax inference optimizer holds its own learning rate: pass lr=None.")
    elif self.optimizer not in get_args(Optimizer):
      raise FieldError("optimizer", f"Unknown inference optimizer {self.optimizer!r}; choose one of "
                       f"{list(get_args(Optimizer))} or pass an optax.GradientTransformation.")
    elif self.lr is None or not self.lr >= 0:
      raise FieldError("lr", f"The inference optimizer {self.optimizer!r} needs a learning rate lr >= 0, "
                       f"got {self.lr!r}.")
    if not 0 <= self.momentum < 1:
      raise FieldError("momentum", f"Inference momentum must be in [0, 1), got {self.momentum!r}.")
    if self.momentum and self.optimizer == "gd":
      raise FieldError("momentum", "Inference momentum needs optimizer='momentum' or 'nesterov'.")
    if not 0 <= self.tolerance < 1:
      raise FieldError("tolerance", f"Inference tolerance must be in [0, 1) (0: fixed steps), got "
                       f"{self.tolerance!r}.")
    if not isinstance(self.engine, Engine):
      raise FieldError("engine", f"Inference engine must be a pc.Engine, got {self.engine!r}.")
    if self.engine.kernel == "pallas" and (self.optimizer != "gd" or self.tolerance
                                           or self.method != "states"):
      raise FieldError("optimizer", "The Pallas inference kernel runs plain gradient descent on the states for "
                       "a fixed number of steps: use optimizer='gd', tolerance=0 and method="
                       "'states', or the kernel 'xla'.")
    if self.method == "errors" and self.schedule == "wavefront":  # set by the caller
      raise FieldError("schedule", "The errors method updates every layer at every step (it has no "
                       "wavefront): use schedule='plain' or leave it unset.")
    if not isinstance(self.step_guard, int) or self.step_guard < 0:
      raise FieldError("step_guard", f"Inference step_guard (power iterations) must be a non-negative integer, "
                       f"got {self.step_guard!r}.")
    if self.step_guard and (isinstance(self.optimizer, optax.GradientTransformation)
                            or self.engine.kernel == "pallas"):
      raise FieldError("step_guard", "The step guard caps the step of the named optimisers (gd, momentum, "
                       "nesterov) on the XLA kernel: use one of them, or step_guard=0.")
    if not (isinstance(self.output_precision, (int, float)) and self.output_precision > 0):
      raise FieldError("output_precision", f"Inference output_precision (γ) must be a number above 0, got "
                       f"{self.output_precision!r}.")

  def transformation(self, lr: float | jax.Array | None = None) -> optax.GradientTransformation:
    """The optimiser as an optax transformation of ∂F/∂δ into the update of δ,
    at step ``lr`` (default: ``self.lr``)."""
    if isinstance(self.optimizer, optax.GradientTransformation):
      return self.optimizer
    return optax.sgd(self.lr if lr is None else lr,
                     momentum=None if self.optimizer == "gd" else self.momentum,
                     nesterov=self.optimizer == "nesterov")

  def stability_bound(self) -> float:
    """The largest step × curvature at which the named optimiser converges on a
    quadratic (per sample: (β/B)·λ): 2 (gd), 2(1 + μ) (heavy ball),
    2(1 + μ)/(1 + 2μ) (Nesterov)."""
    if self.optimizer == "nesterov":
      return 2 * (1 + self.momentum) / (1 + 2 * self.momentum)
    return 2 * (1 + self.momentum)

  @property
  def effective_schedule(self) -> Schedule:
    """``schedule``, or where it is None the method's: "wavefront" for the
    states, "plain" for the errors."""
    if self.schedule is not None:
      return self.schedule
    return "wavefront" if self.method == "states" else "plain"

  def phases_for(self, hidden_layers: int) -> tuple[tuple[int, int], ...]:
    """The schedule as (first layer updated, number of steps) phases."""
    if self.effective_schedule == "plain":
      return ((0, self.steps),) if self.steps else ()
    return wavefront_phases(hidden_layers, self.steps, self.phases)


def wavefront_phases(hidden_layers: int, steps: int, phases: int) -> tuple[tuple[int, int], ...]:
  """The wavefront schedule as (first layer touched, number of steps) phases.

  From the feed-forward start, step t (0-based) can change only the top t+1
  layers. The first min(T, H) steps are cut into ``phases`` phases; a phase
  ending at step t touches layers H−t−1 … H−1. Later steps touch all layers.
  """
  front = min(steps, hidden_layers)
  per_phase = math.ceil(front / phases) if front else 0
  pieces: list[tuple[int, int]] = []
  done = 0
  while done < front:
    n = min(per_phase, front - done)
    done += n
    pieces.append((hidden_layers - min(hidden_layers, done), n))
  if steps > front:
    pieces.append((0, steps - front))
  merged: list[tuple[int, int]] = []
  for first, n in pieces:
    if merged and merged[-1][0] == first:
      merged[-1] = (first, merged[-1][1] + n)
    else:
      merged.append((first, n))
  return tuple(merged)


def _locate(model: Network, layer: int) -> tuple[int, int]:
  """(stage, index within the stage) of hidden layer ``layer`` (0 = the bottom)."""
  for stage, top in enumerate(itertools.accumulate(model.stage_layers)):
    if layer < top:
      return stage, layer - top + model.stage_layers[stage]
  raise ValueError(f"Layer {layer} is above the network's {forward.hidden_layers(model)} hidden "
                   "layers.")


# The step guard keeps β·λ_max this far inside the stability bound. Power
# iteration approaches λ_max from below, and slowly where the top eigenvalues
# are close: five iterations gave 0.69–0.80 of λ_max on dense ReLU 128 × 16 and
# 128 × 64 (activities and errors) and tanh 16 × 5, so 0.5 keeps those within
# 0.72 of the bound.
GUARD_MARGIN = 0.5


def _top_eigenvalue(hvp: Callable, v, iterations: int, axis_name: str | None) -> jax.Array:
  """λ_max of a symmetric positive semi-definite operator ``hvp`` on trees
  shaped like ``v``, by power iteration from ``v`` (inner products global
  over the devices of ``axis_name``)."""
  dot = lambda a, b: _global_sum(jax.tree.map(lambda u, w: jnp.sum(u * w), a, b), axis_name)

  def iterate(_, carry):
    v, _ = carry
    norm = jnp.maximum(jnp.sqrt(dot(v, v)), 1e-30)
    v = jax.tree.map(lambda a: a / norm, v)
    hv = hvp(v)
    return hv, dot(v, hv)

  _, eigenvalue = jax.lax.fori_loop(0, iterations, iterate, (v, jnp.zeros(())))
  return eigenvalue


def _guarded_lr(inference: "Inference", energy: Callable, at, first_vector, batch_size: int,
                axis_name: str | None):
  """(the step inference takes, λ_max per sample): β capped by the stability
  bound over λ_max of ``energy``'s Hessian at ``at`` (``Inference.step_guard``;
  ``energy`` is a batch mean, so its λ_max is the largest per-sample one over B),
  by power iteration from ``first_vector`` + 1 (the feed-forward activities:
  per sample, so any split of the batch over devices gives the same λ_max;
  + 1, so that an all-zero batch does not start from zero); without the
  guard (None, None): the optimiser's own step."""
  if not inference.step_guard:
    return None, None
  hvp = lambda v: jax.jvp(jax.grad(energy), (at,), (v,))[1]
  eigenvalue = _top_eigenvalue(hvp, jax.tree.map(lambda a: a + 1, first_vector),
                               inference.step_guard, axis_name)
  lr = jnp.asarray(inference.lr, jnp.float32)
  cap = GUARD_MARGIN * inference.stability_bound() / jnp.maximum(eigenvalue, 1e-30)
  return jnp.where(jnp.isfinite(cap), jnp.minimum(lr, cap), lr), eigenvalue * batch_size


class _Start(NamedTuple):
  """Where inference starts, per stage in the model's layout: activities z⁰,
  φ(z⁰), and the errors there (None at the feed-forward start, where they
  are zero by definition). For a network of general branches, also what
  each residual branch and each stage's entry predict there (``branch``:
  per stage, the branches of layers 1… of the stage; ``entry``: per stage,
  None for the first); None in closed form. ``weights``: per stage, the
  residual weights in the plan's layout. ``plan``: the engine's choices."""

  z: tuple
  phi: tuple
  errors: tuple | None
  branch: tuple | None
  entry: tuple | None
  weights: tuple
  plan: Plan


def _start(model: Network, plan: Plan, stages: tuple, errors: tuple | None) -> _Start:
  arrange = lambda arrays: tuple(layouts.arrange(a, plan.per_layer) for a in arrays)
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
  return _Start(stages, phi, None if errors is None else arrange(errors), branch, entry, weights,
                plan)


def _moved(closed_form: bool, f: Callable, h, h0, f_h0=None, layers: bool = True):
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
  moved = jax.tree.map(jnp.subtract, f(h), f_h0)
  # Zeroed in value only (m − m = 0 exactly): the gradient still flows through
  # f, as it must at the wavefront's edge, where h = h⁰ but the error above is not zero.
  return jax.tree.map(lambda same, m: m - jax.lax.stop_gradient(jnp.where(same, m, 0.0)),
                      same, moved)


def _transpose(f: Callable, h) -> Callable:
  """e ↦ (∂f/∂h)ᵀ e of a linear map f at h: for a layer's product h ↦ a·hW,
  e ↦ a·eWᵀ (XLA sees the transposed product directly, with no forward
  product to prune)."""
  transpose = jax.linear_transpose(f, h)
  return lambda cotangent: transpose(cotangent)[0]


def _errors(model: Network, start: _Start, delta: tuple, stage: int, index: int,
            bottom_shift: jax.Array, weights: tuple) -> tuple[tuple, tuple]:
  """Errors and φ(z) of the hidden layers from (``stage``, ``index``) to the top.

  ``delta`` holds, per stage from ``stage`` up, the deviations of those layers
  (the first stage's sliced from ``index``), and ``weights`` their residual
  weights sliced alike. ``bottom_shift`` [B, ...] is how far the prediction of
  the lowest of them has moved, which depends only on the layers below (fixed
  while these are updated). Returns (errors, φ), per stage as ``delta``.
  """
  errors, phis = [], []
  shift = bottom_shift
  for i, s in enumerate(range(stage, len(start.z))):
    low = index if i == 0 else 0
    d, z0, phi0 = delta[i], start.z[s][low:], start.phi[s][low:]
    phi = jax.tree.map(lambda z, v: model.phi(z + v), z0, d)
    if i:  # the stage's entry layer, predicted from the top of the stage below
      shift = _moved(start.plan.closed_form, lambda h, s=s: model.entry(s, h), phis[-1][-1], start.phi[s - 1][-1],
                     None if start.entry is None else start.entry[s], layers=False)
    moved = _moved(start.plan.closed_form, lambda h, s=s, w=weights[i]: model.residual_branch(s, w, h), phi[:-1],
                   phi0[:-1], None if start.branch is None else start.branch[s][low:])
    shifts = layouts.join(layouts.single(shift, d), jax.tree.map(jnp.add, moved, d[:-1]))
    e = jax.tree.map(jnp.subtract, d, shifts)
    if start.errors is not None:
      e = jax.tree.map(jnp.add, e, start.errors[s][low:])
    errors.append(e)
    phis.append(phi)
  return tuple(errors), tuple(phis)


def _bottom_shift(model: Network, start: _Start, delta: tuple, weights: tuple, stage: int,
                  index: int) -> jax.Array:
  """How far the prediction of layer (``stage``, ``index``) has moved,
  through the layer below it."""
  if index:  # a residual layer: its skip and its branch
    below = delta[stage][index - 1]
    h = layouts.single(model.phi(start.z[stage][index - 1] + below), delta[stage])
    h0 = start.phi[stage][index - 1:index]
    branch = tuple(w[index - 1:index] for w in weights[stage])
    moved = _moved(start.plan.closed_form, lambda h: model.residual_branch(stage, branch, h), h, h0,
                   None if start.branch is None else start.branch[stage][index - 1:index])
    return moved[0] + below
  if stage:  # a stage's entry layer, from the top of the stage below
    h = model.phi(start.z[stage - 1][-1] + delta[stage - 1][-1])
    return _moved(start.plan.closed_form, lambda h: model.entry(stage, h), h, start.phi[stage - 1][-1],
                  None if start.entry is None else start.entry[stage], layers=False)
  return jnp.zeros_like(start.z[0][0])  # the input projection a_1 W_1 x never moves


def _upper_energy(model: Network, start: _Start, y: jax.Array, delta: tuple, stage: int,
                  index: int, bottom_shift: jax.Array, weights: tuple, loss: Loss,
                  batch_size: int) -> jax.Array:
  """The energy's terms that depend on the layers from (``stage``, ``index``)
  up, at their deviations ``delta``: ``energy_terms`` of their errors and the output."""
  errors, phis = _errors(model, start, delta, stage, index, bottom_shift, weights)
  return jnp.sum(energy_terms(errors, model.readout(phis[-1][-1]), y, loss, batch_size))


def _energy_gradient(model: Network, start: _Start, y: jax.Array, delta: tuple, stage: int,
                     index: int, bottom_shift: jax.Array, weights: tuple, loss: Loss,
                     batch_size: int) -> tuple:
  """∂F/∂δ of the layers from (``stage``, ``index``) up: ``jax.grad`` of the one
  energy over them, the layers below held fixed. The general path, for any
  network. Layers the wavefront has not reached have e = 0 and get exactly
  zero (their cotangents are zero)."""
  return jax.grad(lambda d: _upper_energy(model, start, y, d, stage, index, bottom_shift,
                                          weights, loss, batch_size))(delta)


def _closed_form_gradient(model: Network, start: _Start, y: jax.Array, delta: tuple, stage: int,
                          index: int, bottom_shift: jax.Array, weights: tuple, loss: Loss,
                          batch_size: int) -> tuple:
  """``_energy_gradient`` in closed form, for networks whose maps are linear in φ(z).

  With e the errors and J_{k+1} the map from φ(z_k) to the prediction of the
  layer above (a residual branch, the next stage's entry, or the readout,
  whose "error" is the output error ε):

      B · ∂F/∂δ_k = e_k − e_{k+1} [if layer k+1 has a skip] − φ'(z_k) ⊙ J_{k+1}ᵀ e_{k+1},

  with Jᵀ the map's transpose, written so that each transposed product feeds
  one elementwise update (on CPU at 256 × 32, inference 1.16× faster than
  through ``jax.grad``). The conformance suite tests it against the general path.
  """
  errors, phis = _errors(model, start, delta, stage, index, bottom_shift, weights)
  above = loss_of(loss).error(model.readout(phis[-1][-1]), y)
  above = _transpose(model.readout, phis[-1][-1])(above)
  grads = []
  for i in reversed(range(len(errors))):
    s, low = stage + i, index if i == 0 else 0
    e, phi = errors[i], phis[i]
    branch = lambda h, s=s, w=weights[i]: model.residual_branch(s, w, h)
    back = layouts.join(_transpose(branch, phi[:-1])(e[1:]), layouts.single(above, e))
    skip = layouts.join(e[1:], layouts.single(jnp.zeros_like(above), e))
    # The maps' inputs are φ(z): the chain rule (φ' = 1 folds away for the identity).
    z = jax.tree.map(jnp.add, start.z[s][low:], delta[i])
    back = jax.tree.map(lambda v, back: jax.jvp(model.phi, (v,), (jnp.ones_like(v),))[1] * back,
                        z, back)
    grads.append(jax.tree.map(lambda e, skip, back: (e - skip - back) / batch_size, e, skip, back))
    if i:  # the entry of stage s, predicted from the top of the stage below
      above = _transpose(lambda h, s=s: model.entry(s, h), phis[i - 1][-1])(e[0])
  return tuple(reversed(grads))


def _activity_trees(tx: optax.GradientTransformation, state) -> list:
  """The parts of an optimiser state shaped like the activities (e.g. the
  momentum), in a fixed order."""
  trees = []
  optax.tree_map_params(tx, lambda tree: trees.append(tree) or tree, state, is_leaf=lambda _: True)
  return trees


def _map_activity_trees(tx: optax.GradientTransformation, f: Callable, state, *others):
  """``state`` with each activity-shaped part p replaced by f(p, *the same part
  of each of ``others``); its other fields (e.g. step counts) kept."""
  parts = iter(zip(*(_activity_trees(tx, o) for o in others))) if others else None
  return optax.tree_map_params(tx, lambda tree: f(tree, *(next(parts) if parts else ())), state,
                               is_leaf=lambda _: True)


class _Progress(NamedTuple):
  """Where inference is, for the stop at equilibrium: steps taken, and the
  global ‖∂F/∂δ‖² at the first step and at the latest."""

  steps: jax.Array
  first: jax.Array
  latest: jax.Array


def _global_sum(tree, axis_name: str | None) -> jax.Array:
  """The sum of a tree's leaves over every device of ``axis_name``."""
  total = sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))
  return jax.lax.psum(total, axis_name) if axis_name else total


def _global_sum_of_squares(tree, axis_name: str | None) -> jax.Array:
  return _global_sum(jax.tree.map(jnp.square, tree), axis_name)


def _descend(model: Network, start: _Start, y: jax.Array, inference: Inference, loss: Loss,
             batch_size: int, axis_name: str | None) -> tuple[tuple, dict]:
  """Inference from ``start``; returns the deviations δ from the start, per
  stage in the model's layout, and what it did (``_report``).

  Each phase (first layer, steps) of the schedule is one compiled loop over
  the layers from there to the top; the loop carries their δ and
  optimiser state, nothing else (no trajectory is stored). Below them,
  δ, the gradient and the optimiser state are zero and stay so.
  """
  delta = jax.tree.map(jnp.zeros_like, start.z)
  weights = start.weights
  no_shift = jnp.zeros_like(start.z[0][0])
  lr, eigenvalue = _guarded_lr(inference, lambda d: _upper_energy(
      model, start, y, d, 0, 0, no_shift, weights, loss, batch_size), delta, start.z, batch_size,
      axis_name)
  tx = inference.transformation(lr)
  state = tx.init(delta)
  activity_gradient = _closed_form_gradient if start.plan.closed_form else _energy_gradient
  progress = _Progress(jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.full((), jnp.inf))
  end = 0
  for first, num_steps in inference.phases_for(forward.hidden_layers(model)):
    stage, index = _locate(model, first)
    bottom_shift = _bottom_shift(model, start, delta, weights, stage, index)
    # Sliced once, outside the loop.
    upper_weights = (tuple(w[index:] for w in weights[stage]),) + weights[stage + 1:]
    upper_state = _map_activity_trees(tx, lambda tree: layouts.upper(tree, stage, index), state)

    if start.plan.kernel == "pallas" and forward.hidden_layers(model) - index >= 2:
      fused = pallas_step.fused_step(
          model, start.z[0][index:], None if start.errors is None else start.errors[0][index:],
          bottom_shift, upper_weights[0], y, loss_of(loss).error, inference.lr, batch_size)
      update = lambda d, s, fused=fused: ((fused(d[0]),), s, None)
    else:
      def update(d, s, stage=stage, index=index, bottom_shift=bottom_shift, w=upper_weights):
        grad = activity_gradient(model, start, y, d, stage, index, bottom_shift, w, loss,
                                 batch_size)
        updates, s = tx.update(grad, s, d)
        return optax.apply_updates(d, updates), s, grad

    end += num_steps
    (upper_delta, upper_state), progress = _loop(
        update, (layouts.upper(delta, stage, index), upper_state), num_steps, end, progress,
        inference.tolerance, axis_name, start.plan.unroll)
    delta = layouts.with_upper(delta, upper_delta, stage, index)
    # The upper layers' state carries the other fields (Adam's step count) on.
    state = _map_activity_trees(
        tx, lambda part, tree: layouts.with_upper(tree, part, stage, index), upper_state, state)
  return delta, _report(inference, progress, lr, eigenvalue)


def _report(inference: Inference, progress: _Progress, lr: jax.Array | None,
            eigenvalue: jax.Array | None) -> dict:
  """What inference did, the same on every device: ``inference_steps`` taken;
  with the step guard, ``inference_lr`` (the β used) and ``inference_lambda_max``
  (the estimate of the largest per-sample curvature: β/B times it stays
  inside the bound)."""
  report = {"inference_steps": progress.steps if inference.tolerance
            else jnp.asarray(inference.steps, jnp.int32)}
  if inference.step_guard:
    report |= {"inference_lr": lr, "inference_lambda_max": eigenvalue}
  return report


def _loop(update: Callable, carry: tuple, num_steps: int, end: int, progress: _Progress,
          tolerance: float, axis_name: str | None, unroll: bool) -> tuple[tuple, _Progress]:
  """``num_steps`` steps of ``update`` (variables, state) -> (variables, state,
  gradient) from ``carry``, in one compiled loop that carries nothing else.
  With a ``tolerance``, a while loop that stops at step ``end`` (counted over
  every loop of the schedule, in ``progress``) or once the global ‖gradient‖
  has fallen below ``tolerance`` times its value at the first step."""
  if not tolerance:
    return jax.lax.fori_loop(0, num_steps, lambda _, c: update(*c)[:2], carry,
                             unroll=unroll or 1), progress

  def step(carry):
    variables, state, p = carry
    variables, state, grad = update(variables, state)
    size = _global_sum_of_squares(grad, axis_name)
    return variables, state, _Progress(p.steps + 1, jnp.where(p.steps == 0, size, p.first), size)

  def going(carry):
    p = carry[2]
    return (p.steps < end) & (p.latest > tolerance ** 2 * p.first)

  *carry, progress = jax.lax.while_loop(going, step, (*carry, progress))
  return tuple(carry), progress


def _descend_errors(model: Network, x: jax.Array, y: jax.Array, inference: Inference, loss: Loss,
                    batch_size: int, axis_name: str | None, plan_: Plan,
                    start_errors: tuple) -> tuple[tuple, dict, tuple]:
  """Error-parameterised inference: ``inference.steps`` optimiser steps on the
  errors ε (per stage, [1 + R_s, B, ...]) from ``start_errors``, each on
  ``jax.grad`` over ε of the one energy at the error-perturbed forward pass
  (a forward and a backward pass through the whole network). Returns the
  final ε, what inference did (``_report``) and the activities at the start
  (per stage; at zero errors, the feed-forward pass).

  The first step is taken outside the loop: its forward pass is the start's
  (the feed-forward pass the caller would otherwise run again), and the step
  guard's first vector.
  """
  unrolled = plan_.per_layer or plan_.unroll

  def energy_and_stages(errors):
    stages = forward.perturbed_stages(model, x, errors, unrolled)
    return jnp.sum(energy_terms(errors, model.readout(model.phi(stages[-1][-1])), y, loss,
                                batch_size)), stages

  energy_of = lambda errors: energy_and_stages(errors)[0]
  (_, start_stages), first_grad = jax.value_and_grad(energy_and_stages, has_aux=True)(start_errors)
  lr, eigenvalue = _guarded_lr(inference, energy_of, start_errors, start_stages, batch_size,
                               axis_name)
  tx = inference.transformation(lr)

  def apply(errors, state, grad):
    updates, state = tx.update(grad, state, errors)
    return optax.apply_updates(errors, updates), state

  def update(errors, state):
    grad = jax.grad(energy_of)(errors)
    return *apply(errors, state, grad), grad

  first_size = _global_sum_of_squares(first_grad, axis_name)
  progress = _Progress(jnp.ones((), jnp.int32), first_size, first_size)
  (errors, _), progress = _loop(update, apply(start_errors, tx.init(start_errors), first_grad),
                                inference.steps - 1, inference.steps, progress,
                                inference.tolerance, axis_name, plan_.unroll)
  return errors, _report(inference, progress, lr, eigenvalue), start_stages


def infer(model: Network, x: jax.Array, y: jax.Array, inference: Inference, *,
          z=None, loss: Loss = "mse", batch_size: int | None = None):
  """Inference: up to ``inference.steps`` optimiser steps on the hidden
  activities (or, by ``inference.method``, on the errors).

  Args:
    model: the network (weights are held fixed).
    x: [B, D] clamped inputs.
    y: [B, C] clamped targets.
    inference: the method, the optimiser, its steps and rate, the schedule and the stop.
    z: starting activities, as ``feedforward`` gives them; None starts
      from the feed-forward pass (the paper's recipe, and the only start the
      wavefront schedule allows). The errors method starts from their errors.
    loss: the output energy: "mse", "ce" or a ``pc.OutputLoss``.
    batch_size: B of the batch mean; defaults to x.shape[0].

  Returns:
    The activities after inference, as z ([H, B, N] for the dense network).
  """
  inference = inference.resolved(forward.hidden_layers(model))
  plan_ = plan(inference.engine, model, x, inference.method)
  batch_size = batch_size or x.shape[0]
  energy_loss = loss_of(loss).weighted(inference.output_precision)
  if z is None:
    stages = feedforward_stages(model, x, plan_)
    start_errors = None
  elif inference.effective_schedule == "wavefront":
    raise ValueError("The wavefront schedule is exact only from the feed-forward start: "
                     "call infer without z, or use Inference(schedule='plain').")
  else:
    stages = forward.as_stages(z)
    start_errors = tuple(z - mu for z, mu in zip(stages, forward.predictions(model, stages, x)))
  if inference.method == "errors":
    errors, _, _ = _descend_errors(model, x, y, inference, energy_loss, batch_size, None, plan_,
                                   start_errors or tuple(jnp.zeros_like(z) for z in stages))
    return forward.public_form(model, forward.perturbed_stages(
        model, x, errors, plan_.per_layer or plan_.unroll))
  delta, _ = _descend(model, _start(model, plan_, stages, start_errors), y, inference,
                      energy_loss, batch_size, None)
  return forward.public_form(model, tuple(z + layouts.stacked(d) for z, d in zip(stages, delta)))


def feedforward_stages(model: Network, x: jax.Array, plan_: Plan) -> tuple:
  """The feed-forward start, per stage. Written out per layer where
  inference holds layers per layer or unrolls: on XLA's CPU runtime, a loop
  followed by more work (here, the inference loops) runs slower."""
  return forward.as_stages(forward.feedforward(model, x, unrolled=plan_.per_layer or plan_.unroll))


class InferenceResult(NamedTuple):
  """The network at the end of inference: all its weight gradient needs.

  phi: φ(z_ℓ), the maps' inputs, per stage an array [L_s, B, ...], or a tuple
  of L_s [B, ...] arrays in the "per_layer" layout (left unstacked: on XLA's
  CPU runtime a concatenation after the inference loop slows the loop
  itself). error_grads: ∂F/∂e_ℓ, per stage in the same layout (e_ℓ/B).
  output_grad: [B, C] ∂F/∂μ_L. Both are ``energy_gradients`` of the one
  energy at the final errors and outputs, divided by the output precision γ
  (so gradients of F/γ where γ ≠ 1); ∂F/∂μ_ℓ = −∂F/∂e_ℓ.
  """

  phi: tuple
  error_grads: tuple
  output_grad: jax.Array


def pc_inference(model: Network, x: jax.Array, y: jax.Array, inference: Inference, *,
                 loss: Loss = "mse", batch_size: int | None = None,
                 axis_name: str | None = None) -> tuple[InferenceResult, dict]:
  """Feed-forward start and inference; returns the final state and batch metrics.

  Args:
    model, x, y, inference, loss: as for ``infer``.
    batch_size: B of the batch mean; defaults to x.shape[0]. Inside a
      data-parallel step pass the *global* batch size.
    axis_name: inside ``jax.shard_map``, the mesh axis the batch is split
      over: the stop at equilibrium then measures the global gradient.

  metrics are batch means (divided by ``batch_size``) of: ``loss`` (the
  feed-forward output loss, which is also the energy before inference at
  γ = 1), ``accuracy`` (feed-forward), ``energy`` (after inference, its
  output term weighted by γ) and ``layer_energies`` [H + 1] (after
  inference); and ``inference_steps``, the steps taken (T unless inference
  stopped early), with the step guard also ``inference_lr`` (the β used) and
  ``inference_lambda_max`` (its estimate of λ_max, per sample). Under data parallelism
  the first four are local parts, to be summed over devices; the
  ``inference_*`` ones are the same on every device.
  """
  inference = inference.resolved(forward.hidden_layers(model))
  batch_size = batch_size or x.shape[0]
  plan_ = plan(inference.engine, model, x, inference.method)
  energy_loss = loss_of(loss).weighted(inference.output_precision)
  if inference.method == "errors":
    zeros = tuple(jnp.zeros(z.shape, z.dtype) for z in
                  jax.eval_shape(lambda: feedforward_stages(model, x, plan_)))
    if axis_name:  # per sample, as the batch is: split over the devices
      zeros = jax.lax.pcast(zeros, axis_name, to="varying")
    errors, report, feedforward = _descend_errors(model, x, y, inference, energy_loss,
                                                  batch_size, axis_name, plan_, zeros)
    stages = forward.perturbed_stages(model, x, errors, plan_.per_layer or plan_.unroll)
    errors, phi = (tuple(layouts.arrange(a, plan_.per_layer) for a in arrays)
                   for arrays in (errors, tuple(model.phi(z) for z in stages)))
    ff_outputs = model.readout(model.phi(feedforward[-1][-1]))
  else:
    start = _start(model, plan_, feedforward_stages(model, x, plan_), None)
    delta, report = _descend(model, start, y, inference, energy_loss, batch_size, axis_name)
    errors, phi = _errors(model, start, delta, 0, 0, jnp.zeros_like(start.z[0][0]),
                          start.weights)
    ff_outputs = model.readout(start.phi[-1][-1])
  outputs = model.readout(phi[-1][-1])
  per_layer = energy_terms(errors, outputs, y, energy_loss, batch_size)
  metrics = {
      "loss": jnp.sum(loss_of(loss)(ff_outputs, y)) / batch_size,
      "accuracy": count_correct(ff_outputs, y) / batch_size,
      "energy": jnp.sum(per_layer),
      "layer_energies": per_layer,
  } | report
  grads = energy_gradients(errors, outputs, y, energy_loss, batch_size)
  if inference.output_precision != 1:  # the weight gradient's size independent of γ
    grads = jax.tree.map(lambda g: g / inference.output_precision, grads)
  return InferenceResult(phi, *grads), metrics
