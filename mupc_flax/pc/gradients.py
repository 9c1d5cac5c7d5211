"""Weight gradients: PC's at the end of inference, and backprop's."""

import jax
import jax.numpy as jnp
from flax import nnx

from mupc_flax.pc import forward, layouts
from mupc_flax.pc.energy import Loss, Network, count_correct, loss_of
from mupc_flax.pc.inference import Inference, InferenceResult, pc_inference
from mupc_flax.pc.options import Engine, Plan, plan


def pc_weight_gradients(model: Network, x: jax.Array, result: InferenceResult,
                        engine: Engine | Plan | None = None) -> nnx.State:
  """∂F/∂W at the end of inference, as an ``nnx.State`` of the ``nnx.Param`` gradients.

  With the activities fixed, W enters F only through the predictions, so
  ∂F/∂W = (∂μ/∂W)ᵀ ∂F/∂μ: the vector–Jacobian product of the network's maps
  (entries, residual branches, readout) at φ(z), applied to the energy's
  gradient over the predictions in ``result`` (−e/B for the hidden layers).
  This is ``jax.grad`` of ``energy`` over the weights, without recomputing
  the errors: a layer whose error is exactly zero gets exactly zero. The
  weights enter in float32 even under "bfloat16" precision. ``engine``: its
  ``gradient_layout`` (that of the products here, whatever the layout of
  ``result``), or the ``Plan`` already made for this network and x.
  """
  per_layer = (engine if isinstance(engine, Plan) else plan(engine, model, x)).gradient_per_layer
  in_layout = lambda stage: (stage if isinstance(stage, tuple) == per_layer
                            else layouts.arrange(layouts.stacked(stage), per_layer))
  phi = tuple(in_layout(p) for p in result.phi)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def predictions(params):
    network = nnx.merge(graphdef, params, rest)
    out, below = [], x
    for s, h in enumerate(phi):
      weights = network.residual_weights(s, jnp.float32)
      if layouts.is_stacked(weights):
        weights = layouts.arrange_each(weights, per_layer)
      out.append((network.entry(s, below), network.residual_branch(s, weights, h[:-1])))
      below = h[-1]
    return tuple(out), network.readout(phi[-1][-1])

  _, transpose = jax.vjp(predictions, params)
  prediction_grads = jax.tree.map(jnp.negative, tuple(in_layout(g) for g in result.error_grads))
  (grads,) = transpose((tuple((g[0], g[1:]) for g in prediction_grads), result.output_grad))
  return grads


def pc_gradients(model: Network, x: jax.Array, y: jax.Array, inference: Inference, *,
                 loss: Loss = "mse", batch_size: int | None = None) -> tuple[nnx.State, dict]:
  """PC weight gradients: feed-forward start, inference, ∂F/∂W at the final z.

  Returns (grads, metrics): ``pc_weight_gradients`` of ``pc_inference``.
  """
  result, metrics = pc_inference(model, x, y, inference, loss=loss, batch_size=batch_size)
  return pc_weight_gradients(model, x, result, inference.engine), metrics


def bp_gradients(model: Network, x: jax.Array, y: jax.Array, *, loss: Loss = "mse",
                 batch_size: int | None = None) -> tuple[nnx.State, dict]:
  """Backprop gradients of the batch-mean output loss of the feed-forward pass.

  With the "mupc" parameterisation this is the paper's "BP with Depth-μP".
  Returns (grads, metrics with ``loss`` and ``accuracy``), as ``pc_gradients``.
  """
  batch_size = batch_size or x.shape[0]

  def mean_loss(model):
    outputs = forward.predict(model, x)
    return jnp.sum(loss_of(loss)(outputs, y)) / batch_size, outputs

  (_, outputs), grads = nnx.value_and_grad(mean_loss, has_aux=True)(model)
  return grads, {"loss": jnp.sum(loss_of(loss).per_token(outputs, y)) / batch_size,
                 "accuracy": count_correct(outputs, y) / batch_size}
