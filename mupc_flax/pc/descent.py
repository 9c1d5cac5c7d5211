"""The descent loop every inference method runs, and the contract of a method.

An inference method (``InferenceMethod``) takes one ``Problem`` (the network,
its clamped batch and how to infer) and an optional start, and returns the
``Equilibrium`` the weights learn from. Its steps run in ``loop``: a fixed
number of optimiser steps in one compiled loop, or, with a tolerance, a while
loop that stops at an approximate equilibrium measured over every device.
"""

from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from mupc_flax.pc.energy import Network, OutputLoss
from mupc_flax.pc.options import Plan


class Problem(NamedTuple):
  """One inference, as every method sees it.

  model: the network (weights held fixed). x: [B, ...] clamped inputs.
  y: clamped targets. inference: the ``pc.Inference`` spec, its ``steps``
  resolved for this network. loss: the output energy's loss, weighted by the
  output precision γ. batch_size: B of the batch mean (the *global* batch
  under data parallelism). axis_name: the mesh axis the batch is split over
  inside ``jax.shard_map``, or None. plan: the engine's choices for the network.
  """

  model: Network
  x: jax.Array
  y: jax.Array
  inference: Any
  loss: OutputLoss
  batch_size: int
  axis_name: str | None
  plan: Plan


class Equilibrium(NamedTuple):
  """The network at the end of inference.

  z: the activities, per stage an array [L_s, B, ...] (the forward pass's
  form). errors and phi: the errors e_ℓ and φ(z_ℓ) there, per stage in the
  plan's layout (``layouts.arrange``). start_outputs: the readout at the start
  of inference (from the feed-forward start: the feed-forward outputs).
  report: what inference did (``report``).
  """

  z: tuple
  errors: tuple
  phi: tuple
  start_outputs: jax.Array
  report: dict


class InferenceMethod(Protocol):
  """What ``Inference.method`` names in ``inference.METHODS``: inference from
  ``z`` (the activities per stage, as ``forward.as_stages`` gives them; None:
  the feed-forward start) to the equilibrium the weights learn from."""

  def __call__(self, problem: Problem, z: tuple | None) -> Equilibrium:
    ...


class Progress(NamedTuple):
  """Where inference is, for the stop at equilibrium: steps taken, and the
  global ‖∂F/∂v‖² (v the free variables) at the first step and at the latest."""

  steps: jax.Array
  first: jax.Array
  latest: jax.Array


def global_sum(tree, axis_name: str | None) -> jax.Array:
  """The sum of a tree's leaves over every device of ``axis_name``."""
  total = sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))
  return jax.lax.psum(total, axis_name) if axis_name else total


def global_sum_of_squares(tree, axis_name: str | None) -> jax.Array:
  return global_sum(jax.tree.map(jnp.square, tree), axis_name)


def loop(update: Callable, carry: tuple, num_steps: int, end: int, progress: Progress,
         problem: Problem) -> tuple[tuple, Progress]:
  """``num_steps`` steps of ``update`` (variables, state) -> (variables, state,
  gradient) from ``carry``, in one compiled loop that carries nothing else
  (no trajectory is stored), unrolled where the plan says. With the problem's
  ``tolerance``, a while loop that stops at step ``end`` (counted over every
  loop of the schedule, in ``progress``) or once the global ‖gradient‖ has
  fallen below ``tolerance`` times its value at the first step."""
  tolerance = problem.inference.tolerance
  if not tolerance:
    return jax.lax.fori_loop(0, num_steps, lambda _, c: update(*c)[:2], carry,
                             unroll=problem.plan.unroll or 1), progress

  def step(carry):
    variables, state, p = carry
    variables, state, grad = update(variables, state)
    size = global_sum_of_squares(grad, problem.axis_name)
    return variables, state, Progress(p.steps + 1, jnp.where(p.steps == 0, size, p.first), size)

  def going(carry):
    p = carry[2]
    return (p.steps < end) & (p.latest > tolerance ** 2 * p.first)

  *carry, progress = jax.lax.while_loop(going, step, (*carry, progress))
  return tuple(carry), progress


def report(inference, progress: Progress, lr: jax.Array | None,
           eigenvalue: jax.Array | None) -> dict:
  """What inference did, the same on every device: ``inference_steps`` taken;
  with the step guard, ``inference_lr`` (the β used) and ``inference_lambda_max``
  (the estimate of the largest per-sample curvature: β/B times it stays
  inside the bound)."""
  metrics = {"inference_steps": progress.steps if inference.tolerance
             else jnp.asarray(inference.steps, jnp.int32)}
  if inference.step_guard:
    metrics |= {"inference_lr": lr, "inference_lambda_max": eigenvalue}
  return metrics
