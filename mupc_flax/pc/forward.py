"""What the engine derives from a ``PCNetwork``: its depth, the forms of its
activities, its weights in a layout, and its feed-forward pass.

Activities are held per stage, each an array [1 + R_s, B, ...] with the layer
axis first. The public form (what ``feedforward`` and ``pc.infer`` return and
``pc.energy`` takes) is that tuple of stages, or, for a network of one stage,
its one array.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from mupc_flax.pc import layouts, options
from mupc_flax.pc.layouts import cut, is_stacked


def hidden_layers(network) -> int:
  """H, the hidden (free) layers over every stage."""
  return sum(network.stage_layers)


def as_stages(z) -> tuple:
  """Activities in the public form as a tuple of per-stage arrays."""
  return z if isinstance(z, tuple) else (z,)


def public_form(network, stages: tuple):
  """A tuple of per-stage arrays in the public form."""
  return stages[0] if len(network.stage_layers) == 1 else tuple(stages)


def residual_weights(network, per_layer: bool, dtype: Any = None) -> tuple:
  """Per stage, the residual weights in the layout: with ``per_layer``,
  stacked sequences are cut into per-layer tuples here, once, outside any loop."""
  out = []
  for s in range(len(network.stage_layers)):
    weights = network.residual_weights(s, dtype)
    out.append(cut(weights, 0, None, per_layer=True) if per_layer and is_stacked(weights)
               else weights)
  return tuple(out)


def _stage(network, stage: int, z: jax.Array, weights: tuple, unrolled: bool, keep_all: bool,
           errors: jax.Array | None = None):
  """The residual layers of one stage from its entry activity z [B, ...]:
  all its activities [1 + R_s, B, ...] (``keep_all``), or its top one.
  ``errors`` [R_s, B, ...]: added to each residual layer's prediction (ePC's
  error-perturbed pass); None: none."""
  layers = network.stage_layers[stage] - 1
  if unrolled or not layers or not is_stacked(weights):
    activities = [z]
    for k in range(layers):
      z = network.residual_branch(stage, cut(weights, k, k + 1, per_layer=True),
                                  (network.phi(z),))[0] + z
      z = z if errors is None else z + errors[k]
      activities.append(z)
    return jnp.stack(activities) if keep_all else z

  def layer(z, weights_and_error):
    layer_weights, error = weights_and_error
    z = network.residual_branch(stage, tuple(w[None] for w in layer_weights),
                                network.phi(z)[None])[0] + z
    z = z if error is None else z + error
    return z, (z if keep_all else None)

  top, rest = jax.lax.scan(layer, z, (weights, errors))
  return jnp.concatenate([z[None], rest]) if keep_all else top


def feedforward(network, x: jax.Array, *, unrolled: bool | None = None) -> Any:
  """The feed-forward pass: every activity at its prediction, z_ℓ = μ_ℓ, in
  the public form. ``unrolled``: one product per layer, written out (else a
  compiled loop over a stage whose weights are stacked); None: as the
  engine's default plan starts inference (so the same numbers)."""
  if unrolled is None:
    unrolled = options.plan(None, network, x).unrolled
  return public_form(network, perturbed_stages(network, x, None, unrolled))


def perturbed_stages(network, x: jax.Array, errors: tuple | None, unrolled: bool) -> tuple:
  """The error-perturbed forward pass of error-parameterised PC, per stage:
  z_ℓ = μ_ℓ(z_{ℓ−1}) + ε_ℓ from x, with ``errors`` ε per stage as one
  stacked array [1 + R_s, B, ...] (not a per-layer tuple); None: the
  feed-forward pass (ε = 0)."""
  stages, below = [], x
  for s in range(len(network.stage_layers)):
    entry = network.entry(s, below)
    if errors is not None:
      entry = entry + errors[s][0]
    z = _stage(network, s, entry, network.residual_weights(s), unrolled, True,
               None if errors is None else errors[s][1:])
    stages.append(z)
    below = network.phi(z[-1])
  return tuple(stages)


def predict(network, x: jax.Array) -> jax.Array:
  """The feed-forward prediction μ_L [B, C] (test time: no inference), in
  compiled loops over stacked stages unless the engine's default plan unrolls."""
  unrolled, h = options.plan(None, network, x).unroll, x
  for s in range(len(network.stage_layers)):
    h = network.phi(_stage(network, s, network.entry(s, h), network.residual_weights(s),
                           unrolled, False))
  return network.readout(h)


def predictions(network, stages: tuple, x: jax.Array) -> tuple:
  """The prediction μ of every hidden layer at activities ``stages``, per stage."""
  out, below = [], x
  for s, z in enumerate(stages):
    residual = network.residual_branch(s, network.residual_weights(s), network.phi(z[:-1])) + z[:-1]
    out.append(jnp.concatenate([network.entry(s, below)[None], residual]))
    below = network.phi(z[-1])
  return tuple(out)


def weight_stacks(network, params) -> list[jax.Array]:
  """The network's ``weight_stacks`` of ``params`` (an ``nnx.State`` or pure
  dict of its ``nnx.Param``s, or a gradient shaped like them); without one,
  every ``nnx.Param`` array is one row, in path order."""
  if hasattr(network, "weight_stacks"):
    return network.weight_stacks(params)
  # Picked by the network's own Param paths: a whole model state holds the
  # premultipliers too, and an update's State does not say which is which.
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(params) if isinstance(params, nnx.State)
                                    else params)
  wanted = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(network, nnx.Param)))
  return [jnp.reshape(flat[path], (1, -1)) for path in wanted]


__all__ = ["hidden_layers", "as_stages", "public_form", "is_stacked", "cut", "residual_weights",
           "feedforward", "perturbed_stages", "predict", "predictions", "weight_stacks", "layouts"]
