"""Predictive coding: the energy, inference over activities, weight gradients.

Inference is a number of optimiser steps on the activities from the
feed-forward start (the paper: T steps of z ← z − β ∂F/∂z); learning takes
∂F/∂W at the final activities. One engine serves every network of the
``PCNetwork`` protocol (``mupc_flax.networks.protocol``). It is split by concern:

- ``energy``: F, defined once (``energy_terms``), and the output losses;
- ``forward``: what the engine derives from a network (depth, forms of the
  activities, the feed-forward pass);
- ``options``: the engine's choices (``Engine``: layouts, unrolling, closed
  forms, the Pallas kernel), planned per network from the backend and shapes;
- ``inference``: ``Inference`` (method, optimiser, schedule, stop), ``METHODS``
  (method name -> the function that runs it), ``infer`` and ``pc_inference``;
- ``descent``: the contract of a method (``InferenceMethod``: a ``Problem``
  in, an ``Equilibrium`` out) and the descent loop every method runs;
- ``state_inference`` and ``error_inference``: the two methods, on the
  activities (PC) and on the errors (ePC);
- ``deviations``: the start of inference, and the errors as deviations from
  it (exact below the wavefront); ``activity_gradients``: ∂F/∂δ by
  ``jax.grad`` of the one energy or in closed form;
- ``step_guard``: β capped by the stability bound over λ_max;
- ``gradients``: PC weight gradients at the end of inference, and BP's;
- ``layouts``: the two ways a stage's layers are held (stacked, per layer);
- ``pallas_step``: the fused Pallas inference step of a dense stage (opt-in).
"""

from mupc_flax.pc.energy import (CROSS_ENTROPY, LOSSES, MSE, Loss, Network, OutputLoss,
                                 count_correct, energy, energy_gradients, energy_terms,
                                 layer_energies, loss_of, sample_accuracies)
from mupc_flax.pc.forward import feedforward, hidden_layers, predict
from mupc_flax.pc.gradients import bp_gradients, pc_gradients, pc_weight_gradients
from mupc_flax.pc.descent import Equilibrium, InferenceMethod, Problem
from mupc_flax.pc.inference import (METHODS, Inference, InferenceResult, Optimizer, Schedule, infer,
                                    pc_inference, wavefront_phases)
from mupc_flax.pc.options import Engine, Plan, plan

__all__ = [
    "CROSS_ENTROPY", "LOSSES", "MSE", "Loss", "Network", "OutputLoss", "count_correct", "sample_accuracies", "energy",
    "energy_gradients", "energy_terms", "layer_energies", "loss_of", "feedforward", "hidden_layers", "predict", "bp_gradients", "pc_gradients",
    "pc_weight_gradients", "Equilibrium", "InferenceMethod", "Problem", "METHODS", "Inference", "InferenceResult", "Optimizer", "Schedule", "infer",
    "pc_inference", "wavefront_phases", "Engine", "Plan", "plan",
]
