"""Weight gradients: PC's at the end of inference, and backprop's."""

import jax
import jax.numpy as jnp
from flax import nnx

from mupc_flax.pc import forward, layouts
from mupc_flax.pc.energy import Loss, Network, count_correct, output_losses
from mupc_flax.pc.inference import Inference, InferenceResult, pc_inference
from mupc_flax.pc.options import Engine, plan


def pc_weight_gradients(model: Network, x: jax.Array, result: InferenceResult,
                        batch_size: int | None = None, engine: Engine | None = None) -> nnx.State:
  """∂F/∂W at the end of inference (= ``jax.grad`` of ``energy``), as an
  ``nnx.State`` of the ``nnx.Param`` gradients.

  Every prediction is linear in its own weights with the activities fixed,
  so ∂F/∂W is the transpose of that map applied to −e/B: for the dense
  network ∂F/∂W_ℓ = −(a_ℓ/B) φ(z_{ℓ-1})ᵀe_ℓ (x for W_1; ε for the readout),
  for a convolution its weight gradient. A layer whose error is exactly zero
  gets exactly zero. The weights enter in float32 even under "bfloat16"
  precision. ``engine``: its ``gradient_layout`` (that of the products here,
  whatever the layout of ``result``).
  """
  scale = -1.0 / (batch_size or x.shape[0])
  per_layer = plan(engine, model, x).gradient_per_layer
  in_layout = lambda stage: (stage if isinstance(stage, tuple) == per_layer
                            else layouts.arrange(layouts.stacked(stage), per_layer))
  phi = tuple(in_layout(p) for p in result.phi)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def predictions(params):
    network = nnx.merge(graphdef, params, rest)
    out, below = [], x
    for s, h in enumerate(phi):
      weights = network.residual_weights(s, jnp.float32)
      if forward.is_stacked(weights):
        weights = tuple(layouts.arrange(w, per_layer) for w in weights)
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
  return pc_weight_gradients(model, x, result, batch_size, inference.engine), metrics


def bp_gradients(model: Network, x: jax.Array, y: jax.Array, *, loss: Loss = "mse",
                 batch_size: int | None = None) -> tuple[nnx.State, dict]:
  """Backprop gradients of the batch-mean output loss of the feed-forward pass.

  With the "mupc" parameterisation this is the paper's "BP with Depth-μP".
  Returns (grads, metrics with ``loss`` and ``accuracy``), as ``pc_gradients``.
  """
  batch_size = batch_size or x.shape[0]

  def mean_loss(model):
    outputs = forward.predict(model, x)
    return jnp.sum(output_losses(outputs, y, loss)) / batch_size, outputs

  (value, outputs), grads = nnx.value_and_grad(mean_loss, has_aux=True)(model)
  return grads, {"loss": value, "accuracy": count_correct(outputs, y) / batch_size}
