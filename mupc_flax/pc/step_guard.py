"""The step guard: β capped by the optimiser's stability bound over λ_max.

With ``Inference.step_guard`` > 0, that many power iterations with
Hessian–vector products estimate λ_max, the top eigenvalue of the energy's
Hessian over the free variables at the start of inference (inner products
global over the devices), and β is capped to ``GUARD_MARGIN`` times the
optimiser's stability bound over λ_max (``Inference.stability_bound``).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from mupc_flax.pc.descent import Problem, global_sum

# The step guard keeps β·λ_max this far inside the stability bound. Power
# iteration approaches λ_max from below, and slowly where the top eigenvalues
# are close: five iterations gave 0.69–0.80 of λ_max on dense ReLU 128 × 16 and
# 128 × 64 (activities and errors) and tanh 16 × 5, so 0.5 keeps those within
# 0.72 of the bound.
GUARD_MARGIN = 0.5


def top_eigenvalue(hvp: Callable, v, iterations: int, axis_name: str | None) -> jax.Array:
  """λ_max of a symmetric positive semi-definite operator ``hvp`` on trees
  shaped like ``v``, by power iteration from ``v`` (inner products global
  over the devices of ``axis_name``)."""
  dot = lambda a, b: global_sum(jax.tree.map(lambda u, w: jnp.sum(u * w), a, b), axis_name)

  def iterate(_, carry):
    v, _ = carry
    norm = jnp.maximum(jnp.sqrt(dot(v, v)), 1e-30)
    v = jax.tree.map(lambda a: a / norm, v)
    hv = hvp(v)
    return hv, dot(v, hv)

  _, eigenvalue = jax.lax.fori_loop(0, iterations, iterate, (v, jnp.zeros(())))
  return eigenvalue


def guarded_lr(problem: Problem, energy: Callable, at, first_vector):
  """(the step inference takes, λ_max per sample): β capped by the stability
  bound over λ_max of ``energy``'s Hessian at ``at`` (``energy`` is a batch
  mean, so its λ_max is the largest per-sample one over B), by power
  iteration from ``first_vector`` + 1 (the feed-forward activities: per
  sample, so any split of the batch over devices gives the same λ_max; + 1,
  so that an all-zero batch does not start from zero); without the guard
  (None, None): the optimiser's own step."""
  inference = problem.inference
  if not inference.step_guard:
    return None, None
  hvp = lambda v: jax.jvp(jax.grad(energy), (at,), (v,))[1]
  eigenvalue = top_eigenvalue(hvp, jax.tree.map(lambda a: a + 1, first_vector),
                              inference.step_guard, problem.axis_name)
  lr = jnp.asarray(inference.lr, jnp.float32)
  cap = GUARD_MARGIN * inference.stability_bound() / jnp.maximum(eigenvalue, 1e-30)
  return jnp.where(jnp.isfinite(cap), jnp.minimum(lr, cap), lr), eigenvalue * problem.batch_size
