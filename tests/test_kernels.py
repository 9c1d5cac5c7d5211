"""The fused Pallas inference step (interpret mode on CPU) against the XLA path.

The XLA path itself is checked against ``jax.grad`` of a plain reference
energy in test_pc.py; here the kernel must reproduce it: activities after
inference, weight gradients, and exact zeros below the wavefront.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mupc_flax as mf
import oracles
from mupc_flax import kernels

# Width 96 tiles into three 32-column tiles, each product summed over three
# 32-row chunks: the kernels' tiling is exercised, not one whole block.
D, N, H, C, B = 12, 96, 6, 5, 8


# The XLA path in the layout the kernel takes, and the kernel.
ENGINES = {"xla": mf.Engine(layout="stacked"), "pallas": mf.Engine(kernel="pallas")}


def make_model(activation):
  return mf.ResidualPCN(D, N, H, C, activation=activation, rngs=nnx.Rngs(3))


def test_tile_is_the_largest_power_of_two_dividing_the_width():
  assert [kernels.tile(n) for n in (96, 512, 12, 7, 128)] == [32, 64, 4, 1, 64]


@pytest.mark.parametrize("schedule,loss,activation", [("wavefront", "mse", "relu"),
                                                      ("plain", "ce", "tanh")])
def test_pallas_inference_equals_the_xla_path(schedule, loss, activation):
  x, y = oracles.random_batch(5, B, D, C)
  # T = 3 < H: under the wavefront the bottom three layers are never reached.
  inference = {kind: mf.Inference(3, 4.0, schedule=schedule, phases=3, engine=engine)
               for kind, engine in ENGINES.items()}
  model = make_model(activation)

  def gradients(model, kind):
    return mf.pc_gradients(model, x, y, inference[kind], loss=loss)

  assert "pallas_call" in str(jax.make_jaxpr(lambda m: gradients(m, "pallas")[0])(model))
  assert "pallas_call" not in str(jax.make_jaxpr(lambda m: gradients(m, "xla")[0])(model))
  grads_xla, metrics_xla = gradients(model, "xla")
  grads_pallas, metrics_pallas = jax.jit(gradients, static_argnums=1)(model, "pallas")
  for a, b in zip(jax.tree.leaves(grads_xla), jax.tree.leaves(grads_pallas)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(b == 0, a == 0)  # the same exact zeros
  np.testing.assert_allclose(metrics_pallas["layer_energies"], metrics_xla["layer_energies"],
                             rtol=1e-5, atol=1e-10)
  # After T = 3 steps from the feed-forward start only layers 3…5 (of 0…5) have
  # errors, under either schedule: the kernels into layers 1 and 2 get exactly zero.
  per_kernel = np.abs(np.asarray(grads_pallas["hidden"]["kernel"][...])).sum(axis=(1, 2))
  assert (per_kernel[:2] == 0).all() and (per_kernel[2:] > 0).all()

  # From given activities (errors relative to a non-zero start): plain schedule only.
  if schedule == "plain":
    z = model.feedforward(jnp.asarray(x)) + 0.1 * np.random.default_rng(6).standard_normal((H, B, N))
    z = z.astype(jnp.float32)
    after = [mf.infer(model, x, y, inference[kind], z=z, loss=loss) for kind in ("xla", "pallas")]
    np.testing.assert_allclose(after[1], after[0], rtol=1e-5, atol=1e-6)
    assert np.abs(after[0] - z).max() > 1e-3  # inference moved the activities


def test_pallas_train_step_on_eight_devices_equals_the_xla_step():
  """The sharded train step (8 emulated devices, one sample each) with the
  kernel inside jax.shard_map: the same updated weights as the XLA path."""
  x, y = oracles.random_batch(7, B, D, C)
  assert len(mf.make_mesh().devices.flat) == 8
  updated = {}
  for kind, engine in ENGINES.items():
    model = make_model("relu")
    optimizer = nnx.Optimizer(model, optax.adam(0.01), wrt=nnx.Param)
    step = mf.make_train_step(model, optimizer, mf.make_mesh(),
                              inference=mf.Inference(H, 1.0, engine=engine))
    updated[kind], _, _ = step(nnx.state(model), nnx.state(optimizer), x, y)
  for a, b in zip(jax.tree.leaves(updated["xla"]), jax.tree.leaves(updated["pallas"])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
