"""Predictive coding: energy, inference over activities, weight gradients.

The energy of a batch, averaged over its B samples (B is the *global* batch
when the batch is split over devices):

    F = (1/B) Σ_i [ Σ_{ℓ=1..H} ½‖e_ℓ‖² + ℓ_out(y, μ_L) ],   e_ℓ = z_ℓ − μ_ℓ,

with ℓ_out = ½‖y − μ_L‖² ("mse") or −Σ_c y_c log softmax(μ_L)_c ("ce").
Inference is T steps of z ← z − β ∂F/∂z from the feed-forward start; learning
takes ∂F/∂W at the final activities. Shapes: x [B, D], y [B, C], and z in the
model's own form: [H, B, N] for the dense ``ResidualPCN``, a tuple of
per-stage arrays [L_s, B, H_s, W_s, C_s] for the ``ConvResidualPCN``.

The engine sees every network through the stage protocol (``model``): a
stack of stages, each an entry layer and residual layers of one shape. One
engine serves both networks; the dense one is the one-stage case.

Inference tracks the activities as deviations δ = z − z⁰ from their start z⁰
and the errors as e_ℓ = e⁰_ℓ + δ_ℓ − δ_{ℓ-1} − a_ℓ (φ(z_{ℓ-1}) − φ(z⁰_{ℓ-1})) W_ℓ.
This is the same function, but at the feed-forward start e⁰ = 0 by definition
rather than by cancellation of rounded numbers: layers the inference signal
has not reached keep an error of exactly zero (and get exactly zero weight
gradient), and small activity changes keep full relative precision.
"""

import dataclasses
import itertools
import math
from typing import Any, Callable, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from mupc_flax import kernels

# Any network that implements the stage protocol (ResidualPCN, ConvResidualPCN).
Network = Any

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


def _predictions(model: Network, stages: tuple, x: jax.Array) -> tuple:
  """The prediction μ of every hidden layer at activities ``stages``, per stage."""
  predictions, below = [], x
  for s, z in enumerate(stages):
    residual = model.residual_branch(s, model.residual_weights(s), model.phi(z[:-1])) + z[:-1]
    predictions.append(jnp.concatenate([model.entry(s, below)[None], residual]))
    below = model.phi(z[-1])
  return tuple(predictions)


def layer_energies(model: Network, z, x: jax.Array, y: jax.Array, *,
                   loss: Loss = "mse", batch_size: int | None = None) -> jax.Array:
  """Per-layer energies [H + 1] at activities z: hidden layers 1…H (bottom to
  top, over every stage), then the output.

  Each is a batch mean (divided by ``batch_size``, default x.shape[0]).
  """
  stages = model.to_stages(z)
  hidden = jnp.concatenate([0.5 * _per_layer_sum_of_squares(z - mu)
                            for z, mu in zip(stages, _predictions(model, stages, x))])
  output = jnp.sum(output_losses(model.readout(model.phi(stages[-1][-1])), y, loss))
  return jnp.append(hidden, output) / (batch_size or x.shape[0])


def energy(model: Network, z, x: jax.Array, y: jax.Array, *,
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


# Inference holds each stage's layers either as one [S, B, ...] array
# ("batched") or as a tuple of S [B, ...] arrays ("per_layer"). Both support
# x[i], x[a:b] and len(x), and jax.tree.map applies element-wise maps to
# either; these helpers cover the rest.


def _layout(x: jax.Array, per_layer: bool):
  return tuple(x) if per_layer else x


def _stacked(x) -> jax.Array:
  return jnp.stack(x) if isinstance(x, tuple) else x


def _join(lower, upper):
  if isinstance(upper, tuple):
    return tuple(lower) + upper
  return jnp.concatenate([lower, upper]) if len(lower) else upper


def _single(x: jax.Array, like):
  """One layer's [B, ...] array as a one-layer slice in the layout of ``like``."""
  return (x,) if isinstance(like, tuple) else x[None]


def _per_layer_sum_of_squares(x) -> jax.Array:
  if isinstance(x, tuple):
    return jnp.stack([jnp.sum(jnp.square(v)) for v in x]) if x else jnp.zeros((0,))
  return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))


def _locate(model: Network, layer: int) -> tuple[int, int]:
  """(stage, index within the stage) of hidden layer ``layer`` (0 = the bottom)."""
  for stage, top in enumerate(itertools.accumulate(model.stage_layers)):
    if layer < top:
      return stage, layer - top + model.stage_layers[stage]
  raise ValueError(f"Layer {layer} is above the network's {model.hidden_layers} hidden layers.")


class _Start(NamedTuple):
  """Where inference starts, per stage in the model's layout: activities z⁰,
  φ(z⁰), and the errors there (None at the feed-forward start, where they
  are zero by definition)."""

  z: tuple
  phi: tuple
  errors: tuple | None


def _start(model: Network, stages: tuple, errors: tuple | None) -> _Start:
  per_layer = model.hidden_products == "per_layer"
  # The barrier makes XLA compute z⁰ and φ(z⁰) once. Otherwise it may
  # recompute z⁰ inside the fusions that use it, rounded differently
  # (seen: one ulp), and φ(z⁰ + δ) − φ(z⁰) is no longer exactly zero where δ is.
  stages, phi = jax.lax.optimization_barrier((stages, tuple(model.phi(z) for z in stages)))
  layout = lambda arrays: tuple(_layout(a, per_layer) for a in arrays)
  return _Start(layout(stages), layout(phi), None if errors is None else layout(errors))


def _residual_weights(model: Network) -> tuple:
  """Per stage, the residual weights in the model's layout: in "per_layer",
  the stacks are cut into per-layer tuples here, once, outside any loop."""
  per_layer = model.hidden_products == "per_layer"
  return tuple(tuple(tuple(w) if per_layer else w for w in model.residual_weights(s))
               for s in range(len(model.stage_layers)))


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
      shift = model.entry(s, phis[-1][-1] - start.phi[s - 1][-1])
    moved = model.residual_branch(s, weights[i], jax.tree.map(jnp.subtract, phi[:-1], phi0[:-1]))
    shifts = _join(_single(shift, d), jax.tree.map(jnp.add, moved, d[:-1]))
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
    moved = model.phi(start.z[stage][index - 1] + below) - start.phi[stage][index - 1]
    branch = tuple(w[index - 1:index] for w in weights[stage])
    return model.residual_branch(stage, branch, _single(moved, delta[stage]))[0] + below
  if stage:  # a stage's entry layer, from the top of the stage below
    moved = model.phi(start.z[stage - 1][-1] + delta[stage - 1][-1]) - start.phi[stage - 1][-1]
    return model.entry(stage, moved)
  return jnp.zeros_like(start.z[0][0])  # the input projection a_1 W_1 x never moves


def _transpose(f: Callable, h) -> Callable:
  """The transpose of the linear map ``f`` at inputs shaped like ``h``: for a
  layer's product h ↦ a·hW, e ↦ a·eWᵀ (XLA sees the transposed product
  directly, with no forward product to prune)."""
  transpose = jax.linear_transpose(f, h)
  return lambda cotangent: transpose(cotangent)[0]


def _activity_gradient(model: Network, start: _Start, y: jax.Array, delta: tuple, stage: int,
                       index: int, bottom_shift: jax.Array, weights: tuple, loss: Loss,
                       batch_size: int) -> tuple:
  """∂F/∂δ of the layers from (``stage``, ``index``) up, in closed form.

  With e the errors and J_{k+1} the linear map from φ(z_k) to the prediction
  of the layer above (a residual branch, the next stage's entry, or the
  readout, whose "error" is the output error ε):

      B · ∂F/∂δ_k = e_k − e_{k+1} [if layer k+1 has a skip] − φ'(z_k) ⊙ J_{k+1}ᵀ e_{k+1}.

  This is what ``jax.grad`` of the block's energy computes, written so that
  each transposed product feeds one elementwise update (on CPU at 256 × 32,
  inference 1.16× faster than through ``jax.grad``). Layers the wavefront has
  not reached have e = 0 and get exactly zero.
  """
  errors, phis = _errors(model, start, delta, stage, index, bottom_shift, weights)
  above = output_errors(model.readout(phis[-1][-1]), y, loss)
  above = _transpose(model.readout, phis[-1][-1])(above)
  grads = []
  for i in reversed(range(len(errors))):
    s, low = stage + i, index if i == 0 else 0
    e, phi = errors[i], phis[i]
    z = jax.tree.map(jnp.add, start.z[s][low:], delta[i])
    slope = jax.tree.map(lambda v: jax.jvp(model.phi, (v,), (jnp.ones_like(v),))[1], z)
    branch = lambda h, s=s, w=weights[i]: model.residual_branch(s, w, h)
    back = _join(_transpose(branch, phi[:-1])(e[1:]), _single(above, e))
    skip = _join(e[1:], _single(jnp.zeros_like(above), e))
    grads.append(jax.tree.map(lambda e, skip, slope, back: (e - skip - slope * back) / batch_size,
                              e, skip, slope, back))
    if i:  # the entry of stage s, predicted from the top of the stage below
      above = _transpose(lambda h, s=s: model.entry(s, h), phis[i - 1][-1])(e[0])
  return tuple(reversed(grads))


def _descend(model: Network, start: _Start, y: jax.Array, blocks: tuple[tuple[int, int], ...],
             lr: float, loss: Loss, batch_size: int) -> tuple:
  """Gradient descent on the activities; returns the deviations δ from the
  start, per stage in the model's layout.

  Each block (first layer, steps) is one compiled loop over the layers from
  there to the top; nothing but the current δ is carried (no trajectory is stored).
  """
  delta = jax.tree.map(jnp.zeros_like, start.z)
  weights = _residual_weights(model)
  for first, num_steps in blocks:
    stage, index = _locate(model, first)
    bottom_shift = _bottom_shift(model, start, delta, weights, stage, index)
    # Sliced once, outside the loop.
    block_weights = (tuple(w[index:] for w in weights[stage]),) + weights[stage + 1:]

    if model.inference_kernel == "pallas" and kernels.applies(model, stage, index):
      fused = kernels.fused_step(
          model, start.z[0][index:], None if start.errors is None else start.errors[0][index:],
          bottom_shift, block_weights[0], y, lambda outputs, y: output_errors(outputs, y, loss),
          lr, batch_size)
      step = lambda _, d, fused=fused: (fused(d[0]),)
    else:
      def step(_, d, stage=stage, index=index, bottom_shift=bottom_shift, w=block_weights):
        grad = _activity_gradient(model, start, y, d, stage, index, bottom_shift, w, loss, batch_size)
        return jax.tree.map(lambda v, g: v - lr * g, d, grad)

    block = jax.lax.fori_loop(0, num_steps, step, (delta[stage][index:],) + delta[stage + 1:],
                              unroll=bool(model.unroll_inference) or 1)
    delta = delta[:stage] + (_join(delta[stage][:index], block[0]),) + block[1:]
  return delta


def infer(model: Network, x: jax.Array, y: jax.Array, inference: Inference, *,
          z=None, loss: Loss = "mse", batch_size: int | None = None):
  """Inference: ``inference.steps`` gradient steps on the hidden activities.

  Args:
    model: the network (weights are held fixed).
    x: [B, D] clamped inputs.
    y: [B, C] clamped targets.
    inference: steps T, rate β and schedule.
    z: starting activities, as ``model.feedforward`` gives them; None starts
      from the feed-forward pass (the paper's recipe, and the only start the
      wavefront schedule allows).
    loss: output energy, "mse" or "ce".
    batch_size: B of the batch mean; defaults to x.shape[0]. Inside a
      data-parallel step pass the *global* batch size.

  Returns:
    The activities after inference, as z ([H, B, N] for the dense network).
  """
  if z is None:
    stages = model.to_stages(model.feedforward(x))
    start_errors = None
  elif inference.schedule == "wavefront":
    raise ValueError("The wavefront schedule is exact only from the feed-forward start: "
                     "call infer without z, or use Inference(schedule='plain').")
  else:
    stages = model.to_stages(z)
    start_errors = tuple(z - mu for z, mu in zip(stages, _predictions(model, stages, x)))
  delta = _descend(model, _start(model, stages, start_errors), y,
                   _blocks(model.hidden_layers, inference), inference.lr, loss, batch_size or x.shape[0])
  return model.from_stages(tuple(z + _stacked(d) for z, d in zip(stages, delta)))


def _sum_correct(outputs: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.sum(jnp.argmax(outputs, -1) == jnp.argmax(y, -1)).astype(jnp.float32)


class InferenceResult(NamedTuple):
  """The network at the end of inference, all a weight gradient needs.

  errors: hidden errors e_ℓ; phi: φ(z_ℓ); per stage an array [L_s, B, ...],
  or a tuple of L_s [B, ...] arrays for a "per_layer" model (left unstacked:
  on XLA's CPU runtime a concatenation after the inference loop slows the
  loop itself). output_error: [B, C] ε = −∂ℓ_out/∂μ_L.
  """

  errors: tuple
  phi: tuple
  output_error: jax.Array


def pc_inference(model: Network, x: jax.Array, y: jax.Array, inference: Inference, *,
                 loss: Loss = "mse", batch_size: int | None = None) -> tuple[InferenceResult, dict]:
  """Feed-forward start and inference; returns the final state and batch metrics.

  metrics are batch means (divided by ``batch_size``) of: ``loss`` (the
  feed-forward output loss, which is also the energy before inference),
  ``accuracy`` (feed-forward), ``energy`` (after inference) and
  ``layer_energies`` [H + 1] (after inference).
  """
  batch_size = batch_size or x.shape[0]
  start = _start(model, model.to_stages(model.feedforward(x)), None)
  delta = _descend(model, start, y, _blocks(model.hidden_layers, inference), inference.lr, loss,
                   batch_size)
  errors, phi = _errors(model, start, delta, 0, 0, jnp.zeros_like(start.z[0][0]),
                        _residual_weights(model))
  outputs = model.readout(phi[-1][-1])
  ff_outputs = model.readout(start.phi[-1][-1])
  per_layer = jnp.append(jnp.concatenate([0.5 * _per_layer_sum_of_squares(e) for e in errors]),
                         jnp.sum(output_losses(outputs, y, loss))) / batch_size
  metrics = {
      "loss": jnp.sum(output_losses(ff_outputs, y, loss)) / batch_size,
      "accuracy": _sum_correct(ff_outputs, y) / batch_size,
      "energy": jnp.sum(per_layer),
      "layer_energies": per_layer,
  }
  return InferenceResult(errors, phi, output_errors(outputs, y, loss)), metrics


def pc_weight_gradients(model: Network, x: jax.Array, result: InferenceResult,
                        batch_size: int | None = None) -> nnx.State:
  """∂F/∂W at the end of inference (= ``jax.grad`` of ``energy``), as an
  ``nnx.State`` of the ``nnx.Param`` gradients.

  Every prediction is linear in its own weights with the activities fixed,
  so ∂F/∂W is the transpose of that map applied to −e/B: for the dense
  network ∂F/∂W_ℓ = −(a_ℓ/B) φ(z_{ℓ-1})ᵀe_ℓ (x for W_1; ε for the readout),
  for a convolution its weight gradient. A layer whose error is exactly zero
  gets exactly zero. The weights enter in float32 even under "bfloat16" precision.
  """
  scale = -1.0 / (batch_size or x.shape[0])
  per_layer = model.gradient_products == "per_layer"
  in_layout = lambda stage: (stage if isinstance(stage, tuple) == per_layer
                            else _layout(_stacked(stage), per_layer))
  phi = tuple(in_layout(p) for p in result.phi)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def predictions(params):
    network = nnx.merge(graphdef, params, rest)
    out, below = [], x
    for s, h in enumerate(phi):
      weights = tuple(_layout(w, per_layer) for w in network.residual_weights(s, jnp.float32))
      out.append((network.entry(s, below), network.residual_branch(s, weights, h[:-1])))
      below = h[-1]
    return tuple(out), network.readout(phi[-1][-1])

  _, transpose = jax.vjp(predictions, params)
  scaled = jax.tree.map(lambda e: scale * e, tuple(in_layout(e) for e in result.errors))
  (grads,) = transpose((tuple((e[0], e[1:]) for e in scaled), scale * result.output_error))
  return grads


def pc_gradients(model: Network, x: jax.Array, y: jax.Array, inference: Inference, *,
                 loss: Loss = "mse", batch_size: int | None = None) -> tuple[nnx.State, dict]:
  """PC weight gradients: feed-forward start, inference, ∂F/∂W at the final z.

  Returns (grads, metrics): ``pc_weight_gradients`` of ``pc_inference``.
  """
  result, metrics = pc_inference(model, x, y, inference, loss=loss, batch_size=batch_size)
  return pc_weight_gradients(model, x, result, batch_size), metrics


def bp_gradients(model: Network, x: jax.Array, y: jax.Array, *, loss: Loss = "mse",
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
