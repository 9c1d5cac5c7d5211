"""One suite over every network: what any ``PCNetwork`` gets from the engine.

Each entry of ``NETWORKS`` is a config.model (a built-in kind, or the example
network from outside the package); every test runs on each. The oracle is a
plain-JAX energy written here from the protocol's maps alone (one layer at
a time, no engine code): the engine's closed forms, layouts, wavefront,
sharding and checkpoints must all agree with ``jax.grad`` of it.
"""

import concurrent.futures
import shutil
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mupc_flax as mf
from mupc_flax import data, diagnostics, metrics
from mupc_flax.networks import kinds
from programs import REPO, checkpoint_steps, load_checkpoint, run

sys.path.insert(0, str(REPO))  # the example network lives outside the package

# A small dataset shape every image network takes: 8×8 grey images, 4 classes;
# the language network's: windows of 6 characters of a 5-character vocabulary.
SPEC = data.pipeline.DatasetSpec((8, 8, 1), (0.0,), (1.0,), num_classes=4)
TEXT_SPEC = data.TextSpec("\nabcd", context=6)
B = 8

# name -> (config.model fields, the config argument of the CLI smoke run on real data).
NETWORKS = {
    "dense": (dict(width=16, hidden_layers=4), "configs/default.py:kind=dense,smoke"),
    "conv": (dict(width=8, stages=2, residual_layers=1),
             "configs/default.py:kind=conv,stem_stride=2,smoke"),
    "transformer": (dict(width=8, blocks=1, patch_size=4, heads=2),
                    "configs/default.py:kind=transformer,smoke"),
    "mixer": (dict(width=8, blocks=2, patch_size=4), "configs/default.py:kind=examples.mixer:KIND,smoke"),
    "causal_transformer": (dict(width=8, blocks=1, heads=2), "configs/shakespeare.py:smoke"),
}
KIND_OF = {"dense": "dense", "conv": "conv", "transformer": "transformer",
           "mixer": "examples.mixer:KIND", "causal_transformer": "causal_transformer"}
ENGINES = {"auto": mf.Engine(), "per_layer": mf.Engine(layout="per_layer"),
           "general": mf.Engine(closed_form=False)}


def spec_of(name):
  return TEXT_SPEC if name == "causal_transformer" else SPEC


def build(name, seed=0, **fields):
  config = kinds.model_config(KIND_OF[name], **(NETWORKS[name][0] | fields))
  return kinds.build(config, spec_of(name), seed)


def batch(name, seed, size=B):
  """Inputs and one-hot targets of ``size`` samples for network ``name``:
  images [size, 64] and [size, 4], or token ids [size, 6] and the one-hot
  characters [size, 6, 5] (a target per position)."""
  rng = np.random.default_rng(seed)
  spec = spec_of(name)
  if spec is TEXT_SPEC:
    x = rng.integers(0, spec.num_classes, (size, spec.context)).astype(np.int32)
    labels = rng.integers(0, spec.num_classes, (size, spec.context))
  else:
    x = rng.standard_normal((size, spec.input_size)).astype(np.float32)
    labels = rng.integers(0, spec.num_classes, size)
  return x, np.eye(spec.num_classes, dtype=np.float32)[labels]


def stages_of(z):
  return z if isinstance(z, tuple) else (z,)


def oracle_energy(net, z, x, y, loss="mse", output_precision=1.0):
  """F of the protocol's maps, one layer at a time (the batch mean), its
  output term weighted by ``output_precision``."""
  total, below = 0.0, x
  for s, stage in enumerate(stages_of(z)):
    mu = net.entry(s, below)
    total += 0.5 * jnp.sum(jnp.square(stage[0] - mu))
    weights = net.residual_weights(s)
    for k in range(1, len(stage)):
      one = tuple(w[k - 1:k] for w in weights)
      mu = stage[k - 1] + net.residual_branch(s, one, net.phi(stage[k - 1])[None])[0]
      total += 0.5 * jnp.sum(jnp.square(stage[k] - mu))
    below = net.phi(stage[-1])
  outputs = net.readout(below)
  if loss == "mse":
    total += output_precision * 0.5 * jnp.sum(jnp.square(y - outputs))
  else:
    total += output_precision * -jnp.sum(y * jax.nn.log_softmax(outputs))
  return total / x.shape[0]


def oracle_perturbed_pass(net, eps, x):
  """ePC's states from errors ε (per stage, like the activities): each
  layer's prediction from the protocol's maps, plus its ε."""
  stages, below = [], x
  for s, stage_eps in enumerate(stages_of(eps)):
    z = [net.entry(s, below) + stage_eps[0]]
    weights = net.residual_weights(s)
    for k in range(1, len(stage_eps)):
      one = tuple(w[k - 1:k] for w in weights)
      z.append(z[-1] + net.residual_branch(s, one, net.phi(z[-1])[None])[0] + stage_eps[k])
    stages.append(jnp.stack(z))
    below = net.phi(z[-1])
  return stages[0] if len(stages) == 1 else tuple(stages)


def perturbed_start(net, x, seed):
  z = mf.feedforward(net, x)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(np.float32), z)


def assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
  """Leaf by leaf, within ``rtol`` and ``atol`` times the leaf's largest value."""
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = float(np.abs(np.asarray(v)).max(initial=0))
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol * scale + 1e-12)


@pytest.mark.parametrize("name", NETWORKS)
def test_is_a_pc_network(name):
  net = build(name)
  assert isinstance(net, mf.PCNetwork)
  assert mf.pc.hidden_layers(net) == sum(net.stage_layers)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("name", NETWORKS)
def test_energy_matches_the_oracle(name, loss):
  net, (x, y) = build(name), batch(name, 1)
  z = perturbed_start(net, x, 2)
  np.testing.assert_allclose(mf.energy(net, z, x, y, loss=loss), oracle_energy(net, z, x, y, loss),
                             rtol=1e-5)


@pytest.mark.parametrize("name", NETWORKS)
def test_activity_step_is_gradient_descent_on_the_oracle(name):
  """One plain step from given activities is z − β ∂F/∂z of the oracle, on
  every path: the closed form, per layer, and the general path (jax.grad of the energy)."""
  net, (x, y) = build(name), batch(name, 3)
  z, lr = perturbed_start(net, x, 4), 0.5 * B
  grad = jax.grad(oracle_energy, argnums=1)(net, z, x, y)
  for engine in ENGINES.values():
    got = mf.infer(net, x, y, mf.Inference(1, lr, "plain", engine=engine), z=z)
    assert_trees_close(got, jax.tree.map(lambda a, g: a - lr * g, z, grad))
  # A weak output term (γ): the closed form and the general path both weigh it.
  grad = jax.grad(oracle_energy, argnums=1)(net, z, x, y, "mse", 0.25)
  for engine in (ENGINES["auto"], ENGINES["general"]):
    got = mf.infer(net, x, y, mf.Inference(1, lr, "plain", engine=engine, output_precision=0.25),
                   z=z)
    assert_trees_close(got, jax.tree.map(lambda a, g: a - lr * g, z, grad))


@pytest.mark.parametrize("name", NETWORKS)
def test_error_steps_are_gradient_descent_on_the_oracle(name):
  """ePC: two steps on the errors from zero are ε − β ∂E/∂ε of the oracle
  energy at the oracle's error-perturbed pass; the states are that pass."""
  net, (x, y) = build(name), batch(name, 3)
  lr = 0.5 * B
  energy = lambda eps: oracle_energy(net, oracle_perturbed_pass(net, eps, x), x, y, "ce")
  eps = jax.tree.map(jnp.zeros_like, mf.feedforward(net, x))
  for _ in range(2):
    eps = jax.tree.map(lambda e, g: e - lr * g, eps, jax.grad(energy)(eps))
  got = mf.infer(net, x, y, mf.Inference(2, lr, method="errors"), loss="ce")
  assert_trees_close(got, oracle_perturbed_pass(net, eps, x))


def oracle_method(problem, stages):
  """An inference method from outside the engine (``pc.InferenceMethod``):
  plain gradient descent on the activities of the oracle energy."""
  net, x, y, steps, lr = problem.model, problem.x, problem.y, problem.inference.steps, problem.inference.lr
  start = stages or mf.pc.forward.as_stages(mf.feedforward(net, x))
  z = start
  for _ in range(steps):
    z = jax.tree.map(lambda a, g: a - lr * g, z, jax.grad(oracle_energy, argnums=1)(net, z, x, y))
  arrange = lambda arrays: mf.pc.layouts.arrange_each(arrays, problem.plan.per_layer)
  errors = arrange(mf.pc.deviations.start_errors(problem, z))
  return mf.pc.descent.Equilibrium(z, errors, arrange(tuple(net.phi(a) for a in z)),
                                   net.readout(net.phi(start[-1][-1])),
                                   {"inference_steps": jnp.asarray(steps, jnp.int32)})


@pytest.mark.parametrize("name", NETWORKS)
def test_a_new_method_is_one_table_entry(name, monkeypatch):
  """A method registered in ``METHODS`` runs through ``infer`` and
  ``pc_inference`` (metrics, weight gradients) like the built-in ones: the
  oracle's gradient descent gives what the states method gives."""
  monkeypatch.setitem(mf.pc.inference.METHODS, "oracle", oracle_method)
  net, (x, y) = build(name), batch(name, 3)
  ours = mf.Inference(3, 0.5 * B, "plain")
  theirs = mf.Inference(3, 0.5 * B, "plain", method="oracle")
  # Absolute tolerances: the oracle's errors cancel to rounding where the engine's are exactly 0.
  close = lambda a, b: jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), a, b)
  close(mf.infer(net, x, y, theirs), mf.infer(net, x, y, ours))
  (result, metrics), (reference, reference_metrics) = (
      mf.pc.pc_inference(net, x, y, inference) for inference in (theirs, ours))
  close(result, reference)
  close(metrics, reference_metrics)
  with pytest.raises(ValueError, match="Unknown inference method 'oracle2'"):
    mf.Inference(method="oracle2")


def parameter_cosines(a, b):
  """Per nnx.Param leaf, cos(a, b) in float64 (leaves where b is zero left out)."""
  out = []
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    u, v = np.ravel(np.asarray(u, np.float64)), np.ravel(np.asarray(v, np.float64))
    if np.linalg.norm(v) > 0:
      out.append(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
  return np.array(out)


@pytest.mark.parametrize("name", NETWORKS)
def test_errors_after_one_small_step_learn_in_bps_directions(name):
  """ePC's first step carries BP's activity gradient to every layer at once,
  so the local weight gradient there is BP's, matrix by matrix."""
  net, (x, y) = build(name), batch(name, 8)
  pc_grads, _ = mf.pc_gradients(net, x, y, mf.Inference(1, 1e-3 * B, method="errors"), loss="ce")
  bp_grads, _ = mf.bp_gradients(net, x, y, loss="ce")
  cosines = parameter_cosines(pc_grads, bp_grads)
  assert len(cosines) == len(jax.tree.leaves(bp_grads)) and np.all(cosines > 0.999), cosines


@pytest.mark.parametrize("name", NETWORKS)
def test_weight_gradients_are_the_oracles_at_the_end_of_inference(name):
  net, (x, y) = build(name), batch(name, 5)
  # State PC; with a weak output term γ (the gradient then divided by γ); ePC.
  for inference, gamma in [(mf.Inference(3, 0.5 * B), 1.0),
                           (mf.Inference(3, 0.5 * B, output_precision=0.25), 0.25),
                           (mf.Inference(3, 0.5 * B, method="errors"), 1.0)]:
    grads, metrics = mf.pc_gradients(net, x, y, inference, loss="ce")
    z = mf.infer(net, x, y, inference, loss="ce")
    expected = nnx.grad(lambda net: oracle_energy(net, z, x, y, "ce", gamma) / gamma)(net)
    # The oracle forms each small error as z − μ, a difference of rounded numbers.
    assert_trees_close(grads, expected, atol=1e-3)
    np.testing.assert_allclose(metrics["energy"], oracle_energy(net, z, x, y, "ce", gamma),
                               rtol=1e-5)


@pytest.mark.parametrize("name", NETWORKS)
def test_wavefront_equals_plain_and_keeps_zeros_below_the_front(name):
  """Gradient descent on every network; every other optimiser, in both layouts,
  on the dense one in test_inference.py (the front is the network's, the
  optimiser acts on whatever tree of activities it is given)."""
  net, (x, y) = build(name), batch(name, 6)
  hidden = mf.pc.hidden_layers(net)
  layers = lambda z: [np.asarray(layer) for stage in stages_of(z) for layer in stage]
  z0 = layers(mf.feedforward(net, x))
  # Inside the front, and past it. A network of linear branches runs the closed
  # form, and the general path too.
  general = [ENGINES["general"]] if getattr(net, "linear_branches", False) else []
  for steps in (2, hidden + 2):
    plain = mf.infer(net, x, y, mf.Inference(steps, 2.0, schedule="plain"))
    for engine in [ENGINES["auto"]] + general:
      front = mf.infer(net, x, y, mf.Inference(steps, 2.0, schedule="wavefront", phases=2,
                                               engine=engine))
      assert_trees_close(front, plain, rtol=1e-5)
      moved = np.array([np.abs(a - b).max() for a, b in zip(layers(front), z0)])
      if steps < hidden:  # exactly the top `steps` layers moved
        assert np.all(moved[:hidden - steps] == 0) and np.all(moved[hidden - steps:] > 0), moved


# ePC's sharding (one λ_max agreed over the devices) is the engine's, whatever the
# network: it runs on a dense and a per-token network; state PC on every one.
@pytest.mark.parametrize("name, method", [(name, "states") for name in NETWORKS]
                         + [("dense", "errors"), ("causal_transformer", "errors")])
def test_eight_devices_match_one(name, method):
  results = []
  for devices in (1, 8):
    net = build(name)
    # SGD: Adam would turn the rounding of near-zero gradients into whole steps.
    optimizer = nnx.Optimizer(net, optax.sgd(0.2), wrt=nnx.Param)
    # ePC under the step guard: one λ_max agreed over the devices.
    inference = mf.Inference(mf.pc.hidden_layers(net), 0.5 * 16, method=method,
                             step_guard=3 if method == "errors" else 0)
    step = mf.make_train_step(net, optimizer, mf.make_mesh(jax.devices()[:devices]),
                              inference=inference)
    state = (nnx.state(net), nnx.state(optimizer))
    for i in range(2):
      *state, step_metrics = step(*state, *batch(name, 10 + i, size=16))
    results.append((jax.tree.map(np.asarray, state[0]), jax.tree.map(np.asarray, step_metrics)))
  (one, m1), (eight, m8) = results
  initial = jax.tree.leaves(nnx.state(build(name), nnx.Param))
  moved = [np.abs(a - w).max() for a, w in zip(jax.tree.leaves(nnx.state(one, nnx.Param)), initial)]
  assert min(moved) > 1e-7, moved  # every weight learned
  assert_trees_close(eight, one, rtol=1e-4)
  np.testing.assert_allclose(m8["layer_energies"], m1["layer_energies"], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", NETWORKS)
def test_coordinate_check_is_flat_in_width_under_mupc(name):
  """After three μPC training steps every layer's activity RMS stays within a
  factor 2 when the width grows 4×."""
  x, y = batch(name, 7, size=16)
  width = NETWORKS[name][0]["width"]
  make = lambda width, parameterization, rngs: kinds.get(KIND_OF[name]).make(
      spec_of(name), rngs=rngs, **(NETWORKS[name][0] | dict(width=width, parameterization=parameterization)))
  rms = diagnostics.coordinate_check(make, (width, 4 * width), x, y, parameterization="mupc",
                                     steps=3)
  ratio = rms[4 * width][-1] / rms[width][-1]
  assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio


# The program's first run of 20 steps, and its rerun from the middle checkpoint.
CLI_FLAGS = ["--config.train.num_steps=20", "--config.checkpoint_every_steps=10",
             "--config.eval_every_steps=20", "--config.log_every_steps=10",
             "--config.log_gradient_agreement=False"]  # resume is the point here, not PC–BP cosines


def _train_and_resume(name, folder, data_dir):
  """The first run into ``folder/run``; its final checkpoint moved aside to
  ``folder/first`` (as though deleted); the rerun. (first, its checkpoint
  steps, rerun): completed processes, read by the test."""
  config = NETWORKS[name][1]
  workdir = folder / "run"
  first = run(workdir, data_dir, *CLI_FLAGS, config=config)
  steps = checkpoint_steps(workdir)
  if first.returncode != 0 or steps != [10, 20]:
    return first, steps, None
  (folder / "first" / "checkpoints").mkdir(parents=True)
  shutil.move(workdir / "checkpoints" / "20", folder / "first" / "checkpoints" / "20")
  return first, steps, run(workdir, data_dir, *CLI_FLAGS, config=config)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, mnist_data_dir, request):
  """Every network's pair of program runs, two networks at a time (each run
  keeps about one core busy), on MNIST or Shakespeare (where its archive is
  at hand): name -> (folder, first, its checkpoint steps, rerun)."""
  try:
    text_data_dir = request.getfixturevalue("shakespeare_data_dir")
  except pytest.skip.Exception:
    text_data_dir = None
  data_dirs = {name: text_data_dir if spec_of(name) is TEXT_SPEC else mnist_data_dir
               for name in NETWORKS}
  folders = {name: tmp_path_factory.mktemp(f"cli_{name}") for name in NETWORKS if data_dirs[name]}
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {name: pool.submit(_train_and_resume, name, folder, data_dirs[name])
               for name, folder in folders.items()}
    return {name: (folders[name], *future.result()) for name, future in futures.items()}


@pytest.mark.parametrize("name", NETWORKS)
def test_cli_trains_and_resumes_bit_identically(name, cli_runs):
  """The training program on real MNIST: it learns, and a rerun from the
  middle checkpoint writes the same final checkpoint, bit for bit."""
  if name not in cli_runs:
    pytest.skip("no Shakespeare archive: set MUPC_SHAKESPEARE_DIR")
  folder, first, steps, again = cli_runs[name]
  workdir = folder / "run"
  assert first.returncode == 0, first.stderr[-3000:]
  assert steps == [10, 20]
  final = load_checkpoint(folder / "first", 20)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resumed from step 10" in again.stderr
  resumed = load_checkpoint(workdir, 20)
  assert resumed.keys() == final.keys()
  for key in final:
    np.testing.assert_array_equal(resumed[key], final[key], err_msg=key)
  records = metrics.read(workdir / "metrics.jsonl")
  evals = [r for r in records if r["split"] == "eval"]
  if spec_of(name) is TEXT_SPEC:  # 2,048 test windows; μPC starts at the uniform guess, ln 84 nats
    assert evals[-1]["examples"] == 2048 and evals[-1]["loss"] < np.log(84) - 0.05, evals[-1]
  else:
    assert evals[-1]["examples"] == 10_000 and evals[-1]["accuracy"] > 0.15  # chance: 0.1
  assert max(evals[-1]["weight_change"]) > 0  # the diagnostics see every network's weights
