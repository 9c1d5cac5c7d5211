"""Inference: minimising the energy over the free variables, weights fixed.

From the feed-forward start z⁰, inference takes up to T steps of an
optimiser on the activities (the paper: plain gradient descent,
z ← z − β ∂F/∂z, T = H), or on the errors (ePC). ``Inference`` says how;
``METHODS`` maps its ``method`` to the function that runs it (an
``InferenceMethod``: ``state_inference``, ``error_inference``), each on the
shared descent loop (``descent``), the step guard (``step_guard``) and, for
the states, the deviations from the start (``deviations``) and their
gradients (``activity_gradients``). The engine sees every network through
the ``PCNetwork`` protocol: a stack of stages, each an entry layer and
residual layers of one shape; the dense network is the one-stage case. How
it computes (layout, unrolling, closed form or vector–Jacobian products, the
Pallas kernel) is the ``Plan`` of ``Inference.engine`` for the network.
"""

import dataclasses
import math
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax

from mupc_flax.errors import FieldError
from mupc_flax.pc import forward
from mupc_flax.pc.descent import InferenceMethod, Problem
from mupc_flax.pc.energy import Loss, Network, count_correct, energy_gradients, energy_terms, loss_of
from mupc_flax.pc.error_inference import infer_errors
from mupc_flax.pc.options import Engine, plan
from mupc_flax.pc.state_inference import infer_states

Schedule = Literal["plain", "wavefront"]
"""How inference visits the layers: every layer at every step (``"plain"``), or only those
the error signal can have reached from the feed-forward start (``"wavefront"``, same result)."""
# What inference descends on: the activities (PC) or the errors (ePC).
Method = Literal["states", "errors"]
METHODS: dict[str, InferenceMethod] = {"states": infer_states, "errors": infer_errors}
"""The inference methods by ``Inference.method``: each the function that runs it."""
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
    if self.method not in METHODS:
      raise FieldError("method", f"Unknown inference method {self.method!r}; choose one of "
                       f"{list(METHODS)}.")
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


def _problem(model: Network, x: jax.Array, y: jax.Array, inference: Inference, loss: Loss,
             batch_size: int | None, axis_name: str | None) -> Problem:
  inference = inference.resolved(forward.hidden_layers(model))
  return Problem(model, x, y, inference, loss_of(loss).weighted(inference.output_precision),
                 batch_size or x.shape[0], axis_name, plan(inference.engine, model, x, inference.method))


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
  problem = _problem(model, x, y, inference, loss, batch_size, None)
  if z is not None and problem.inference.effective_schedule == "wavefront":
    raise ValueError("The wavefront schedule is exact only from the feed-forward start: "
                     "call infer without z, or use Inference(schedule='plain').")
  stages = None if z is None else forward.as_stages(z)
  return forward.public_form(model, METHODS[problem.inference.method](problem, stages).z)


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
  γ = 1; per token, the energy's output term over T, where the outputs are
  [B, T, C]), ``accuracy`` (feed-forward, per token likewise), ``energy`` (after inference, its
  output term weighted by γ) and ``layer_energies`` [H + 1] (after
  inference); and ``inference_steps``, the steps taken (T unless inference
  stopped early), with the step guard also ``inference_lr`` (the β used) and
  ``inference_lambda_max`` (its estimate of λ_max, per sample). Under data parallelism
  the first four are local parts, to be summed over devices; the
  ``inference_*`` ones are the same on every device.
  """
  problem = _problem(model, x, y, inference, loss, batch_size, axis_name)
  batch_size, precision = problem.batch_size, problem.inference.output_precision
  equilibrium = METHODS[problem.inference.method](problem, None)
  outputs = model.readout(equilibrium.phi[-1][-1])
  per_layer = energy_terms(equilibrium.errors, outputs, y, problem.loss, batch_size)
  metrics = {
      "loss": jnp.sum(loss_of(loss).per_token(equilibrium.start_outputs, y)) / batch_size,
      "accuracy": count_correct(equilibrium.start_outputs, y) / batch_size,
      "energy": jnp.sum(per_layer),
      "layer_energies": per_layer,
  } | equilibrium.report
  grads = energy_gradients(equilibrium.errors, outputs, y, problem.loss, batch_size)
  if precision != 1:  # the weight gradient's size independent of γ
    grads = jax.tree.map(lambda g: g / precision, grads)
  return InferenceResult(equilibrium.phi, *grads), metrics
