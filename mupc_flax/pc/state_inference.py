"""Inference on the activities (PC, the paper): optimiser steps on δ = z − z⁰.

Each phase (first layer, steps) of the schedule is one compiled loop over
the layers from there to the top; the loop carries their δ and optimiser
state, nothing else. Below them, δ, the gradient and the optimiser state are
zero and stay so. Every optimiser keeps the wavefront exact as long as a
zero gradient with a zero state gives a zero update, which holds for any
elementwise optax transformation whose state starts at zero (momentum,
Nesterov, Adam, RMSProp, …).
"""

import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mupc_flax.pc import deviations, forward, layouts, pallas_step
from mupc_flax.pc.activity_gradients import closed_form_gradient, energy_gradient, upper_energy
from mupc_flax.pc.descent import Equilibrium, Problem, Progress, loop, report
from mupc_flax.pc.energy import Network, loss_of
from mupc_flax.pc.step_guard import guarded_lr


def _locate(model: Network, layer: int) -> tuple[int, int]:
  """(stage, index within the stage) of hidden layer ``layer`` (0 = the bottom)."""
  for stage, top in enumerate(itertools.accumulate(model.stage_layers)):
    if layer < top:
      return stage, layer - top + model.stage_layers[stage]
  raise ValueError(f"Layer {layer} is above the network's {forward.hidden_layers(model)} hidden "
                   "layers.")


def _activity_trees(tx: optax.GradientTransformation, state) -> list:
  """The parts of an optimiser state shaped like the activities (e.g. the
  momentum), in a fixed order."""
  trees = []
  optax.tree_map_params(tx, lambda tree: trees.append(tree) or tree, state, is_leaf=lambda _: True)
  return trees


def _map_activity_trees(tx: optax.GradientTransformation, f: Callable, state, *others):
  """``state`` with each activity-shaped part p replaced by f(p, *the same part
  of each of ``others``); its other fields (e.g. step counts) kept."""
  parts = iter(zip(*(_activity_trees(tx, o) for o in others))) if others else None
  return optax.tree_map_params(tx, lambda tree: f(tree, *(next(parts) if parts else ())), state,
                               is_leaf=lambda _: True)


def _phase_update(problem: Problem, start: deviations.Start, upper: deviations.Upper,
                  tx: optax.GradientTransformation) -> Callable:
  """One step on the ``upper`` layers: (δ, state) -> (δ, state, ∂F/∂δ), by
  the Pallas kernel where the plan chooses it (no gradient returned: it
  runs a fixed number of steps), else by the activity gradient and ``tx``."""
  if problem.plan.kernel == "pallas" and forward.hidden_layers(problem.model) - upper.index >= 2:
    fused = pallas_step.fused_step(
        problem.model, start.z[0][upper.index:],
        None if start.errors is None else start.errors[0][upper.index:], upper.bottom_shift,
        upper.weights[0], problem.y, loss_of(problem.loss).error, problem.inference.lr,
        problem.batch_size)
    return lambda d, s: ((fused(d[0]),), s, None)
  activity_gradient = closed_form_gradient if problem.plan.closed_form else energy_gradient

  def update(d, s):
    grad = activity_gradient(problem, start, upper, d)
    updates, s = tx.update(grad, s, d)
    return optax.apply_updates(d, updates), s, grad

  return update


def infer_states(problem: Problem, stages: tuple | None) -> Equilibrium:
  """Inference on the activities from ``stages`` (None: the feed-forward start)."""
  model, inference = problem.model, problem.inference
  if stages is None:
    stages, errors = deviations.feedforward_stages(model, problem.x, problem.plan), None
  else:
    errors = deviations.start_errors(problem, stages)
  start = deviations.start(problem, stages, errors)
  weights = start.weights
  delta = jax.tree.map(jnp.zeros_like, start.z)
  lr, eigenvalue = guarded_lr(problem, lambda d: upper_energy(problem, start, deviations.whole(start), d),
                              delta, start.z)
  tx = inference.transformation(lr)
  state = tx.init(delta)
  progress = Progress(jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.full((), jnp.inf))
  end = 0
  for first, num_steps in inference.phases_for(forward.hidden_layers(model)):
    stage, index = _locate(model, first)
    # Sliced once, outside the loop.
    upper = deviations.Upper(stage, index, deviations.bottom_shift(problem, start, delta, stage, index),
                             (tuple(w[index:] for w in weights[stage]),) + weights[stage + 1:])
    upper_state = _map_activity_trees(tx, lambda tree: layouts.upper(tree, stage, index), state)
    end += num_steps
    (upper_delta, upper_state), progress = loop(
        _phase_update(problem, start, upper, tx), (layouts.upper(delta, stage, index), upper_state),
        num_steps, end, progress, problem)
    delta = layouts.with_upper(delta, upper_delta, stage, index)
    # The upper layers' state carries the other fields (Adam's step count) on.
    state = _map_activity_trees(
        tx, lambda part, tree: layouts.with_upper(tree, part, stage, index), upper_state, state)
  errors, phi = deviations.errors_from(problem, start, delta, deviations.whole(start))
  return Equilibrium(tuple(z + layouts.stacked(d) for z, d in zip(stages, delta)), errors, phi,
                     model.readout(start.phi[-1][-1]), report(inference, progress, lr, eigenvalue))
