"""Error-parameterised inference (ePC, Goemaere et al. 2025): optimiser steps
on the errors ε (per stage, [1 + R_s, B, ...]).

Each step is ``jax.grad`` over ε of the one energy at the error-perturbed
forward pass z_ℓ = μ_ℓ(z_{ℓ−1}) + ε_ℓ (a forward and a backward pass through
the whole network), so every layer gets a signal at the first step; its
fixed point is the same equilibrium as the states'.
"""

import jax
import jax.numpy as jnp
import optax

from mupc_flax.pc import deviations, forward, layouts
from mupc_flax.pc.descent import (Equilibrium, Problem, Progress, global_sum_of_squares, loop,
                                  report)
from mupc_flax.pc.energy import energy_terms
from mupc_flax.pc.step_guard import guarded_lr


def _zero_errors(problem: Problem) -> tuple:
  """ε = 0 (the feed-forward start), per stage; split over the devices as the batch is."""
  zeros = tuple(jnp.zeros(z.shape, z.dtype) for z in jax.eval_shape(
      lambda: deviations.feedforward_stages(problem.model, problem.x, problem.plan)))
  return jax.lax.pcast(zeros, problem.axis_name, to="varying") if problem.axis_name else zeros


def infer_errors(problem: Problem, stages: tuple | None) -> Equilibrium:
  """Inference on the errors from those of ``stages`` (None: the feed-forward
  start, ε = 0).

  The first step is taken outside the loop: its forward pass is the start's
  (the feed-forward pass the caller would otherwise run again), and the step
  guard's first vector.
  """
  model, x, y, inference = problem.model, problem.x, problem.y, problem.inference
  start_errors = _zero_errors(problem) if stages is None else deviations.start_errors(problem, stages)

  def energy_and_stages(errors):
    stages = forward.perturbed_stages(model, x, errors, problem.plan.unrolled)
    return jnp.sum(energy_terms(errors, model.readout(model.phi(stages[-1][-1])), y, problem.loss,
                                problem.batch_size)), stages

  energy_of = lambda errors: energy_and_stages(errors)[0]
  (_, start_stages), first_grad = jax.value_and_grad(energy_and_stages, has_aux=True)(start_errors)
  lr, eigenvalue = guarded_lr(problem, energy_of, start_errors, start_stages)
  tx = inference.transformation(lr)

  def apply(errors, state, grad):
    updates, state = tx.update(grad, state, errors)
    return optax.apply_updates(errors, updates), state

  def update(errors, state):
    grad = jax.grad(energy_of)(errors)
    return *apply(errors, state, grad), grad

  first_size = global_sum_of_squares(first_grad, problem.axis_name)
  progress = Progress(jnp.ones((), jnp.int32), first_size, first_size)
  (errors, _), progress = loop(update, apply(start_errors, tx.init(start_errors), first_grad),
                               inference.steps - 1, inference.steps, progress, problem)
  stages = forward.perturbed_stages(model, x, errors, problem.plan.unrolled)
  errors, phi = (layouts.arrange_each(arrays, problem.plan.per_layer)
                 for arrays in (errors, tuple(model.phi(z) for z in stages)))
  return Equilibrium(stages, errors, phi, model.readout(model.phi(start_stages[-1][-1])),
                     report(inference, progress, lr, eigenvalue))
