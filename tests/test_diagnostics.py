"""Diagnostics against independent references: Hessian spectra, PC–BP agreement,
coordinate checks and per-layer learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mupc_flax as mf
from mupc_flax import diagnostics
import oracles


@pytest.mark.parametrize("parameterization,activation", [("mupc", "relu"), ("sp", "tanh"),
                                                         ("mupc", "linear")])
def test_hessian_condition_matches_dense_reference(parameterization, activation):
  d, n, h, c = 5, 6, 3, 4
  model = mf.ResidualPCN(d, n, h, c, activation=activation, parameterization=parameterization,
                         rngs=nnx.Rngs(1))
  x, y = oracles.random_batch(2, 1, d, c)
  z = np.random.default_rng(3).standard_normal((h, n)).astype(np.float32)
  weights, multipliers = oracles.unstack(model)

  def reference_energy(flat):  # the plain reference energy of one sample, in float64
    return oracles.jax_energy(weights, multipliers, list(flat.reshape(h, 1, n)), x, y, activation, "mse")

  with jax.enable_x64(True):
    hessian = np.asarray(jax.hessian(reference_energy)(jnp.asarray(z, jnp.float64).reshape(-1)))
  eigenvalues = np.linalg.eigvalsh(hessian)
  spectrum = diagnostics.hessian_spectrum(model, jnp.asarray(x[0]), jnp.asarray(y[0]),
                                          z=jnp.asarray(z)[:, None], method="dense")
  np.testing.assert_allclose([spectrum["min"], spectrum["max"]], [eigenvalues[0], eigenvalues[-1]],
                             rtol=1e-4)
  if eigenvalues[0] > 0:
    np.testing.assert_allclose(spectrum["condition"], eigenvalues[-1] / eigenvalues[0], rtol=1e-3)
  assert spectrum["method"] == "dense"


def test_lanczos_finds_the_dense_extremes():
  model = mf.ResidualPCN(10, 24, 4, 3, rngs=nnx.Rngs(0))  # NH = 96
  x, y = oracles.random_batch(0, 1, 10, 3)
  dense = diagnostics.hessian_spectrum(model, jnp.asarray(x[0]), jnp.asarray(y[0]), method="dense")
  lanczos = diagnostics.hessian_spectrum(model, jnp.asarray(x[0]), jnp.asarray(y[0]),
                                         method="lanczos", iterations=96)
  np.testing.assert_allclose([lanczos["min"], lanczos["max"]], [dense["min"], dense["max"]], rtol=1e-3)


def test_condition_number_grows_with_depth():
  x, y = oracles.random_batch(0, 1, 20, 10)
  conditions = [diagnostics.hessian_spectrum(mf.ResidualPCN(20, 32, h, 10, rngs=nnx.Rngs(0)),
                                             jnp.asarray(x[0]), jnp.asarray(y[0]))["condition"]
                for h in (2, 8, 32)]
  assert conditions[0] < conditions[1] < conditions[2], conditions


def test_pc_bp_cosine_wide_versus_deep_narrow():
  """Linear μPC: PC at equilibrium ≈ BP when width ≫ depth, not when deep and narrow."""
  x, y = oracles.random_batch(1, 8, 16, 4)
  inference = mf.Inference(1500, 0.2 * 8, "plain")  # runs to equilibrium
  wide = diagnostics.pc_bp_agreement(mf.ResidualPCN(16, 512, 2, 4, activation="linear",
                                                    rngs=nnx.Rngs(0)), x, y, inference)
  narrow = diagnostics.pc_bp_agreement(mf.ResidualPCN(16, 8, 16, 4, activation="linear",
                                                      rngs=nnx.Rngs(0)), x, y, inference)
  assert wide["cosine"] > 0.999
  assert narrow["cosine"] < 0.9
  assert len(wide["layer_cosines"]) == 3 and min(wide["layer_cosines"]) > 0.99


def test_coordinate_check_flat_under_mupc_not_under_sp():
  x, y = oracles.random_batch(0, 32, 20, 10)
  make = lambda width, **kw: mf.ResidualPCN(20, width, 4, 10, **kw)
  mupc = diagnostics.coordinate_check(make, (64, 256), x, y, parameterization="mupc", steps=3)
  sp = diagnostics.coordinate_check(make, (64, 256), x, y, parameterization="sp", steps=3)
  assert mupc[64].shape == (4, 5)  # steps 0…3 × (4 hidden layers + output)
  ratio = lambda r: r[256][-1] / r[64][-1]  # per layer, after the last step
  assert np.all((ratio(mupc) > 0.5) & (ratio(mupc) < 2.0)), ratio(mupc)
  assert ratio(sp)[-1] > 100, ratio(sp)  # the output blows up with width under SP


def test_layer_learning_measures():
  model = mf.ResidualPCN(6, 8, 4, 3, rngs=nnx.Rngs(0))
  initial = nnx.to_pure_dict(jax.device_get(nnx.state(model, nnx.Param)))
  kernels = diagnostics.layer_kernels(model, nnx.state(model, nnx.Param))
  assert [k.shape for k in kernels] == [(6, 8), (8, 8), (8, 8), (8, 8), (8, 3)]
  moved = jax.tree.map(np.array, initial)
  moved["hidden"]["kernel"][1] *= 1.5
  change = diagnostics.relative_weight_change(model, initial, moved)
  np.testing.assert_allclose(change, [0, 0, 0.5, 0, 0], atol=1e-6)
  np.testing.assert_allclose(diagnostics.layer_norms(model, initial),
                             [np.linalg.norm(k) for k in kernels], rtol=1e-6)
