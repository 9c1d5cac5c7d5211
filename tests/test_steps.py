"""Train and eval steps on a device mesh: 8 emulated devices equal 1 device."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import mupc_flax as mf
import oracles

D, N, H, C, B = 20, 32, 4, 10, 64


def train(num_devices, algorithm, steps=3, loss="mse", seed=0):
  model = mf.ResidualPCN(D, N, H, C, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
  mesh = mf.make_mesh(jax.devices()[:num_devices])
  step = mf.make_train_step(model, optimizer, mesh, algorithm=algorithm, loss=loss,
                            # β/B = 1/8 per sample: the error reaches every layer.
                            inference=mf.Inference(H, 8.0) if algorithm == "pc" else None)
  model_state, opt_state = nnx.state(model), nnx.state(optimizer)
  history = []
  for i in range(steps):
    x, y = oracles.random_batch(100 + i, B, D, C)
    model_state, opt_state, metrics = step(model_state, opt_state, x, y)
    history.append(jax.tree.map(np.asarray, metrics))
  return jax.tree.map(np.asarray, model_state), history


# PC with MSE on every network: test_conformance.
@pytest.mark.parametrize("algorithm,loss", [("pc", "ce"), ("bp", "mse")])
def test_eight_devices_match_one(algorithm, loss):
  assert len(jax.devices()) == 8
  one, history_one = train(1, algorithm, loss=loss)
  eight, history_eight = train(8, algorithm, loss=loss)
  initial = jax.tree.map(np.asarray, nnx.state(mf.ResidualPCN(D, N, H, C, rngs=nnx.Rngs(0))))
  for a, b, start in zip(jax.tree.leaves(one), jax.tree.leaves(eight), jax.tree.leaves(initial)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
  # The steps did something: every weight matrix moved (and only those).
  moved = [np.abs(a - s).max() > 1e-3 for a, s in zip(jax.tree.leaves(one), jax.tree.leaves(initial))]
  assert sum(moved) == 3  # three kernels moved; the three premultipliers did not
  for m1, m8 in zip(history_one, history_eight):
    for key in m1:
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-9)


def test_train_step_matches_pc_gradients_and_adam():
  """One sharded step = pc_gradients on the whole batch + one optax Adam update."""
  model = mf.ResidualPCN(D, N, H, C, rngs=nnx.Rngs(3))
  x, y = oracles.random_batch(7, B, D, C)
  inference = mf.Inference(H, 0.5)
  grads, _ = mf.pc_gradients(model, x, y, inference)
  tx = optax.adam(0.05)
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = optax.apply_updates(params, updates)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = mf.make_train_step(model, optimizer, mf.make_mesh(), inference=inference)
  model_state, _, _ = step(nnx.state(model), nnx.state(optimizer), x, y)
  for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(nnx.state(model_state, nnx.Param))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nnx_form_trains_the_modules_in_place_and_matches_the_functional_form():
  """``step(model, optimizer, x, y)`` updates both modules in place and can be
  called again at once, as a notebook loop run twice does; it trains exactly
  as the donating functional form, and the two forms mix after a write-back."""
  x, y = oracles.random_batch(5, B, D, C)

  def fresh():
    model = mf.ResidualPCN(D, N, H, C, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    return model, optimizer, mf.make_train_step(model, optimizer, mf.make_mesh(jax.devices()[:1]),
                                                inference=mf.Inference(H, 8.0))

  model, optimizer, step = fresh()
  for _ in range(2):  # the same cell, run twice
    for _ in range(2):
      metrics = step(model, optimizer, x, y)
  assert int(optimizer.step[...]) == 4 and np.isfinite(float(metrics["loss"]))
  reference, reference_optimizer, reference_step = fresh()
  model_state, opt_state = nnx.state(reference), nnx.state(reference_optimizer)
  for _ in range(4):
    model_state, opt_state, _ = reference_step(model_state, opt_state, x, y)
  for want, got in zip(jax.tree.leaves(model_state), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  nnx.update(reference, model_state)
  nnx.update(reference_optimizer, opt_state)
  reference_step(reference, reference_optimizer, x, y)  # the written-back modules train on
  assert int(reference_optimizer.step[...]) == 5


def test_eval_step_counts_only_unmasked_rows():
  model = mf.ResidualPCN(D, N, H, C, rngs=nnx.Rngs(1))
  x, y = oracles.random_batch(3, B, D, C)
  mask = np.zeros(B, np.float32)
  mask[:45] = 1.0  # a last partial batch of 45 real rows, padded to 64
  sums = mf.make_eval_step(model, mf.make_mesh())(nnx.state(model), x, y, mask)
  outputs = np.asarray(model(x[:45]))
  expected_correct = np.sum(outputs.argmax(1) == y[:45].argmax(1))
  expected_loss = np.sum(0.5 * np.sum((y[:45] - outputs) ** 2, axis=1))
  assert float(sums["count"]) == 45
  assert float(sums["correct"]) == expected_correct
  np.testing.assert_allclose(float(sums["loss"]), expected_loss, rtol=1e-5)


def test_batch_not_divisible_by_devices_is_refused():
  model = mf.ResidualPCN(D, N, H, C, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
  step = mf.make_train_step(model, optimizer, mf.make_mesh(), inference=mf.Inference(H, 0.5))
  x, y = oracles.random_batch(0, 60, D, C)
  with pytest.raises(ValueError, match="divisible by the number of devices"):
    step(nnx.state(model), nnx.state(optimizer), x, y)


def test_pc_train_step_at_128_layers():
  hidden = 128
  model = mf.ResidualPCN(D, 16, hidden, C, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
  step = mf.make_train_step(model, optimizer, mf.make_mesh(jax.devices()[:1]),
                            inference=mf.Inference(hidden, 0.5))
  x, y = oracles.random_batch(0, 16, D, C)
  before = np.asarray(model.readout.kernel[...])
  model_state, opt_state, metrics = step(nnx.state(model), nnx.state(optimizer), x, y)
  model_state, opt_state, metrics = step(model_state, opt_state, x, y)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["energy"])
  assert metrics["layer_energies"].shape == (hidden + 1,)
  assert float(metrics["energy"]) < float(metrics["loss"])
  assert not np.allclose(model_state["readout"]["kernel"][...], before)


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_split_and_single_compiled_step_agree(layout):
  """The speed lever 'two compiled functions' computes the same step."""
  results = []
  for split in (False, True):
    model = mf.ResidualPCN(D, N, H, C, rngs=nnx.Rngs(4))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    # One device: where the split form is used (steps.make_train_step explains why).
    step = mf.make_train_step(model, optimizer, mf.make_mesh(jax.devices()[:1]),
                              inference=mf.Inference(H, 8.0, engine=mf.Engine(layout=layout)),
                              split=split)
    state = (nnx.state(model), nnx.state(optimizer))
    for i in range(2):
      x, y = oracles.random_batch(50 + i, B, D, C)
      *state, metrics = step(*state, x, y)
    results.append((jax.tree.map(np.asarray, state[0]), jax.tree.map(np.asarray, metrics)))
  (a, ma), (b, mb) = results
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6 * np.abs(u).max())
  np.testing.assert_allclose(ma["layer_energies"], mb["layer_energies"], rtol=1e-5)


@pytest.mark.parametrize("layout,schedule", [("per_layer", "plain"), ("stacked", "wavefront")])
def test_memory_does_not_grow_with_inference_steps(layout, schedule):
  """No inference trajectory is stored: compiled scratch memory is flat in T."""
  temp = {}
  for steps in (16, 64):  # both past the wavefront (T > H): the same block structure
    model = mf.ResidualPCN(D, 64, 8, C, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
    step = mf.make_train_step(model, optimizer, mf.make_mesh(jax.devices()[:1]),
                              inference=mf.Inference(steps, 0.5, schedule,
                                                     engine=mf.Engine(layout=layout)))
    x, y = oracles.random_batch(0, B, D, C)
    compiled = [lowered.compile() for lowered in step.lower(nnx.state(model), nnx.state(optimizer), x, y)]
    temp[steps] = max(c.memory_analysis().temp_size_in_bytes for c in compiled)
  assert temp[16] > 0
  assert temp[64] <= 1.02 * temp[16], temp
