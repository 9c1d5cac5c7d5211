"""The energy of a predictive coding network and its output terms.

The energy of a batch, averaged over its B samples (B is the *global* batch
when the batch is split over devices):

    F = (1/B) Σ_i [ Σ_{ℓ=1..H} ½‖e_ℓ‖² + ℓ_out(y, μ_L) ],   e_ℓ = z_ℓ − μ_ℓ,

with ℓ_out = ½‖y − μ_L‖² ("mse") or −Σ_c y_c log softmax(μ_L)_c ("ce").
Shapes: x [B, D], y [B, C], and z in the public form of ``pc.forward``
(per stage [1 + R_s, B, ...]; one stage: that array, [H, B, N] for the dense
``ResidualPCN``).
"""

from typing import Literal

import jax
import jax.numpy as jnp

from mupc_flax.networks.protocol import PCNetwork
from mupc_flax.pc import forward, layouts

# Any network of the ``PCNetwork`` protocol.
Network = PCNetwork

Loss = Literal["mse", "ce"]


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


def count_correct(outputs: jax.Array, y: jax.Array) -> jax.Array:
  """How many rows of outputs [B, C] have their argmax at that of y [B, C] (float32)."""
  return jnp.sum(jnp.argmax(outputs, -1) == jnp.argmax(y, -1)).astype(jnp.float32)


def layer_energies(model: Network, z, x: jax.Array, y: jax.Array, *,
                   loss: Loss = "mse", batch_size: int | None = None) -> jax.Array:
  """Per-layer energies [H + 1] at activities z: hidden layers 1…H (bottom to
  top, over every stage), then the output.

  Each is a batch mean (divided by ``batch_size``, default x.shape[0]).
  """
  stages = forward.as_stages(model, z)
  hidden = jnp.concatenate([0.5 * layouts.per_layer_sum_of_squares(z - mu)
                            for z, mu in zip(stages, forward.predictions(model, stages, x))])
  output = jnp.sum(output_losses(model.readout(model.phi(stages[-1][-1])), y, loss))
  return jnp.append(hidden, output) / (batch_size or x.shape[0])


def energy(model: Network, z, x: jax.Array, y: jax.Array, *,
           loss: Loss = "mse", batch_size: int | None = None) -> jax.Array:
  """The energy F (scalar), the sum of ``layer_energies``."""
  return jnp.sum(layer_energies(model, z, x, y, loss=loss, batch_size=batch_size))
