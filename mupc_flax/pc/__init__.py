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
- ``inference``: ``Inference`` (optimiser, schedule, stop), ``infer`` and
  ``pc_inference``, exact below the wavefront;
- ``gradients``: PC weight gradients at the end of inference, and BP's;
- ``layouts``: the two ways a stage's layers are held (stacked, per layer);
- ``pallas_step``: the fused Pallas inference step of a dense stage (opt-in).
"""

from mupc_flax.pc.energy import (CROSS_ENTROPY, LOSSES, MSE, Loss, Network, OutputLoss,
                                 count_correct, energy, energy_gradients, energy_terms,
                                 layer_energies, loss_of)
from mupc_flax.pc.forward import feedforward, hidden_layers, predict
from mupc_flax.pc.gradients import bp_gradients, pc_gradients, pc_weight_gradients
from mupc_flax.pc.inference import (Inference, InferenceResult, Optimizer, Schedule, infer,
                                    pc_inference, wavefront_phases)
from mupc_flax.pc.options import Engine, Plan, plan

__all__ = [
    "CROSS_ENTROPY", "LOSSES", "MSE", "Loss", "Network", "OutputLoss", "count_correct", "energy",
    "energy_gradients", "energy_terms", "layer_energies", "loss_of", "feedforward", "hidden_layers", "predict", "bp_gradients", "pc_gradients",
    "pc_weight_gradients", "Inference", "InferenceResult", "Optimizer", "Schedule", "infer",
    "pc_inference", "wavefront_phases", "Engine", "Plan", "plan",
]
