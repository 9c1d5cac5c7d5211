"""The transformer PCN against a plain-JAX reference written out layer by layer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mupc_flax as mf
from mupc_flax import diagnostics, metrics
import oracles
from programs import checkpoint_steps, load_checkpoint, run

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


@pytest.mark.parametrize("parameterization", ["mupc", "sp"])
def test_energy_and_activity_gradient_match_reference(parameterization):
  model = make_model(parameterization=parameterization)
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


@pytest.mark.parametrize("schedule", ["plain", "wavefront"])
def test_pc_gradients_match_step_by_step_reference(schedule):
  """Feed-forward start, T steps of descent on z, ∂F/∂W: equal to a float64
  jax.grad loop over the reference energy."""
  model = make_model()
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


@pytest.mark.parametrize("optimizer", [dict(lr=1.5), dict(lr=1.5, optimizer="nesterov", momentum=0.8)])
def test_wavefront_equals_plain_and_zeros_below_the_front(optimizer):
  model = make_model(blocks=3)
  x, y = batch(4)
  hidden = model.hidden_layers
  for steps in (3, 2 * hidden):
    results = [mf.pc_gradients(model, x, y, mf.Inference(steps, schedule=s, phases=2, **optimizer))
               for s in ("plain", "wavefront")]
    (plain, plain_metrics), (wave, wave_metrics) = results
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(wave)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max(initial=0)))
    energies = np.asarray(plain_metrics["layer_energies"])
    np.testing.assert_allclose(wave_metrics["layer_energies"], energies, rtol=1e-5, atol=1e-12)
    if steps < hidden:  # below the front: exactly zero error, and no embedding gradient
      assert np.all(energies[:hidden - steps] == 0) and np.all(energies[hidden - steps:] > 0)
      assert np.all(np.asarray(plain["embed"]["kernel"][...]) == 0)


def test_eight_devices_match_one():
  results = []
  for devices in (1, 8):
    model = make_model()
    # SGD: Adam would turn the rounding of near-zero gradients into whole steps.
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    step = mf.make_train_step(model, optimizer, mf.make_mesh(jax.devices()[:devices]),
                              inference=mf.Inference(model.hidden_layers, 8.0))
    state = (nnx.state(model), nnx.state(optimizer))
    for i in range(2):
      x, y = batch(10 + i, size=32)
      *state, step_metrics = step(*state, x, y)
    results.append((jax.tree.map(np.asarray, state[0]), jax.tree.map(np.asarray, step_metrics)))
  (one, m1), (eight, m8) = results
  initial = jax.tree.leaves(nnx.state(make_model(), nnx.Param))
  moved = [np.abs(a - w).max() for a, w in zip(jax.tree.leaves(nnx.state(one, nnx.Param)), initial)]
  assert min(moved) > 1e-6  # every weight matrix learned
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
  np.testing.assert_allclose(m8["layer_energies"], m1["layer_energies"], rtol=1e-4, atol=1e-9)


def test_coordinate_check_over_width_and_depth():
  """After three μPC training steps every layer's activity RMS stays within a
  factor 2 across d ∈ {32, 128} at 1 and 2 blocks, under both depth
  exponents; standard PC (checked at 2 blocks) leaves that band."""
  x, y = batch(5, size=32)

  def spread(parameterization, depth_exponent=0.5, depths=(1, 2)):
    ratios = []
    for blocks in depths:
      make = lambda width, **kw: mf.TransformerPCN(IMAGE, PATCH, width, blocks, C, heads=2,
                                                   depth_exponent=depth_exponent, **kw)
      rms = diagnostics.coordinate_check((32, 128), 0, x, y, parameterization=parameterization,
                                         steps=3, learning_rate=0.01 if parameterization == "sp"
                                         else 0.1, make_model=make)
      ratios.append(rms[128][-1] / rms[32][-1])  # per layer, after the last step
    return np.concatenate(ratios)

  for alpha in (0.5, 1.0):
    mupc = spread("mupc", alpha)
    assert np.all((mupc > 0.5) & (mupc < 2.0)), (alpha, mupc)
  sp = spread("sp", depths=(2,))
  assert np.any((sp < 0.5) | (sp > 2.0)), sp


def test_depth_exponent_sets_the_branch_premultipliers():
  for alpha in (0.5, 1.0):
    model = make_model(blocks=3, depth_exponent=alpha)
    depth = 2 * 3 + 2
    np.testing.assert_allclose(model.attention_out.multiplier[...], 16 ** -0.5 * depth ** -alpha,
                               rtol=1e-6)
    np.testing.assert_allclose(model.mlp_down.multiplier[...], 64 ** -0.5 * depth ** -alpha,
                               rtol=1e-6)
    np.testing.assert_allclose(model.attention_qkv.multiplier[...], 16 ** -0.5, rtol=1e-6)
    np.testing.assert_allclose(model.logit_scale[...], 1 / 8)  # 1/d_head, d_head = 8
  sp = make_model(parameterization="sp")
  np.testing.assert_allclose(sp.logit_scale[...], 8 ** -0.5)
  np.testing.assert_allclose(sp.attention_out.multiplier[...], 1.0)


def test_cli_trains_resumes_and_refuses_a_bad_shape(tmp_path, mnist_data_dir):
  config = "configs/mnist_transformer.py:smoke"
  common = ["--config.train.num_steps=8", "--config.checkpoint_every_steps=4",
            "--config.eval_every_steps=4"]
  straight = run(tmp_path / "straight", mnist_data_dir, *common, config=config)
  assert straight.returncode == 0, straight.stderr[-2000:]
  half = run(tmp_path / "resumed", mnist_data_dir, *common[1:], "--config.train.num_steps=4",
             config=config)
  resumed = run(tmp_path / "resumed", mnist_data_dir, *common, config=config)
  assert half.returncode == 0 and resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resumed from step 4" in resumed.stderr
  assert checkpoint_steps(tmp_path / "resumed") == [4, 8]
  a, b = load_checkpoint(tmp_path / "straight", 8), load_checkpoint(tmp_path / "resumed", 8)
  for key in a:
    np.testing.assert_array_equal(b[key], a[key], err_msg=key)
  first, last = [r for r in metrics.read(tmp_path / "straight" / "metrics.jsonl") if r["split"] == "eval"]
  assert last["loss"] < first["loss"] and last["accuracy"] > 0.12  # chance is 0.1
  assert len(last["weight_change"]) == 2 * 1 + 2
  assert len(last["pc_bp_cosines"]) == 4
  bad = run(tmp_path / "bad", mnist_data_dir, "--config.model.patch_size=5", config=config)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "error: config.model does not fit mnist (28×28×1 images): The image sides (28, 28) must be "
      "multiples of the patch size 5.")
  assert not (tmp_path / "bad").exists()
