"""The one contract between a network and the predictive coding engine.

The engine (``mupc_flax.pc``) sees a network as a stack of *stages*. A stage
is a run of hidden layers whose activities share one shape [B, ...]: an
*entry* layer (no skip) followed by *residual* layers, each predicting
z_ℓ from the layer below through an identity skip and a branch:

    stage s, layer 0:   μ = entry(s, x)                      (s = 0: the input x)
                        μ = entry(s, φ(z_top of stage s−1))   (s > 0)
    stage s, layer k:   μ = z_{k−1} + residual_branch(s, W_k, φ(z_{k−1}))
    output:             μ_L = readout(φ(z_top of the last stage))

The energy is F = Σ_ℓ ½‖z_ℓ − μ_ℓ‖² + ℓ_out(y, μ_L) (``pc.energy``). Any Flax
NNX module with the six members below is a PC network: the engine infers,
learns, shards, checkpoints and diagnoses it with no other knowledge of it.
How the engine computes (layouts, unrolling, closed forms, kernels) is the
engine's choice (``pc.Engine``), never the network's.

Two optional members refine it:

- ``linear_branches: bool`` — True declares that every entry, residual
  branch and the readout is a linear map of its input (φ(z), or x). The
  engine may then use the maps' transposes in closed form; without it, it
  uses their vector–Jacobian products (always correct).
- ``weight_stacks(params) -> list[array]`` — the weights of each PC layer,
  bottom to top, each with a leading axis over the layers it holds, for the
  per-layer diagnostics. Without it, each ``nnx.Param`` is one row.

The premultipliers and initialisation follow from each weight's role
(entry, residual, readout, inner) in the one table of ``parameterization``:
build layers with ``Parameterization.layer_options(role, …)`` (the
premultiplier, the initialiser, and the per-role optimizer scale the weight
``nnx.Param`` carries as metadata), or ``Parameterization.multiplier`` and
``init`` alone.
"""

from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class PCNetwork(Protocol):
  """A residual network the μPC engine can train (see the module docstring).

  Members:
    stage_layers: the number of hidden layers of each stage, (1 + R_s, …).
    phi: the activity function φ, elementwise on any activity.
    entry: ``entry(stage, h)``, the prediction [B, ...] of the stage's first
      layer from the input x [B, D] (stage 0) or from φ of the top activity
      of the stage below.
    residual_weights: ``residual_weights(stage, dtype=None)``, the weights
      of the stage's R_s residual branches as a tuple of layer-indexed
      sequences (arrays with a leading layer axis [R_s, ...], or tuples of
      R_s per-layer values); the engine slices each sequence to the layers
      it works on. ``dtype`` asks for kernels in that dtype (None: the
      network's own).
    residual_branch: ``residual_branch(stage, weights, h)``, the branches of
      the layers ``weights`` holds (sliced as above) applied to their inputs
      ``h``: an array [S, B, ...] (S layers) or a tuple of S arrays [B, ...];
      returns the same form.
    readout: ``readout(h)``, the output prediction [B, C] from φ of the top
      activity, or [B, ..., C] (e.g. [B, T, C], one per token): the output
      energy sums the loss over a sample's positions.
  """

  stage_layers: tuple[int, ...]

  def phi(self, z: jax.Array) -> jax.Array: ...

  def entry(self, stage: int, h: jax.Array) -> jax.Array: ...

  def residual_weights(self, stage: int, dtype: Any = None) -> tuple: ...

  def residual_branch(self, stage: int, weights: tuple, h: Any) -> Any: ...

  def readout(self, h: jax.Array) -> jax.Array: ...
