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
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mupc_flax.model import ResidualPCN

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
    if self.schedule not in ("plain", "wavefront"):
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


class _Start(NamedTuple):
  """Where inference starts: activities z⁰ [H, B, N], φ(z⁰), and the errors
  there (None at the feed-forward start, where they are zero by definition)."""

  z: jax.Array
  phi: jax.Array
  errors: jax.Array | None


def _errors(model: ResidualPCN, start: _Start, delta: jax.Array, first: int,
            bottom_shift: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Errors [S, B, N] of the top S hidden layers ``first … H−1`` and φ(z) there.

  ``delta`` [S, B, N] are their deviations from the start; ``bottom_shift``
  [B, N] is how far the prediction of layer ``first`` has moved, which depends
  only on the layers below (fixed while this slice is updated).
  """
  phi = model.phi(start.z[first:] + delta)
  shifts = model.residual(phi[:-1] - start.phi[first:-1], first) + delta[:-1]
  errors = delta - jnp.concatenate([bottom_shift[None], shifts])
  if start.errors is not None:
    errors = errors + start.errors[first:]
  return errors, phi


def _bottom_shift(model: ResidualPCN, start: _Start, delta: jax.Array, first: int) -> jax.Array:
  """Shift of the prediction of layer ``first`` caused by the layer below it."""
  if first == 0:  # The input projection a_1 W_1 x never moves.
    return jnp.zeros_like(start.z[0])
  below = slice(first - 1, first)
  phi = model.phi(start.z[below] + delta[below])
  return (model.residual(phi - start.phi[below], first - 1) + delta[below])[0]


def _descend(model: ResidualPCN, start: _Start, y: jax.Array, blocks: tuple[tuple[int, int], ...],
             lr: float, loss: Loss, batch_size: int) -> jax.Array:
  """Gradient descent on the activities; returns the deviations δ [H, B, N].

  Each block (first layer, steps) is one compiled loop over the top slice;
  nothing but the current δ is carried (no trajectory is stored).
  """
  delta = jnp.zeros_like(start.z)
  for first, num_steps in blocks:
    bottom_shift = _bottom_shift(model, start, delta, first)

    def block_energy(d, first=first, bottom_shift=bottom_shift):
      errors, phi = _errors(model, start, d, first, bottom_shift)
      output = jnp.sum(output_losses(model.readout(phi[-1]), y, loss))
      return (0.5 * jnp.sum(jnp.square(errors)) + output) / batch_size

    grad = jax.grad(block_energy)
    top = jax.lax.fori_loop(0, num_steps, lambda _, d: d - lr * grad(d), delta[first:])
    delta = top if first == 0 else jnp.concatenate([delta[:first], top])
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
  start = _Start(z, model.phi(z), start_errors)
  delta = _descend(model, start, y, _blocks(model.hidden_layers, inference), inference.lr, loss,
                   batch_size or x.shape[0])
  return z + delta


def _sum_correct(outputs: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.sum(jnp.argmax(outputs, -1) == jnp.argmax(y, -1)).astype(jnp.float32)


def pc_gradients(model: ResidualPCN, x: jax.Array, y: jax.Array, inference: Inference, *,
                 loss: Loss = "mse", batch_size: int | None = None) -> tuple[nnx.State, dict]:
  """PC weight gradients: feed-forward start, inference, ∂F/∂W at the final z.

  At the final activities, with e_ℓ the errors and ε = −∂ℓ_out/∂μ_L,
  ∂F/∂W_1 = −(a_1/B) xᵀe_1, ∂F/∂W_ℓ = −(a_ℓ/B) φ(z_{ℓ-1})ᵀe_ℓ and
  ∂F/∂W_L = −(a_L/B) φ(z_H)ᵀε (the same as ``jax.grad`` of ``energy``).

  Returns:
    grads: an ``nnx.State`` of the ``nnx.Param`` gradients.
    metrics: batch means (divided by ``batch_size``) of: ``loss`` (the
      feed-forward output loss, which is also the energy before inference),
      ``accuracy`` (feed-forward), ``energy`` (after inference) and
      ``layer_energies`` [H + 1] (after inference).
  """
  batch_size = batch_size or x.shape[0]
  z0 = model.feedforward(x)
  start = _Start(z0, model.phi(z0), None)
  delta = _descend(model, start, y, _blocks(model.hidden_layers, inference), inference.lr, loss,
                   batch_size)
  errors, phi = _errors(model, start, delta, 0, jnp.zeros_like(z0[0]))
  outputs = model.readout(phi[-1])
  out_error = output_errors(outputs, y, loss)

  scale = -1.0 / batch_size
  grads = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(grads, {
      "input_layer": {"kernel": scale * model.input_layer.multiplier[...] * (x.T @ errors[0])},
      "hidden": {"kernel": scale * model.hidden.multiplier[...][:, None, None]
                           * jnp.einsum("kbi,kbo->kio", phi[:-1], errors[1:])},
      "readout": {"kernel": scale * model.readout.multiplier[...] * (phi[-1].T @ out_error)},
  })

  ff_outputs = model.output(z0[-1])
  per_layer = jnp.append(0.5 * jnp.sum(jnp.square(errors), axis=(1, 2)),
                         jnp.sum(output_losses(outputs, y, loss))) / batch_size
  metrics = {
      "loss": jnp.sum(output_losses(ff_outputs, y, loss)) / batch_size,
      "accuracy": _sum_correct(ff_outputs, y) / batch_size,
      "energy": jnp.sum(per_layer),
      "layer_energies": per_layer,
  }
  return grads, metrics


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
