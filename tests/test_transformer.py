"""The transformer PCN against a plain-JAX reference written out layer by layer (what
every network gets from the engine is in test_conformance)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mupc_flax as mf
import oracles

IMAGE, PATCH, C = (8, 8, 1), 4, 3  # 4 tokens of 16 pixels


def make_model(blocks=2, width=16, parameterization="mupc", seed=0, **kwargs):
  return mf.TransformerPCN(IMAGE, PATCH, width, blocks, C, heads=2, parameterization=parameterization,
                           rngs=nnx.Rngs(seed), **kwargs)


def batch(seed, size=6):
  return oracles.random_batch(seed, size, int(np.prod(IMAGE)), C)


def reference_energy(model):
  """(weights, z, x, y) -> the reference energy, with the weights as a flat list."""
  net = oracles.unstack_transformer(model)

  def energy(weights, z, x, y):
    embed, *rest, head = weights
    blocks = [((rest[4 * r], net["blocks"][r][0][1], rest[4 * r + 1], net["blocks"][r][0][3]),
               (rest[4 * r + 2], net["blocks"][r][1][1], rest[4 * r + 3], net["blocks"][r][1][3]))
              for r in range(len(net["blocks"]))]
    replaced = net | {"embed": (embed, net["embed"][1]), "blocks": blocks,
                      "head": (head, net["head"][1])}
    return oracles.jax_transformer_energy(replaced, list(z), x, y)

  weights = [net["embed"][0]]
  for attention, mlp in net["blocks"]:
    weights += [attention[0], attention[2], mlp[0], mlp[2]]
  return energy, weights + [net["head"][0]]


def library_weights(grads):
  """The library's gradient state as the reference's flat list."""
  g = nnx.to_pure_dict(grads)
  out = [g["embed"]["kernel"]]
  for r in range(g["attention_qkv"]["kernel"].shape[0]):
    out += [g["attention_qkv"]["kernel"][r], g["attention_out"]["kernel"][r],
            g["mlp_up"]["kernel"][r], g["mlp_down"]["kernel"][r]]
  return out + [g["head"]["kernel"]]


# (parameterization, PC layer, layer norm): the paper's sublayers, and the limits paper's blocks.
SHAPES = [("mupc", "sublayer", True), ("sp", "sublayer", True), ("mupc", "block", False),
          ("mupc", "block", True)]


@pytest.mark.parametrize("parameterization,pc_layer,layer_norm", SHAPES)
def test_energy_and_activity_gradient_match_reference(parameterization, pc_layer, layer_norm):
  model = make_model(parameterization=parameterization, pc_layer=pc_layer, layer_norm=layer_norm)
  x, y = batch(1)
  z = np.random.default_rng(2).standard_normal((model.hidden_layers, 6, 4, 16)).astype(np.float32)
  energy, weights = reference_energy(model)
  with jax.enable_x64(True):
    want = float(energy(weights, jnp.asarray(z, jnp.float64), jnp.asarray(x, jnp.float64), y))
  np.testing.assert_allclose(float(mf.energy(model, jnp.asarray(z), x, y)), want, rtol=1e-5)
  # One plain step from z moves it by −β ∂F/∂z: the branches' vector–Jacobian products.
  ref = oracles.jax_grads64(energy, 1, weights, z, x, y)
  stepped = mf.infer(model, x, y, mf.Inference(1, 0.7, "plain"), z=jnp.asarray(z))
  np.testing.assert_allclose(stepped, z - 0.7 * ref, rtol=1e-4, atol=1e-5)
  # The feed-forward pass leaves every hidden layer without error.
  energies = mf.layer_energies(model, model.feedforward(x), x, y)
  assert float(jnp.max(energies[:-1])) < 1e-10 and float(energies[-1]) > 0


@pytest.mark.parametrize("schedule,pc_layer,layer_norm", [("plain", "sublayer", True),
                                                          ("wavefront", "sublayer", True),
                                                          ("wavefront", "block", False)])
def test_pc_gradients_match_step_by_step_reference(schedule, pc_layer, layer_norm):
  """Feed-forward start, T steps of descent on z, ∂F/∂W: equal to a float64
  jax.grad loop over the reference energy."""
  model = make_model(pc_layer=pc_layer, layer_norm=layer_norm)
  x, y = batch(3)
  # β/B = 1/2 per sample: the error reaches every layer at a size (≥ 3 % of the
  # top's) that float32 differences of the branches resolve to 1e-4.
  steps, lr = model.hidden_layers, 3.0
  energy, weights = reference_energy(model)
  with jax.enable_x64(True):
    w64 = [jnp.asarray(w, jnp.float64) for w in weights]
    z = jnp.asarray(model.feedforward(x), jnp.float64)
    for _ in range(steps):
      z = z - lr * jax.grad(energy, argnums=1)(w64, z, jnp.asarray(x, jnp.float64), y)
    ref = jax.grad(energy)(w64, z, jnp.asarray(x, jnp.float64), y)
  grads, _ = mf.pc_gradients(model, x, y, mf.Inference(steps, lr, schedule))
  for got, want in zip(library_weights(grads), ref):
    want = np.asarray(want)
    assert np.linalg.norm(np.asarray(got) - want) < 5e-4 * np.linalg.norm(want)
  assert np.linalg.norm(ref[0]) > 0.03 * np.linalg.norm(ref[-1])


@pytest.mark.parametrize("pc_layer,depth", [("sublayer", 2 * 3 + 2), ("block", 3 + 2)])
def test_depth_exponent_sets_the_branch_premultipliers(pc_layer, depth):
  """L counts every PC layer: 2R + 2 per sublayer, R + 2 per block."""
  for alpha in (0.5, 1.0):
    model = make_model(blocks=3, depth_exponent=alpha, pc_layer=pc_layer)
    assert model.hidden_layers == depth - 1
    np.testing.assert_allclose(model.attention_out.multiplier[...], 16 ** -0.5 * depth ** -alpha,
                               rtol=1e-6)
    np.testing.assert_allclose(model.mlp_down.multiplier[...], 64 ** -0.5 * depth ** -alpha,
                               rtol=1e-6)
    np.testing.assert_allclose(model.attention_qkv.multiplier[...], 16 ** -0.5, rtol=1e-6)
    np.testing.assert_allclose(model.logit_scale[...], 1 / 8)  # 1/d_head, d_head = 8
  sp = make_model(parameterization="sp")
  np.testing.assert_allclose(sp.logit_scale[...], 8 ** -0.5)
  np.testing.assert_allclose(sp.attention_out.multiplier[...], 1.0)
