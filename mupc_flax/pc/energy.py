"""The energy of a predictive coding network: its one definition, and the losses.

The energy of a batch, averaged over its B samples (B is the *global* batch
when the batch is split over devices):

    F = (1/B) Σ_i [ Σ_{ℓ=1..H} ½‖e_ℓ‖² + ℓ_out(μ_L, y) ],   e_ℓ = z_ℓ − μ_ℓ.

``energy_terms`` is that sum, term by term, over the errors and the outputs;
everything else derives from it: ``layer_energies`` and ``energy`` at given
activities, the general path of inference (``jax.grad`` of it over the
activities) and the weight gradients (its gradient over the predictions,
pulled back through the network). The output loss ℓ_out is an ``OutputLoss``,
one function per sample; its error −∂ℓ_out/∂μ_L is ``jax.grad`` of it.
Shapes: x [B, D] (token ids [B, T] for a language model), y [B, C] or
[B, ..., C] as the readout, and z in the public form of ``pc.forward``
(per stage [1 + R_s, B, ...]; one stage: that array, [H, B, N] for the dense
``ResidualPCN``).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from mupc_flax.networks.protocol import PCNetwork
from mupc_flax.pc import forward, layouts

# Any network of the ``PCNetwork`` protocol.
Network = PCNetwork
"""Any network the engine takes: the ``PCNetwork`` protocol (``mupc_flax.networks.protocol``)."""


@dataclasses.dataclass(frozen=True)
class OutputLoss:
  """An output energy ℓ_out, defined once by its value per sample.

  Attributes:
    name: what configs call it ("mse", "ce").
    per_sample: (outputs μ_L [B, ..., C], targets y [B, ..., C]) -> ℓ_out
      [B, ...]: one value per output vector, so per token where a network
      outputs [B, T, C]. The energy sums them over a sample's positions.
  """

  name: str
  per_sample: Callable[[jax.Array, jax.Array], jax.Array]

  def __call__(self, outputs: jax.Array, y: jax.Array) -> jax.Array:
    """ℓ_out of each sample [B]: the sum over its positions where outputs are [B, T, C]."""
    per_position = self.per_sample(outputs, y)
    return jnp.sum(per_position.reshape(per_position.shape[0], -1), axis=1)

  def per_token(self, outputs: jax.Array, y: jax.Array) -> jax.Array:
    """ℓ_out of each sample per output vector [B]: the mean over its positions
    (the loss per token that language models report; ℓ_out itself for [B, C])."""
    per_position = self.per_sample(outputs, y)
    return jnp.mean(per_position.reshape(per_position.shape[0], -1), axis=1)

  def error(self, outputs: jax.Array, y: jax.Array) -> jax.Array:
    """The output error ε = −∂ℓ_out/∂μ_L, shaped as the outputs (``jax.grad`` of ``per_sample``)."""
    return -jax.grad(lambda o: jnp.sum(self.per_sample(o, y)))(outputs)

  def weighted(self, precision: float) -> "OutputLoss":
    """γ·ℓ_out: the output term at precision γ (itself at γ = 1)."""
    if precision == 1:
      return self
    return OutputLoss(f"{precision:g}·{self.name}",
                      lambda outputs, y: precision * self.per_sample(outputs, y))


MSE = OutputLoss("mse", lambda outputs, y: 0.5 * jnp.sum(jnp.square(y - outputs), axis=-1))
"""The squared error ½‖y − μ_L‖² per sample (``loss="mse"``)."""
CROSS_ENTROPY = OutputLoss(
    "ce", lambda outputs, y: -jnp.sum(y * jax.nn.log_softmax(outputs, axis=-1), axis=-1))
"""The softmax cross-entropy −Σ_c y_c log softmax(μ_L)_c per sample (``loss="ce"``)."""
LOSSES = {loss.name: loss for loss in (MSE, CROSS_ENTROPY)}
"""The built-in output losses by name: ``"mse"`` (``MSE``) and ``"ce"`` (``CROSS_ENTROPY``)."""

# A loss by its name in ``LOSSES`` or as an ``OutputLoss`` of one's own.
Loss = str | OutputLoss
"""An output loss: a name in ``LOSSES`` or an ``OutputLoss`` of one's own."""


def loss_of(loss: Loss) -> OutputLoss:
  """The ``OutputLoss`` a name (or the loss itself) stands for."""
  if isinstance(loss, OutputLoss):
    return loss
  if loss not in LOSSES:
    raise ValueError(f"Unknown loss {loss!r}; choose one of {list(LOSSES)} or pass a "
                     "pc.OutputLoss.")
  return LOSSES[loss]


def sample_accuracies(outputs: jax.Array, y: jax.Array) -> jax.Array:
  """Per sample [B], the fraction of its output vectors (outputs [B, ..., C])
  whose argmax is that of y: 1 or 0 for [B, C], per-token accuracy for [B, T, C]."""
  hits = (jnp.argmax(outputs, -1) == jnp.argmax(y, -1)).astype(jnp.float32)
  return jnp.mean(hits.reshape(hits.shape[0], -1), axis=1)


def count_correct(outputs: jax.Array, y: jax.Array) -> jax.Array:
  """The sum of ``sample_accuracies`` (float32): over B, the number of rows
  of [B, C] predicted right, and B × the per-token accuracy for [B, T, C]."""
  return jnp.sum(sample_accuracies(outputs, y))


def energy_terms(errors: tuple, outputs: jax.Array, y: jax.Array, loss: Loss,
                 batch_size: int) -> jax.Array:
  """The energy term by term [H' + 1]: ½‖e‖² of each hidden layer given, then ℓ_out.

  Args:
    errors: per stage, the errors of its layers ([S, B, ...] or a tuple of S
      [B, ...] arrays); H' layers in all (a block of the top layers, or all H).
    outputs: [B, ..., C] the readout μ_L; y: the targets, shaped alike.
    loss: the output energy; batch_size: B of the batch mean.
  """
  hidden = [0.5 * layouts.per_layer_sum_of_squares(e) for e in errors]
  output = jnp.sum(loss_of(loss)(outputs, y))
  return jnp.append(jnp.concatenate(hidden) if hidden else jnp.zeros((0,)), output) / batch_size


def energy_gradients(errors: tuple, outputs: jax.Array, y: jax.Array, loss: Loss,
                     batch_size: int) -> tuple[tuple, jax.Array]:
  """(∂F/∂e per stage, ∂F/∂μ_L [B, ..., C]): ``jax.grad`` of ``energy_terms``' sum."""
  return jax.grad(lambda e, o: jnp.sum(energy_terms(e, o, y, loss, batch_size)),
                  argnums=(0, 1))(errors, outputs)


def layer_energies(model: Network, z, x: jax.Array, y: jax.Array, *,
                   loss: Loss = "mse", batch_size: int | None = None) -> jax.Array:
  """Per-layer energies [H + 1] at activities z: hidden layers 1…H (bottom to
  top, over every stage), then the output.

  Each is a batch mean (divided by ``batch_size``, default x.shape[0]).
  """
  stages = forward.as_stages(z)
  errors = tuple(z - mu for z, mu in zip(stages, forward.predictions(model, stages, x)))
  return energy_terms(errors, model.readout(model.phi(stages[-1][-1])), y, loss,
                      batch_size or x.shape[0])


def energy(model: Network, z, x: jax.Array, y: jax.Array, *,
           loss: Loss = "mse", batch_size: int | None = None) -> jax.Array:
  """The energy F (scalar), the sum of ``layer_energies``."""
  return jnp.sum(layer_energies(model, z, x, y, loss=loss, batch_size=batch_size))
