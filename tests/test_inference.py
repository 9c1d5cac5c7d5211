"""Inference optimisers and the stop at equilibrium, against plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mupc_flax as mf
import oracles

D, C = 6, 3
OPTIMIZERS = {  # name -> Inference keywords (β = 4 per batch of 16: 1/4 per sample)
    "gd": dict(lr=4.0),
    "momentum": dict(lr=4.0, optimizer="momentum", momentum=0.8),
    "nesterov": dict(lr=4.0, optimizer="nesterov", momentum=0.8),
    "adam": dict(lr=None, optimizer=optax.adam(0.05)),
}


def make_model(hidden_layers=6, width=16, seed=0, **kwargs):
  return mf.ResidualPCN(D, width, hidden_layers, C, rngs=nnx.Rngs(seed), **kwargs)


def assert_trees_close(a, b, rtol=1e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(v, u, rtol=rtol, atol=rtol * float(np.abs(u).max(initial=0)))


@pytest.mark.parametrize("optimizer,nesterov", [("momentum", False), ("nesterov", True)])
def test_momentum_matches_step_by_step_reference(optimizer, nesterov):
  """Heavy ball and Nesterov on the activities equal a float64 jax.grad loop."""
  batch, lr, momentum, steps = 4, 1.2, 0.7, 9
  model = make_model(hidden_layers=5, width=8)
  x, y = oracles.random_batch(5, batch, D, C)
  weights, multipliers = oracles.unstack(model)
  ref_grads, ref_z = oracles.jax_pc_gradients(weights, multipliers, x, y, "relu", "mse", steps, lr,
                                              momentum=momentum, nesterov=nesterov)
  inference = mf.Inference(steps, lr, optimizer=optimizer, momentum=momentum)
  np.testing.assert_allclose(mf.infer(model, x, y, inference), np.stack(ref_z), rtol=1e-4, atol=1e-5)
  grads, _ = mf.pc_gradients(model, x, y, inference)
  want = np.stack(ref_grads[1:-1])
  np.testing.assert_allclose(grads["hidden"]["kernel"][...], want, rtol=1e-4,
                             atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(grads["input_layer"]["kernel"][...], ref_grads[0], rtol=1e-4,
                             atol=1e-5 * np.abs(ref_grads[0]).max())
  # Momentum changes the result: the test would notice gradient descent.
  plain = oracles.jax_pc_gradients(weights, multipliers, x, y, "relu", "mse", steps, lr)[1]
  assert np.abs(np.stack(plain) - np.stack(ref_z)).max() > 1e-2


def test_an_optax_optimizer_is_applied_to_the_activities():
  """Any optax transformation: the engine's updates equal optax's own loop on
  jax.grad of the reference energy (as jpc applies its activity optimiser)."""
  model = make_model(hidden_layers=4, width=8)
  x, y = oracles.random_batch(6, 8, D, C)
  tx = optax.adam(0.05)
  weights, multipliers = oracles.unstack(model)
  weights = [jnp.asarray(w, jnp.float32) for w in weights]
  z = oracles.jax_feedforward(weights, multipliers, jnp.asarray(x), "relu")
  state = tx.init(z)
  for _ in range(7):
    g = jax.grad(oracles.jax_energy, argnums=2)(weights, multipliers, z, x, y, "relu", "mse")
    updates, state = tx.update(g, state, z)
    z = optax.apply_updates(z, updates)
  got = mf.infer(model, x, y, mf.Inference(7, None, "plain", optimizer=tx))
  np.testing.assert_allclose(got, np.stack(z), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer,layout", [(name, "stacked") for name in OPTIMIZERS] + [
    ("nesterov", "per_layer"), ("adam", "per_layer")])  # a tuple of states, and an optax tree
def test_wavefront_equals_plain_for_every_optimizer(optimizer, layout):
  model = make_model(hidden_layers=7)
  x, y = oracles.random_batch(8, 16, D, C)
  for steps in (5, 12):  # inside the wavefront, and past it
    results = [mf.pc_gradients(model, x, y, mf.Inference(steps, schedule=schedule, phases=3,
                                                         engine=mf.Engine(layout=layout),
                                                         **OPTIMIZERS[optimizer]))
               for schedule in ("plain", "wavefront")]
    (plain, plain_metrics), (wave, wave_metrics) = results
    assert_trees_close(plain, wave)
    np.testing.assert_allclose(wave_metrics["layer_energies"], plain_metrics["layer_energies"],
                               rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_layers_below_the_front_stay_exactly_zero(optimizer):
  """After t < H steps from the feed-forward start, the layers below the top t
  keep exactly zero error and get exactly zero weight gradient."""
  hidden, steps = 8, 3
  model = make_model(hidden_layers=hidden)
  x, y = oracles.random_batch(9, 16, D, C)
  for schedule in ("plain", "wavefront"):
    inference = mf.Inference(steps, schedule=schedule, **OPTIMIZERS[optimizer])
    grads, metrics = mf.pc_gradients(model, x, y, inference)
    energies = np.asarray(metrics["layer_energies"])
    assert np.all(energies[:hidden - steps] == 0.0) and np.all(energies[hidden - steps:] > 0)
    # Hidden kernel k maps layer k to layer k + 1: the top `steps` layers' kernels move.
    moved = np.abs(np.asarray(grads["hidden"]["kernel"][...])).max(axis=(1, 2))
    assert np.all(moved[:hidden - 1 - steps] == 0.0) and np.all(moved[hidden - 1 - steps:] > 0)
    assert np.all(np.asarray(grads["input_layer"]["kernel"][...]) == 0.0)


def test_zero_momentum_is_gradient_descent():
  model = make_model()
  x, y = oracles.random_batch(10, 16, D, C)
  gd = mf.pc_gradients(model, x, y, mf.Inference(9, 4.0))[0]
  for optimizer in ("momentum", "nesterov"):
    heavy = mf.pc_gradients(model, x, y, mf.Inference(9, 4.0, optimizer=optimizer, momentum=0.0))[0]
    for a, b in zip(jax.tree.leaves(gd), jax.tree.leaves(heavy)):
      np.testing.assert_array_equal(a, b)


def test_stop_at_equilibrium():
  """Inference stops once ‖∂F/∂z‖ < tolerance × its first value, well before the cap.

  (tanh: with ReLU's kinks, inference on a network this small chatters
  around the equilibrium instead of converging to it.)"""
  model = make_model(hidden_layers=4, width=8, activation="tanh")
  x, y = oracles.random_batch(11, 16, D, C)
  tolerance, cap = 1e-3, 3000
  for schedule in ("plain", "wavefront"):
    inference = mf.Inference(cap, 4.0, schedule, optimizer="momentum", momentum=0.8,
                             tolerance=tolerance)
    _, metrics = mf.pc_gradients(model, x, y, inference)
    taken = int(metrics["inference_steps"])
    assert 10 < taken < cap
    # The same number of fixed steps gives the same activities.
    fixed = lambda steps: mf.infer(model, x, y, mf.Inference(steps, 4.0, schedule,
                                                             optimizer="momentum", momentum=0.8))
    np.testing.assert_array_equal(mf.infer(model, x, y, inference), fixed(taken))
    # It stopped at the first step whose gradient (here jax.grad of the energy,
    # not the engine's) was below the tolerance: the one before was above it.
    gradient = lambda z: jnp.linalg.norm(jax.grad(lambda z: mf.energy(model, z, x, y))(z))
    start = gradient(model.feedforward(x))
    assert gradient(fixed(taken - 1)) < 1.01 * tolerance * start
    assert gradient(fixed(taken - 2)) > 0.99 * tolerance * start


def train(num_devices, inference, steps=2):
  model = mf.ResidualPCN(20, 32, 4, 10, activation="tanh", rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
  step = mf.make_train_step(model, optimizer, mf.make_mesh(jax.devices()[:num_devices]),
                            inference=inference)
  state, history = (nnx.state(model), nnx.state(optimizer)), []
  for i in range(steps):
    x, y = oracles.random_batch(200 + i, 64, 20, 10)
    *state, metrics = step(*state, x, y)
    history.append(jax.tree.map(np.asarray, metrics))
  return jax.tree.map(np.asarray, state[0]), history


@pytest.mark.parametrize("inference", [
    mf.Inference(8, 8.0, optimizer="nesterov", momentum=0.9),
    mf.Inference(400, 8.0, optimizer="momentum", momentum=0.8, tolerance=1e-2),
    mf.Inference(8, 256.0, optimizer="momentum", momentum=0.9, step_guard=4),
], ids=["nesterov", "stop", "guard"])
def test_eight_devices_match_one(inference):
  """Data parallel: the same weights and metrics, and with the stop, the same
  global decision (each device holds 8 of the 64 samples: a device deciding
  on its own rows would stop at another step)."""
  one, history_one = train(1, inference)
  eight, history_eight = train(8, inference)
  assert_trees_close(one, eight, rtol=1e-4)  # Adam turns rounding in near-zero gradients into 1e-5
  for m1, m8 in zip(history_one, history_eight):
    for key in m1:
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-9)
  taken = [int(m["inference_steps"]) for m in history_one]
  if inference.tolerance:
    assert all(10 < t < inference.steps for t in taken), taken
  else:
    assert taken == [inference.steps] * 2
  if inference.step_guard:  # one λ_max for the global batch, and the step it allows
    assert all(0 < m["inference_lr"] < inference.lr for m in history_one), history_one


def linear_hessians(model):
  """Per-sample Hessians of a linear ResidualPCN's energy, in float64 NumPy:
  over the activities z (MᵀM, with M the map from z to the errors and the
  output residual) and over ePC's errors ε (I + (RK)ᵀRK, with K the map from
  ε to z and R the readout)."""
  weights, a = oracles.unstack(model)
  hidden, width = len(weights) - 2, weights[1].shape[0]
  size = (hidden + 1) * width
  to_errors = np.zeros((size + weights[-1].shape[1], size))
  for k in range(hidden + 1):
    to_errors[k * width:(k + 1) * width, k * width:(k + 1) * width] = np.eye(width)
    if k:
      residual = np.eye(width) + a[k] * weights[k]  # z_{k−1} ↦ μ_k, as z_{k−1} @ residual
      to_errors[k * width:(k + 1) * width, (k - 1) * width:k * width] = -residual.T
  readout = (a[-1] * weights[-1]).T  # [C, N]
  to_errors[size:, hidden * width:] = -readout
  to_states = np.zeros((size, size))  # z_k = Σ_{j ≤ k} (product of residuals j+1…k)ᵀ ε_j
  for j in range(hidden + 1):
    block = np.eye(width)
    for k in range(j, hidden + 1):
      if k > j:
        block = (np.eye(width) + a[k] * weights[k]).T @ block
      to_states[k * width:(k + 1) * width, j * width:(j + 1) * width] = block
  to_output = readout @ to_states[hidden * width:]
  return to_errors.T @ to_errors, np.eye(size) + to_output.T @ to_output


@pytest.mark.parametrize("method", ["states", "errors"])
@pytest.mark.parametrize("optimizer", ["gd", "momentum", "nesterov"])
def test_step_guard_keeps_the_step_inside_the_stability_bound(method, optimizer):
  """On a quadratic energy (a linear network) with λ_max known in closed form:
  the estimate is λ_max from below, the step used keeps β·λ_max inside the
  optimiser's bound, and inference that diverges unguarded converges."""
  batch = 8
  model = make_model(hidden_layers=4, width=8, activation="linear")
  x, y = oracles.random_batch(3, batch, D, C)
  hessian = linear_hessians(model)[method == "errors"]
  true_max = np.linalg.eigvalsh(hessian).max()  # per sample (the batch mean's, times B)
  momentum = 0.0 if optimizer == "gd" else 0.8
  make = lambda guard: mf.Inference(30, 100.0 * batch, "plain", optimizer=optimizer,
                                    momentum=momentum, method=method, step_guard=guard)
  _, guarded = mf.pc_gradients(model, x, y, make(30))
  _, unguarded = mf.pc_gradients(model, x, y, make(0))
  estimate, lr = float(guarded["inference_lambda_max"]), float(guarded["inference_lr"])
  assert 0.95 * true_max < estimate <= true_max * (1 + 1e-4), (estimate, true_max)
  bound = make(30).stability_bound()
  assert lr / batch * true_max < bound
  np.testing.assert_allclose(lr / batch * estimate, mf.pc.step_guard.GUARD_MARGIN * bound, rtol=1e-5)
  assert float(guarded["energy"]) < float(guarded["loss"])
  assert not float(unguarded["energy"]) < float(unguarded["loss"])  # diverged (or NaN)


def test_step_guard_keeps_a_small_step_and_the_wavefront():
  model = make_model(hidden_layers=6, width=16)
  x, y = oracles.random_batch(4, 16, D, C)
  small = dict(optimizer="momentum", momentum=0.8, lr=0.5, step_guard=10)
  _, metrics = mf.pc_gradients(model, x, y, mf.Inference(6, **small))
  assert float(metrics["inference_lr"]) == 0.5
  _, zero_batch = mf.pc_gradients(model, np.zeros_like(x), y, mf.Inference(6, **small))
  assert float(zero_batch["inference_lr"]) == 0.5 and np.isfinite(float(zero_batch["energy"]))
  big = small | dict(lr=500.0)
  plain, front = (mf.infer(model, x, y, mf.Inference(4, schedule=s, phases=2, **big))
                  for s in ("plain", "wavefront"))
  assert_trees_close(plain, front)
  moved = np.abs(np.asarray(front) - np.asarray(mf.feedforward(model, x))).max(axis=(1, 2))
  assert np.all(moved[:2] == 0) and np.all(moved[2:] > 0), moved

def test_pallas_kernel_refuses_other_optimizers():
  pallas = mf.Engine(kernel="pallas")
  for kwargs in (dict(optimizer="momentum", momentum=0.5), dict(tolerance=1e-3)):
    with pytest.raises(ValueError, match="Pallas inference kernel runs plain gradient descent"):
      mf.Inference(4, 4.0, engine=pallas, **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=4, lr=0.5, optimizer="adagrad"), "Unknown inference optimizer"),
    (dict(steps=4, lr=0.5, momentum=0.9), "needs optimizer='momentum' or 'nesterov'"),
    (dict(steps=4, lr=0.5, optimizer="momentum", momentum=1.0), r"momentum must be in \[0, 1\)"),
    (dict(steps=4, lr=None), "needs a learning rate"),
    (dict(steps=4, lr=0.5, optimizer=optax.sgd(0.1)), "holds its own learning rate"),
    (dict(steps=4, lr=0.5, tolerance=1.0), r"tolerance must be in \[0, 1\)"),
    (dict(steps=4, lr=0.5, method="energy"), "Unknown inference method"),
    (dict(steps=4, lr=0.5, method="errors", schedule="wavefront"), "has no wavefront"),
    (dict(steps=4, lr=None, optimizer=optax.adam(0.1), step_guard=3), "named optimisers"),
    (dict(steps=4, lr=0.5, step_guard=-1), "step_guard"),
    (dict(steps=4, lr=0.5, output_precision=0.0), "output_precision"),
])
def test_inference_options_are_checked(kwargs, message):
  with pytest.raises(ValueError, match=message):
    mf.Inference(**kwargs)
