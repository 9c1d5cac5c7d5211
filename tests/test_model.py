"""The network, its premultipliers and its initialisation against MUPC.md's table."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mupc_flax as mf
import oracles


@pytest.mark.parametrize("d,n,h", [(784, 128, 8), (10, 64, 3), (3072, 32, 16), (5, 7, 1)])
def test_premultipliers_match_the_table(d, n, h):
  num_matrices = h + 1
  expected = {
      "sp": (1.0, 1.0, 1.0),
      "mupc": (1 / math.sqrt(d), 1 / math.sqrt(n * num_matrices), 1 / n),
  }
  for name, (a_in, a_hidden, a_out) in expected.items():
    model = mf.ResidualPCN(d, n, h, 10, parameterization=name, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.input_layer.multiplier[...], a_in, rtol=1e-6)
    np.testing.assert_allclose(model.hidden.multiplier[...], np.full(h - 1, a_hidden), rtol=1e-6)
    np.testing.assert_allclose(model.readout.multiplier[...], a_out, rtol=1e-6)
    assert model.hidden.kernel.shape == (h - 1, n, n)
    assert model.hidden_layers == h and model.width == n


@pytest.mark.parametrize("d,n,h", [(784, 128, 8), (300, 256, 4)])
def test_init_statistics(d, n, h):
  mupc = mf.ResidualPCN(d, n, h, 10, parameterization="mupc", rngs=nnx.Rngs(1))
  sp = mf.ResidualPCN(d, n, h, 10, parameterization="sp", rngs=nnx.Rngs(1))
  for kernel, fan_in in [(mupc.input_layer.kernel, d), (mupc.hidden.kernel, n)]:
    w = np.asarray(kernel[...])
    assert abs(w.mean()) < 0.02 and abs(w.std() - 1.0) < 0.02  # N(0, 1), whatever the fan-in
  for kernel, fan_in in [(sp.input_layer.kernel, d), (sp.hidden.kernel, n), (sp.readout.kernel, n)]:
    w = np.asarray(kernel[...])
    bound = 1 / math.sqrt(fan_in)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.95 * bound  # uniform up to the bound, not narrower
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
  # Residual layers are independent draws, not copies.
  assert not np.allclose(mupc.hidden.kernel[...][0], mupc.hidden.kernel[...][1])


def test_premultipliers_are_state_but_not_trained():
  model = mf.ResidualPCN(6, 8, 4, 3, rngs=nnx.Rngs(0))
  premultipliers = nnx.state(model, mf.Premultiplier)
  assert len(jax.tree.leaves(premultipliers)) == 3
  assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 3
  assert len(jax.tree.leaves(nnx.state(model))) == 6  # both are in checkpoints
  before = jax.tree.map(np.asarray, premultipliers)
  optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
  x, y = oracles.random_batch(0, 5, 6, 3)
  grads, _ = mf.pc_gradients(model, x, y, mf.Inference(4, 0.5))
  kernel_before = np.asarray(model.readout.kernel[...])
  optimizer.update(model, grads)
  assert not np.allclose(model.readout.kernel[...], kernel_before)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, premultipliers))


def test_unrolled_and_scanned_forward_passes_agree():
  x, _ = oracles.random_batch(0, 5, 6, 3)
  model = mf.ResidualPCN(6, 8, 4, 3, rngs=nnx.Rngs(0))
  scanned, unrolled = mf.feedforward(model, x, unrolled=False), mf.feedforward(model, x, unrolled=True)
  # The forward passes differ in order of operations (scan vs unrolled): float rounding only.
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(model(x), model.readout(model.phi(unrolled[-1])), rtol=1e-5, atol=1e-7)


def _top_rms(parameterization, width, depth, x):
  model = mf.ResidualPCN(x.shape[1], width, depth, 10, parameterization=parameterization,
                         rngs=nnx.Rngs(0))
  return float(jnp.sqrt(jnp.mean(jnp.square(model.feedforward(x)[-1]))))


def test_mupc_forward_pass_is_stable_in_width_and_depth():
  x = np.random.default_rng(0).standard_normal((16, 784)).astype(np.float32)
  # Widths and depths over 16× each; not 1024 × 128 too (0.5 GB of weights to draw).
  mupc = [_top_rms("mupc", n, h, x) for n in (64, 256, 1024) for h in (8, 32, 128) if n * h <= 32768]
  assert max(mupc) / min(mupc) < 2.0, mupc
  assert 0.5 < min(mupc) and max(mupc) < 3.0
  # Standard PC: the same residual network blows up with depth.
  sp = [_top_rms("sp", 256, h, x) for h in (8, 32, 128)]
  assert sp[1] > 3 * sp[0] and sp[2] > 100 * sp[1], sp


@pytest.mark.parametrize("kwargs,match", [
    ({"width": 0}, "width"), ({"hidden_layers": -1}, "hidden_layers"),
    ({"activation": "swish"}, "activation"), ({"parameterization": "ntk"}, "parameterization"),
    ({"precision": "fp8"}, "precision")])
def test_bad_arguments_give_clear_errors(kwargs, match):
  args = {"in_features": 4, "width": 8, "hidden_layers": 2, "out_features": 3} | kwargs
  with pytest.raises(ValueError, match=match):
    mf.ResidualPCN(**args, rngs=nnx.Rngs(0))


def test_auto_plan_follows_the_cpu_measurements():
  """The engine's defaults, from the backend and the network's shapes alone."""
  x = np.zeros((2, 784), np.float32)
  plan = lambda model, method="states", **engine: mf.pc.plan(mf.Engine(**engine), model, x, method)
  dense = lambda width: mf.ResidualPCN(784, width, 8, 3, rngs=nnx.Rngs(0))
  assert plan(dense(256)) == mf.pc.Plan(True, False, False, True, "xla")  # 7·256² > 2^17
  assert plan(dense(128)) == mf.pc.Plan(False, False, False, True, "xla")
  assert plan(dense(256), "errors").per_layer is False  # ePC's forward and backward passes: stacked
  assert plan(dense(256), kernel="pallas").per_layer is False
  assert plan(dense(256), layout="stacked", closed_form=False) == mf.pc.Plan(False, False, False, False, "xla")
  conv = mf.ConvResidualPCN((28, 28, 1), (4, 8), 1, 3, rngs=nnx.Rngs(0))
  assert plan(conv) == mf.pc.Plan(True, True, True, True, "xla")  # convolutions: per layer, unrolled
  assert plan(conv, "errors") == plan(conv)
  vit = mf.TransformerPCN((28, 28, 1), 7, 8, 1, 3, heads=2, rngs=nnx.Rngs(0))
  assert plan(vit) == mf.pc.Plan(True, True, False, False, "xla")  # per-layer weights, no closed form
  with pytest.raises(ValueError, match="per-layer tuples"):
    plan(vit, layout="stacked")
  with pytest.raises(ValueError, match="dense network"):
    plan(conv, kernel="pallas")


def test_gelu_activation_is_available():
  model = mf.ResidualPCN(4, 8, 2, 3, activation="gelu", rngs=nnx.Rngs(0))
  np.testing.assert_allclose(model.phi(jnp.array([-1.0, 0.0, 1.0])), jax.nn.gelu(jnp.array([-1.0, 0.0, 1.0])))


@pytest.mark.parametrize("name", ["mupc", "sp"])
def test_initialisers_draw_what_jax_random_draws_for_the_shape(name):
  """They draw flat and reshape (much faster to compile): the numbers must be
  those of the shaped draw."""
  key, shape = jax.random.key(7), (2, 3, 3, 4, 5)
  expected = (jax.random.normal(key, shape) if name == "mupc" else
              jax.random.uniform(key, shape, minval=-1 / np.sqrt(36), maxval=1 / np.sqrt(36)))
  drawn = mf.PARAMETERIZATIONS[name].init(key, shape, 36)
  np.testing.assert_array_equal(drawn, expected)
