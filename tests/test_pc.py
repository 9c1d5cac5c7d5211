"""Energy, inference and PC gradients against independent references."""

import itertools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mupc_flax as mf
import oracles

D, N, H, C, B = 6, 5, 4, 3, 7


def make_model(parameterization, activation, hidden_layers=H, width=N, seed=0, **kwargs):
  return mf.ResidualPCN(D, width, hidden_layers, C, activation=activation,
                        parameterization=parameterization, rngs=nnx.Rngs(seed), **kwargs)


@pytest.mark.parametrize("parameterization,loss,activation",
                         list(itertools.product(["sp", "mupc"], ["mse", "ce"], ["linear", "relu", "tanh"])))
def test_energy_matches_numpy(parameterization, loss, activation):
  model = make_model(parameterization, activation)
  x, y = oracles.random_batch(1, B, D, C)
  z = np.random.default_rng(2).standard_normal((H, B, N)).astype(np.float32)
  weights, multipliers = oracles.unstack(model)
  expected = oracles.numpy_layer_energies(weights, multipliers, z, x, y, activation, loss)
  got = mf.layer_energies(model, jnp.asarray(z), x, y, loss=loss)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(mf.energy(model, jnp.asarray(z), x, y, loss=loss), expected.sum(),
                             rtol=2e-5)


@pytest.mark.parametrize("loss,activation", [("mse", "relu"), ("ce", "tanh"), ("mse", "linear")])
def test_energy_gradients_match_jax_reference(loss, activation):
  model = make_model("mupc", activation)
  x, y = oracles.random_batch(3, B, D, C)
  z = np.random.default_rng(4).standard_normal((H, B, N)).astype(np.float32)
  weights, multipliers = oracles.unstack(model)
  ref_w, ref_z = oracles.jax_grads64(oracles.jax_energy, (0, 2), weights, multipliers, list(z),
                                     x, y, activation, loss)

  # Activity gradient: one plain inference step from z moves z by −β ∂F/∂z.
  lr = 0.3
  stepped = mf.infer(model, x, y, mf.Inference(1, lr, "plain"), z=jnp.asarray(z), loss=loss)
  np.testing.assert_allclose(stepped, z - lr * np.stack(ref_z), rtol=1e-5, atol=1e-6)

  # Weight gradient of the library's energy (through nnx.grad).
  grads = nnx.grad(lambda m: mf.energy(m, jnp.asarray(z), x, y, loss=loss))(model)
  np.testing.assert_allclose(grads["input_layer"]["kernel"][...], ref_w[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads["hidden"]["kernel"][...], np.stack(ref_w[1:-1]), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(grads["readout"]["kernel"][...], ref_w[-1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss,activation,schedule",
                         [("mse", "relu", "plain"), ("mse", "tanh", "wavefront"),
                          ("ce", "relu", "wavefront"), ("ce", "linear", "plain")])
def test_pc_gradients_match_step_by_step_reference(loss, activation, schedule):
  """FF start, T = H steps on z, ∂F/∂W: the library equals a plain-JAX loop."""
  batch, lr = 4, 1.2  # β/B = 0.3 per sample, so the signal reaches every layer.
  model = make_model("mupc", activation, hidden_layers=5, width=8)
  x, y = oracles.random_batch(5, batch, D, C)
  weights, multipliers = oracles.unstack(model)
  ref_grads, ref_z = oracles.jax_pc_gradients(weights, multipliers, x, y, activation, loss, 5, lr)
  grads, metrics = mf.pc_gradients(model, x, y, mf.Inference(5, lr, schedule), loss=loss)

  def close(got, want):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

  close(grads["input_layer"]["kernel"][...], ref_grads[0])
  close(grads["hidden"]["kernel"][...], np.stack(ref_grads[1:-1]))
  close(grads["readout"]["kernel"][...], ref_grads[-1])
  ref_energies = oracles.numpy_layer_energies(weights, multipliers, ref_z, x, y, activation, loss)
  np.testing.assert_allclose(metrics["layer_energies"], ref_energies, rtol=1e-4, atol=1e-7)
  # The test is only as strong as the signal that reaches layer 1.
  assert np.abs(ref_grads[0]).max() > 1e-5 * np.abs(ref_grads[-1]).max()


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_output_losses_and_errors_match_their_closed_forms(loss):
  rng = np.random.default_rng(0)
  outputs = rng.standard_normal((B, C))
  y = rng.random((B, C))  # Not one-hot: the general case.
  if loss == "mse":
    ref_value, ref_error = 0.5 * np.sum((y - outputs) ** 2, -1), y - outputs
  else:
    shifted = outputs - outputs.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))
    ref_value = -np.sum(y * log_softmax, -1)
    ref_error = y - y.sum(-1, keepdims=True) * np.exp(log_softmax)
  output_loss = mf.pc.loss_of(loss)
  o, t = jnp.asarray(outputs, jnp.float32), jnp.asarray(y, jnp.float32)
  np.testing.assert_allclose(output_loss(o, t), ref_value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(output_loss.error(o, t), ref_error, rtol=1e-5, atol=1e-6)


def test_unknown_loss_names_the_choices():
  with pytest.raises(ValueError, match=r"Unknown loss 'l1'; choose one of \['mse', 'ce'\]"):
    mf.pc.loss_of("l1")


@pytest.mark.parametrize("activation", ["linear", "relu", "tanh", "gelu"])
def test_feedforward_start_has_zero_hidden_error(activation):
  model = make_model("mupc", activation)
  x, y = oracles.random_batch(6, B, D, C)
  z = model.feedforward(x)
  energies = mf.layer_energies(model, z, x, y)
  assert float(energies[-1]) > 0
  assert float(jnp.max(energies[:-1])) < 1e-10 * float(energies[-1])
  # The inference bookkeeping makes them exactly zero: no steps, no error.
  _, metrics = mf.pc_gradients(model, x, y, mf.Inference(0, 0.1))
  assert np.all(np.asarray(metrics["layer_energies"][:-1]) == 0.0)
  np.testing.assert_allclose(metrics["energy"], metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(model(x), model.readout(model.phi(z[-1])))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_inference_lowers_energy_monotonically(activation):
  model = make_model("mupc", activation, hidden_layers=6, width=16)
  x, y = oracles.random_batch(7, B, D, C)
  energies = [float(mf.energy(model, mf.infer(model, x, y, mf.Inference(t, 0.5, "plain")), x, y))
              for t in range(13)]
  assert np.all(np.diff(energies) < 0), energies
  assert energies[-1] < 0.99 * energies[0]


def test_wavefront_phases_cover_the_front():
  for hidden, steps, phases in itertools.product([1, 3, 8, 13], [0, 1, 5, 8, 13, 20], [1, 2, 3, 8]):
    blocks = mf.wavefront_phases(hidden, steps, phases)
    assert sum(n for _, n in blocks) == steps
    t = 0
    for first, n in blocks:
      for _ in range(n):  # Step t may change layers H−t−1 … H−1: all must be in the block.
        assert 0 <= first <= max(hidden - t - 1, 0)
        t += 1
    assert len(blocks) <= phases + 1
  # Half the work when T = H with many phases: Σ block sizes × steps ≈ H²/2.
  blocks = mf.wavefront_phases(64, 64, 64)
  assert sum((64 - first) * n for first, n in blocks) == 64 * 65 // 2


def test_infer_refuses_wavefront_from_a_custom_start():
  model = make_model("mupc", "relu")
  x, y = oracles.random_batch(9, B, D, C)
  with pytest.raises(ValueError, match="feed-forward start"):
    mf.infer(model, x, y, mf.Inference(2, 0.1, "wavefront"), z=model.feedforward(x))


def test_bp_gradients_match_jax_reference():
  model = make_model("mupc", "tanh")
  x, y = oracles.random_batch(10, B, D, C)
  weights, multipliers = oracles.unstack(model)

  def loss(ws, x, y):
    z = oracles.jax_feedforward(ws, multipliers, x, "tanh")
    out = multipliers[-1] * (jnp.tanh(z[-1]) @ ws[-1])
    return 0.5 * jnp.sum((y - out) ** 2) / B

  ref = oracles.jax_grads64(loss, 0, weights, x, y)
  grads, metrics = mf.bp_gradients(model, x, y)
  np.testing.assert_allclose(metrics["loss"], loss(weights, x, y), rtol=1e-5)
  np.testing.assert_allclose(grads["hidden"]["kernel"][...], np.stack(ref[1:-1]), rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(grads["input_layer"]["kernel"][...], ref[0], rtol=1e-4, atol=1e-7)


def _loop_bodies(jaxpr):
  """The bodies of every scan / while loop in a jaxpr, searched recursively."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("scan", "while"):
      yield eqn.params["jaxpr" if eqn.primitive.name == "scan" else "body_jaxpr"].jaxpr
    for param in eqn.params.values():
      sub = getattr(param, "jaxpr", param)
      if isinstance(sub, jax.extend.core.Jaxpr) and eqn.primitive.name not in ("scan", "while"):
        yield from _loop_bodies(sub)


def test_input_projection_is_not_recomputed_inside_inference():
  """The D-wide input matrix must not appear in any inference loop body."""
  d_in = 37  # A size no other dimension has.
  model = mf.ResidualPCN(d_in, 16, 4, C, rngs=nnx.Rngs(0))
  x, y = oracles.random_batch(11, B, d_in, C)
  for schedule in ["plain", "wavefront"]:
    jaxpr = jax.make_jaxpr(
        lambda m, x, y: mf.pc_gradients(m, x, y, mf.Inference(4, 0.5, schedule))[0])(model, x, y)
    bodies = list(_loop_bodies(jaxpr.jaxpr))
    assert bodies, "inference should be a compiled loop"
    for body in bodies:
      shapes = [v.aval.shape for eqn in body.eqns for v in eqn.invars if hasattr(v, "aval")]
      assert shapes and not any(d_in in shape for shape in shapes)


def _products(jaxpr):
  """Every dot_general equation of a jaxpr, nested ones included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _products(sub)


def test_precision_reaches_every_product_and_bfloat16_stays_close_to_float32():
  x, y = oracles.random_batch(12, 32, D, C)
  grads = {}
  highest = jax.lax.Precision.HIGHEST
  for precision in ("float32", "tf32", "bfloat16"):
    model = make_model("mupc", "relu", hidden_layers=6, width=64, precision=precision)
    grads[precision], _ = mf.pc_gradients(model, x, y, mf.Inference(6, 2.0))
    jaxpr = jax.make_jaxpr(lambda m: mf.pc_gradients(m, x, y, mf.Inference(6, 2.0))[0])(model)
    products = list(_products(jaxpr.jaxpr))
    assert len(products) > 10
    for eqn in products:  # true float32 asks XLA for HIGHEST; tf32 and bf16 take its default
      assert (eqn.params["precision"] == (highest, highest)) == (precision == "float32")
    assert ("bf16" in str(jaxpr)) == (precision == "bfloat16")
  # On the CPU, where the tests run, XLA computes tf32 products in float32.
  for a, b in zip(jax.tree.leaves(grads["float32"]), jax.tree.leaves(grads["tf32"])):
    np.testing.assert_array_equal(b, a)
  for a, b in zip(jax.tree.leaves(grads["float32"]), jax.tree.leaves(grads["bfloat16"])):
    a, b = np.ravel(a), np.ravel(b)
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine > 0.995 and abs(np.linalg.norm(b) / np.linalg.norm(a) - 1) < 0.02
