"""The limits-paper oracle: linear μPC ResNets have a closed-form equilibrium.

For a linear network the energy is quadratic in the activities. With
r = y − ŷ the feed-forward residual and P_ℓ the (scaled) map from layer ℓ to
the output, its minimum is F* = (1/2B) Σ rᵀ S⁻¹ r with S = I + Σ_ℓ P_ℓ P_ℓᵀ,
and as width ≫ depth the PC weight gradient there tends to the BP gradient.
"""

import jax
import numpy as np
from flax import nnx

import mupc_flax as mf
import oracles


def closed_form_equilibrium_energy(model, x, y):
  weights, a = oracles.unstack(model)
  hidden = len(weights) - 1
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  z = a[0] * x @ weights[0]
  for k in range(1, hidden):
    z = z + a[k] * z @ weights[k]
  residual = y - a[-1] * z @ weights[-1]
  s = np.eye(y.shape[1])
  to_output = a[-1] * weights[-1]  # [N, C]: a perturbation of the top layer -> output
  for k in range(hidden - 1, -1, -1):
    s += to_output.T @ to_output
    if k > 0:  # move one layer down: through the residual map (I + a_k W_k)
      to_output = (np.eye(to_output.shape[0]) + a[k] * weights[k]) @ to_output
  return 0.5 * np.mean(np.einsum("bi,ij,bj->b", residual, np.linalg.inv(s), residual))


def cosine(a, b):
  a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(b)])
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_linear_equilibrium_and_pc_bp_agreement_with_width():
  d, c, batch, hidden = 16, 4, 8, 4
  x, y = oracles.random_batch(0, batch, d, c)
  # β/B = 0.2 per sample is inside the stable range; 600 steps converge.
  inference = mf.Inference(600, 0.2 * batch, "plain")
  cosines = []
  for width in (8, 32, 128, 512):
    model = mf.ResidualPCN(d, width, hidden, c, activation="linear", rngs=nnx.Rngs(0))
    expected = closed_form_equilibrium_energy(model, x, y)
    pc_grads, metrics = mf.pc_gradients(model, x, y, inference)
    np.testing.assert_allclose(float(metrics["energy"]), expected, rtol=1e-4)
    assert float(metrics["loss"]) > float(metrics["energy"])  # inference lowered the energy
    bp_grads, _ = mf.bp_gradients(model, x, y)
    cosines.append(cosine(pc_grads, bp_grads))
  assert np.all(np.diff(cosines) > 0), cosines
  assert cosines[0] < 0.95 and cosines[-1] >= 0.999, cosines


def test_errors_reach_the_states_equilibrium():
  """ePC's fixed point is state PC's equilibrium: the closed-form minimum of
  the energy, and the same weight gradient there."""
  d, c, batch, hidden = 16, 4, 8, 4
  x, y = oracles.random_batch(1, batch, d, c)
  model = mf.ResidualPCN(d, 32, hidden, c, activation="linear", rngs=nnx.Rngs(1))
  expected = closed_form_equilibrium_energy(model, x, y)
  states = mf.pc_gradients(model, x, y, mf.Inference(600, 0.2 * batch, "plain"))
  errors = mf.pc_gradients(model, x, y, mf.Inference(300, 0.2 * batch, method="errors"))
  for grads, metrics in (states, errors):
    np.testing.assert_allclose(float(metrics["energy"]), expected, rtol=1e-4)
  assert cosine(errors[0], states[0]) > 0.9999
  # The stop at equilibrium: early, near the minimum, and on the fixed-T path.
  stopped = mf.pc_gradients(model, x, y, mf.Inference(300, 0.2 * batch, method="errors",
                                                      tolerance=1e-2))
  steps = int(stopped[1]["inference_steps"])
  assert 1 < steps < 300
  np.testing.assert_allclose(float(stopped[1]["energy"]), expected, rtol=1e-2)
  fixed = mf.pc_gradients(model, x, y, mf.Inference(steps, 0.2 * batch, method="errors"))
  np.testing.assert_allclose(float(stopped[1]["energy"]), float(fixed[1]["energy"]), rtol=1e-6)
