"""The convolutional μPC network against independent references (what every network
gets from the engine, through the program too, is in test_conformance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mupc_flax as mf
import oracles
from mupc_flax import diagnostics

IMAGE, CHANNELS, RESIDUAL, CLASSES, B = (6, 6, 2), (3, 4), (2, 1), 3, 5


def make_conv(parameterization="mupc", activation="tanh", seed=0, **kwargs):
  return mf.ConvResidualPCN(IMAGE, CHANNELS, RESIDUAL, CLASSES, activation=activation,
                            parameterization=parameterization, rngs=nnx.Rngs(seed), **kwargs)


def reference(model, activation, loss):
  """(energy(kernels, readout kernel, z, images, y), kernels, readout kernel): the
  plain per-layer reference of ``oracles``, bound to the model's structure."""
  layers, (readout_kernel, readout_multiplier) = oracles.unstack_conv(model)
  structure = [(a, stride, residual) for _, a, stride, residual in layers]
  fn = lambda kernels, readout, z, images, y: oracles.jax_conv_energy(
      kernels, readout, structure, readout_multiplier, z, images, y, activation, loss)
  return fn, [kernel for kernel, *_ in layers], readout_kernel


def per_layer(stages):
  """Per-stage [L_s, B, ...] activities -> a bottom-to-top list of [B, ...]."""
  return [layer for stage in stages for layer in stage]


def random_activities(model, seed):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.feedforward, jnp.zeros((B, np.prod(IMAGE)), jnp.float32))
  return tuple(rng.standard_normal(s.shape).astype(np.float32) for s in shapes)


def library_kernels(model, grads):
  """The gradient's kernels bottom to top, as the reference lists them."""
  return [np.asarray(k) for k in diagnostics.layer_kernels(model, grads)]


@pytest.mark.parametrize("parameterization,loss", [("sp", "mse"), ("mupc", "ce")])
def test_energy_and_activity_gradients_match_jax_reference(parameterization, loss):
  activation = "tanh"
  model = make_conv(parameterization, activation)
  x, y = oracles.random_batch(1, B, int(np.prod(IMAGE)), CLASSES)
  z = random_activities(model, 2)
  energy, kernels, readout = reference(model, activation, loss)
  images = x.reshape((B,) + IMAGE)
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    expected = energy(kernels, readout, [f64(v) for v in per_layer(z)], f64(images), f64(y))
    grad_z = jax.grad(energy, argnums=2)(kernels, readout, [f64(v) for v in per_layer(z)],
                                         f64(images), f64(y))
  np.testing.assert_allclose(mf.energy(model, z, x, y, loss=loss), expected, rtol=2e-5)
  assert mf.layer_energies(model, z, x, y, loss=loss).shape == (sum(RESIDUAL) + len(CHANNELS) + 1,)

  lr = 0.3  # one plain inference step from z moves z by −β ∂F/∂z
  stepped = mf.infer(model, x, y, mf.Inference(1, lr, "plain"), z=z, loss=loss)
  for got, z_l, g_l in zip(per_layer(stepped), per_layer(z), grad_z):
    np.testing.assert_allclose(got, z_l - lr * np.asarray(g_l), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("parameterization,loss,schedule",
                         [("mupc", "mse", "wavefront"), ("sp", "ce", "plain"), ("mupc", "ce", "wavefront"),
                          ("sp", "mse", "wavefront")])
def test_pc_weight_gradients_match_jax_reference(parameterization, loss, schedule):
  """∂F/∂W at the end of inference equals jax.grad of the reference energy there."""
  activation = "relu"
  model = make_conv(parameterization, activation, seed=3)
  x, y = oracles.random_batch(4, B, int(np.prod(IMAGE)), CLASSES)
  inference = mf.Inference(4, 0.5 * B, schedule)
  grads, _ = mf.pc_gradients(model, x, y, inference, loss=loss)
  z = mf.infer(model, x, y, inference, loss=loss)
  energy, kernels, readout = reference(model, activation, loss)
  ref_kernels, ref_readout = oracles.jax_grads64(
      energy, (0, 1), kernels, readout, per_layer(z), x.reshape((B,) + IMAGE), y)
  got, expected = library_kernels(model, grads), ref_kernels + [ref_readout]
  # One scale for all: where the reference recomputes the feed-forward start in
  # float64, its errors are rounding noise that the library has exactly zero.
  scale = max(np.abs(b).max() for b in expected)
  for layer, (a, b) in enumerate(zip(got, expected)):
    np.testing.assert_allclose(a / scale, b / scale, atol=2e-5, err_msg=f"layer {layer}")


def test_one_by_one_convolutions_are_the_dense_network():
  """1×1 images and 1×1 kernels, one stage: the dense ResidualPCN with the same weights."""
  d, n, h = 6, 5, 4
  conv = mf.ConvResidualPCN((1, 1, d), (n,), h - 1, CLASSES, kernel_size=1, activation="tanh",
                            rngs=nnx.Rngs(0))
  dense = mf.ResidualPCN(d, n, h, CLASSES, activation="tanh", rngs=nnx.Rngs(1))
  for a, b in [(conv.entries[0].multiplier, dense.input_layer.multiplier),
               (conv.stacks[0].multiplier, dense.hidden.multiplier), (conv.head.multiplier, dense.readout.multiplier)]:
    np.testing.assert_allclose(a[...], b[...], rtol=1e-7)  # the same table gives the same a_ℓ
  dense.input_layer.kernel[...] = conv.entries[0].kernel[...][0, 0]
  dense.hidden.kernel[...] = conv.stacks[0].kernel[...][:, 0, 0]
  dense.readout.kernel[...] = conv.head.kernel[...]
  x, y = oracles.random_batch(5, B, d, CLASSES)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a).reshape(np.shape(b)), b, rtol=1e-5, atol=1e-6)
  close(conv.feedforward(x), dense.feedforward(x))  # one stage: one array, as the dense one
  close(conv(x), dense(x))
  inference = mf.Inference(h, 0.5 * B)
  close(mf.infer(conv, x, y, inference), mf.infer(dense, x, y, inference))
  conv_grads, conv_metrics = mf.pc_gradients(conv, x, y, inference)
  dense_grads, dense_metrics = mf.pc_gradients(dense, x, y, inference)
  for a, b in zip(library_kernels(conv, conv_grads), library_kernels(dense, dense_grads)):
    close(a, b)
  close(conv_metrics["layer_energies"], dense_metrics["layer_energies"])
  for a, b in zip(library_kernels(conv, mf.bp_gradients(conv, x, y)[0]),
                  library_kernels(dense, mf.bp_gradients(dense, x, y)[0])):
    close(a, b)
  spectra = [diagnostics.hessian_spectrum(m, x[0], y[0], method="dense") for m in (conv, dense)]
  np.testing.assert_allclose([spectra[0]["min"], spectra[0]["max"]], [spectra[1]["min"], spectra[1]["max"]],
                             rtol=1e-4)
