"""Predictive coding: energy, inference over activities, weight gradients.

The energy of a batch, averaged over its B samples (B is the *global* batch
when the batch is split over devices):

    F = (1/B) Σ_i [ Σ_{ℓ=1..H} ½‖e_ℓ‖² + ℓ_out(y, μ_L) ],   e_ℓ = z_ℓ − μ_ℓ,

with ℓ_out = ½‖y − μ_L‖² ("mse") or −Σ_c y_c log softmax(μ_L)_c ("ce").
Inference is T steps of z ← z − β ∂F/∂z from the feed-forward start; learning
takes ∂F/∂W at the final activities. Shapes: x [B, D], y [B, C], z [H, B, N].

Inference tracks the activities as deviations δ = z − z⁰ from their start z⁰
and the errors as e_ℓ = e⁰_ℓ + δ_ℓ − δ_{ℓ-1} − a_ℓ (φ(z_{ℓ-1}) − φ(z⁰_{ℓ-1})) W_ℓ.
This is the same function, but at the feed-forward start e⁰ = 0 by definition
rather than by cancellation of rounded numbers: layers the inference signal
has not reached keep an error of exactly zero (and get exactly zero weight
gradient), and small activity changes keep full relative precision.
"""

import dataclasses
import math
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from mupc_flax.model import ResidualPCN, residual_product

Loss = Literal["mse", "ce"]
Schedule = Literal["plain", "wavefront"]


@dataclasses.dataclass(frozen=True)
class Inference:
  """The fixed-step inference of the paper's recipe.

  Attributes:
    steps: T, the number of gradient steps on the activities (the paper: T = H).
    lr: β, the activity learning rate, applied to the gradient of the batch
      *mean* energy (so each sample moves by β/B times its own gradient).
    schedule: "plain" updates every layer at every step. "wavefront" gives the
      same result from the feed-forward start with about half the work: after
      t steps only the top t+1 layers can have a non-zero error, so step t
      touches only those (in ``phases`` blocks of static shape).
    phases: number of blocks the growing wavefront is cut into (more blocks,
      less work, more compiled code).
  """

  steps: int
  lr: float
  schedule: Schedule = "wavefront"
  phases: int = 8

  def __post_init__(self):
    if not isinstance(self.steps, int) or self.steps < 0:
      raise ValueError(f"Inference steps must be a non-negative integer, got {self.steps!r}.")
    if self.schedule not in get_args(Schedule):
      raise ValueError(f"Unknown inference schedule {self.schedule!r}; choose 'plain' or 'wavefront'.")
    if not isinstance(self.phases, int) or self.phases < 1:
      raise ValueError(f"Inference phases must be a positive integer, got {self.phases!r}.")


def output_losses(outputs: jax.Array, y: jax.Array, loss: Loss) -> jax.Array:
  """Per-sample output loss [B] of outputs μ_L [B, C] against targets y [B, C]."""
  if loss == "mse":
    return 0.5 * jnp.sum(jnp.square(y - outputs), axis=-1)
  if loss == "ce":
    return -jnp.sum(y * jax.nn.log_softmax(outputs, axis=-1), axis=-1)
  raise ValueError(f"Unknown loss {loss!r}; choose 'mse' or 'ce'.")


def output_errors(outputs: jax.Array, y: jax.Array, loss: Loss) -> jax.Array:
  """The output error −∂ℓ_out/∂μ_L [B, C]: y − μ_L (mse), y − Σy·softmax(μ_L) (ce)."""
  if loss == "mse":
    return y - outputs
  if loss == "ce":
    return y - jnp.sum(y, -1, keepdims=True) * jax.nn.softmax(outputs, axis=-1)
  raise ValueError(f"Unknown loss {loss!r}; choose 'mse' or 'ce'.")


def layer_energies(model: ResidualPCN, z: jax.Array, x: jax.Array, y: jax.Array, *,
                   loss: Loss = "mse", batch_size: int | None = None) -> jax.Array:
  """Per-layer energies [H + 1] at activities z: hidden layers 1…H, then the output.

  Each is a batch mean (divided by ``batch_size``, default x.shape[0]).
  """
  predictions = jnp.concatenate([model.input_layer(x)[None], model.residual_predictions(z[:-1])])
  hidden = 0.5 * jnp.sum(jnp.square(z - predictions), axis=(1, 2))
  output = jnp.sum(output_losses(model.output(z[-1]), y, loss))
  return jnp.append(hidden, output) / (batch_size or x.shape[0])


def energy(model: ResidualPCN, z: jax.Array, x: jax.Array, y: jax.Array, *,
           loss: Loss = "mse", batch_size: int | None = None) -> jax.Array:
  """The energy F (scalar), the sum of ``layer_energies``."""
  return jnp.sum(layer_energies(model, z, x, y, loss=loss, batch_size=batch_size))


def wavefront_phases(hidden_layers: int, steps: int, phases: int) -> tuple[tuple[int, int], ...]:
  """The wavefront schedule as (first layer touched, number of steps) blocks.

  From the feed-forward start, step t (0-based) can change only the top t+1
  layers. The first min(T, H) steps are cut into ``phases`` blocks; a block
  ending at step t touches layers H−t−1 … H−1. Later steps touch all layers.
  """
  front = min(steps, hidden_layers)
  per_phase = math.ceil(front / phases) if front else 0
  blocks: list[tuple[int, int]] = []
  done = 0
  while done < front:
    n = min(per_phase, front - done)
    done += n
    blocks.append((hidden_layers - min(hidden_layers, done), n))
  if steps > front:
    blocks.append((0, steps - front))
  merged: list[tuple[int, int]] = []
  for first, n in blocks:
    if merged and merged[-1][0] == first:
      merged[-1] = (first, merged[-1][1] + n)
    else:
      merged.append((first, n))
  return tuple(merged)


def _blocks(hidden_layers: int, inference: Inference) -> tuple[tuple[int, int], ...]:
  if inference.schedule == "plain":
    return ((0, inference.steps),) if inference.steps else ()
  return wavefront_phases(hidden_layers, inference.steps, inference.phases)


# Inference holds the hidden layers either as one [S, B, N] array ("batched")
# or as a tuple of S [B, N] arrays ("per_layer"). Both support x[i], x[a:b]
# and len(x), and jax.tree.map applies element-wise maps to either; these
# helpers cover the rest.


def _layout(x: jax.Array, per_layer: bool):
  return tuple(x) if per_layer else x


def _stacked(x) -> jax.Array:
  return jnp.stack(x) if isinstance(x, tuple) else x


def _join(lower, upper):
  if isinstance(upper, tuple):
    return tuple(lower) + upper
  return jnp.concatenate([lower, upper]) if len(lower) else upper


def _per_layer_sum_of_squares(x) -> jax.Array:
  if isinstance(x, tuple):
    return jnp.stack([jnp.sum(jnp.square(v)) for v in x]) if x else jnp.zeros((0,))
  return jnp.sum(jnp.square(x), axis=(1, 2))


class _Start(NamedTuple):
  """Where inference starts: activities z⁰, φ(z⁰), and the errors there (None
  at the feed-forward start, where they are zero by definition); [H, B, N]
  each, in the model's layout."""

  z: Any
  phi: Any
  errors: Any


def _start(model: ResidualPCN, z: jax.Array, errors: jax.Array | None) -> _Start:
  per_layer = model.hidden_products == "per_layer"
  # The barrier makes XLA compute z⁰ and φ(z⁰) once. Otherwise it may
  # recompute z⁰ inside the fusions that use it, rounded differently
  # (seen: one ulp), and φ(z⁰ + δ) − φ(z⁰) is no longer exactly zero where δ is.
  z, phi = jax.lax.optimization_barrier((z, model.phi(z)))
  return _Start(_layout(z, per_layer), _layout(phi, per_layer),
                None if errors is None else _layout(errors, per_layer))


def _errors(model: ResidualPCN, start: _Start, delta, first: int, bottom_shift: jax.Array, hidden):
  """Errors of the top S hidden layers ``first … H−1`` and φ(z) there.

  ``delta`` holds their deviations from the start; ``bottom_shift`` [B, N] is
  how far the prediction of layer ``first`` has moved, which depends only on
  the layers below (fixed while this slice is updated); ``hidden`` is
  (kernels, multipliers) of the S − 1 residual layers inside the slice.
  """
  phi = jax.tree.map(lambda z, d: model.phi(z + d), start.z[first:], delta)
  moved = residual_product(*hidden, jax.tree.map(jnp.subtract, phi[:-1], start.phi[first:-1]))
  shifts = _join((bottom_shift,) if isinstance(delta, tuple) else bottom_shift[None],
                 jax.tree.map(jnp.add, moved, delta[:-1]))
  errors = jax.tree.map(jnp.subtract, delta, shifts)
  if start.errors is not None:
    errors = jax.tree.map(jnp.add, errors, start.errors[first:])
  return errors, phi


def _hidden_weights(model: ResidualPCN):
  """(kernels, multipliers) of the residual layers, kernels in the model's layout."""
  return (_layout(model.hidden_kernels(), model.hidden_products == "per_layer"),
          model.hidden.multiplier[...])


def _bottom_shift(model: ResidualPCN, start: _Start, delta, first: int) -> jax.Array:
  """Shift of the prediction of layer ``first`` caused by the layer below it."""
  if first == 0:  # The input projection a_1 W_1 x never moves.
    return jnp.zeros_like(start.z[0])
  below = first - 1
  moved = model.phi(start.z[below] + delta[below]) - start.phi[below]
  return model.residual(_layout(moved[None], isinstance(delta, tuple)), below)[0] + delta[below]


def _descend(model: ResidualPCN, start: _Start, y: jax.Array, blocks: tuple[tuple[int, int], ...],
             lr: float, loss: Loss, batch_size: int):
  """Gradient descent on the activities; returns the deviations δ from the start.

  Each block (first layer, steps) is one compiled loop over the top slice;
  nothing but the current δ is carried (no trajectory is stored).
  """
  delta = jax.tree.map(jnp.zeros_like, start.z)
  kernels, multipliers = _hidden_weights(model)
  for first, num_steps in blocks:
    bottom_shift = _bottom_shift(model, start, delta, first)
    hidden = (kernels[first:], multipliers[first:])  # sliced once, outside the loop

    def block_energy(d, first=first, bottom_shift=bottom_shift, hidden=hidden):
      errors, phi = _errors(model, start, d, first, bottom_shift, hidden)
      output = jnp.sum(output_losses(model.readout(phi[-1]), y, loss))
      return (0.5 * jnp.sum(_per_layer_sum_of_squares(errors)) + output) / batch_size

    grad = jax.grad(block_energy)
    step = lambda _, d: jax.tree.map(lambda v, g: v - lr * g, d, grad(d))
    delta = _join(delta[:first], jax.lax.fori_loop(0, num_steps, step, delta[first:]))
  return delta


def infer(model: ResidualPCN, x: jax.Array, y: jax.Array, inference: Inference, *,
          z: jax.Array | None = None, loss: Loss = "mse",
          batch_size: int | None = None) -> jax.Array:
  """Inference: ``inference.steps`` gradient steps on the hidden activities.

  Args:
    model: the network (weights are held fixed).
    x: [B, D] clamped inputs.
    y: [B, C] clamped targets.
    inference: steps T, rate β and schedule.
    z: [H, B, N] starting activities; None starts from the feed-forward pass
      (the paper's recipe, and the only start the wavefront schedule allows).
    loss: output energy, "mse" or "ce".
    batch_size: B of the batch mean; defaults to x.shape[0]. Inside a
      data-parallel step pass the *global* batch size.

  Returns:
    [H, B, N], the activities after inference.
  """
  if z is None:
    z = model.feedforward(x)
    start_errors = None
  elif inference.schedule == "wavefront":
    raise ValueError("The wavefront schedule is exact only from the feed-forward start: "
                     "call infer without z, or use Inference(schedule='plain').")
  else:
    start_errors = z - jnp.concatenate([model.input_layer(x)[None], model.residual_predictions(z[:-1])])
  delta = _descend(model, _start(model, z, start_errors), y,
                   _blocks(model.hidden_layers, inference), inference.lr, loss, batch_size or x.shape[0])
  return z + _stacked(delta)


def _sum_correct(outputs: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.sum(jnp.argmax(outputs, -1) == jnp.argmax(y, -1)).astype(jnp.float32)


class InferenceResult(NamedTuple):
  """The network at the end of inference, all a weight gradient needs.

  errors: hidden errors e_ℓ; phi: φ(z_ℓ); each [H, B, N], or a tuple of H
  [B, N] arrays for a "per_layer" model (left unstacked: on XLA's CPU runtime
  a concatenation after the inference loop slows the loop itself).
  output_error: [B, C] ε = −∂ℓ_out/∂μ_L.
  """

  errors: jax.Array
  phi: jax.Array
  output_error: jax.Array


def pc_inference(model: ResidualPCN, x: jax.Array, y: jax.Array, inference: Inference, *,
                 loss: Loss = "mse", batch_size: int | None = None) -> tuple[InferenceResult, dict]:
  """Feed-forward start and inference; returns the final state and batch metrics.

  metrics are batch means (divided by ``batch_size``) of: ``loss`` (the
  feed-forward output loss, which is also the energy before inference),
  ``accuracy`` (feed-forward), ``energy`` (after inference) and
  ``layer_energies`` [H + 1] (after inference).
  """
  batch_size = batch_size or x.shape[0]
  z0 = model.feedforward(x)
  start = _start(model, z0, None)
  delta = _descend(model, start, y, _blocks(model.hidden_layers, inference), inference.lr, loss,
                   batch_size)
  errors, phi = _errors(model, start, delta, 0, jnp.zeros_like(z0[0]), _hidden_weights(model))
  outputs = model.readout(phi[-1])
  ff_outputs = model.output(z0[-1])
  per_layer = jnp.append(0.5 * _per_layer_sum_of_squares(errors),
                         jnp.sum(output_losses(outputs, y, loss))) / batch_size
  metrics = {
      "loss": jnp.sum(output_losses(ff_outputs, y, loss)) / batch_size,
      "accuracy": _sum_correct(ff_outputs, y) / batch_size,
      "energy": jnp.sum(per_layer),
      "layer_energies": per_layer,
  }
  return InferenceResult(errors, phi, output_errors(outputs, y, loss)), metrics


def pc_weight_gradients(model: ResidualPCN, x: jax.Array, result: InferenceResult,
                        batch_size: int | None = None) -> nnx.State:
  """∂F/∂W at the end of inference, in closed form (= ``jax.grad`` of ``energy``):

  ∂F/∂W_1 = −(a_1/B) xᵀe_1, ∂F/∂W_ℓ = −(a_ℓ/B) φ(z_{ℓ-1})ᵀe_ℓ, ∂F/∂W_L = −(a_L/B) φ(z_H)ᵀε.
  Returns an ``nnx.State`` of the ``nnx.Param`` gradients.
  """
  scale = -1.0 / (batch_size or x.shape[0])
  errors, phi = _stacked(result.errors), _stacked(result.phi)
  grads = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(grads, {
      "input_layer": {"kernel": scale * model.input_layer.multiplier[...] * (x.T @ errors[0])},
      "hidden": {"kernel": scale * model.hidden.multiplier[...][:, None, None]
                           * jnp.einsum("kbi,kbo->kio", phi[:-1], errors[1:])},
      "readout": {"kernel": scale * model.readout.multiplier[...] * (phi[-1].T @ result.output_error)},
  })
  return grads


def pc_gradients(model: ResidualPCN, x: jax.Array, y: jax.Array, inference: Inference, *,
                 loss: Loss = "mse", batch_size: int | None = None) -> tuple[nnx.State, dict]:
  """PC weight gradients: feed-forward start, inference, ∂F/∂W at the final z.

  Returns (grads, metrics): ``pc_weight_gradients`` of ``pc_inference``.
  """
  result, metrics = pc_inference(model, x, y, inference, loss=loss, batch_size=batch_size)
  return pc_weight_gradients(model, x, result, batch_size), metrics


def bp_gradients(model: ResidualPCN, x: jax.Array, y: jax.Array, *, loss: Loss = "mse",
                 batch_size: int | None = None) -> tuple[nnx.State, dict]:
  """Backprop gradients of the batch-mean output loss of the feed-forward pass.

  With the "mupc" parameterisation this is the paper's "BP with Depth-μP".
  Returns (grads, metrics with ``loss`` and ``accuracy``), as ``pc_gradients``.
  """
  batch_size = batch_size or x.shape[0]

  def mean_loss(model):
    outputs = model(x)
    return jnp.sum(output_losses(outputs, y, loss)) / batch_size, outputs

  (value, outputs), grads = nnx.value_and_grad(mean_loss, has_aux=True)(model)
  return grads, {"loss": value, "accuracy": _sum_correct(outputs, y) / batch_size}
