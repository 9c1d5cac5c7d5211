"""The fused Pallas inference step (interpret mode on CPU) against the XLA path.

The XLA path itself is checked against ``jax.grad`` of a plain reference
energy in test_pc.py; here the kernel must reproduce it: activities after
inference, weight gradients, and exact zeros below the wavefront.
"""

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mupc_flax as mf
import oracles
from mupc_flax.pc import pallas_step

# Width 96 tiles into three 32-column tiles, each product summed over three
# 32-row chunks: the kernels' tiling is exercised, not one whole block.
D, N, H, C, B = 12, 96, 6, 5, 8


# The XLA path in the layout the kernel takes, and the kernel.
ENGINES = {"xla": mf.Engine(layout="stacked"), "pallas": mf.Engine(kernel="pallas")}


def make_model(activation):
  return mf.ResidualPCN(D, N, H, C, activation=activation, rngs=nnx.Rngs(3))


def test_tile_is_the_largest_power_of_two_dividing_the_width():
  assert [pallas_step.tile(n) for n in (96, 512, 12, 7, 128)] == [32, 64, 4, 1, 64]


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
    if schedule == "wavefront":  # zeros below the front by construction; under the plain
      np.testing.assert_array_equal(b == 0, a == 0)  # schedule a zero there is rounding's
  np.testing.assert_allclose(metrics_pallas["layer_energies"], metrics_xla["layer_energies"],
                             rtol=1e-5, atol=1e-10)
  # After T = 3 steps from the feed-forward start only layers 3…5 (of 0…5) have
  # errors: the kernels into layers 1 and 2 get zero, exactly under the wavefront. Under
  # the plain schedule the kernel recomputes those layers' predictions in its own tiling,
  # so their errors are the rounding difference from the start's (exact zeros only where
  # the compiler happens to round both alike, as XLA's optimised CPU build does).
  per_kernel = np.abs(np.asarray(grads_pallas["hidden"]["kernel"][...])).sum(axis=(1, 2))
  below = 0.0 if schedule == "wavefront" else 1e-4 * per_kernel[2:].min()
  assert (per_kernel[:2] <= below).all() and (per_kernel[2:] > 0).all(), per_kernel

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


# Lowering the public train step for CUDA on this CPU: (precision, width, per-device
# batch) spanning what the library accepts; 96 and 12 are not powers of two (padded
# for Triton to 128 and 16), 8 is below Triton's 16 product rows (padded to 16).
CUDA_SHAPES = [("float32", 128, 8), ("bfloat16", 1024, 256), ("tf32", 512, 64),
               ("bfloat16", 256, 12), ("float32", 96, 32)]


def lower_train_step(platform, precision, width, per_device_batch, hidden=3):
  """The text of the public PC train step (8 devices) lowered for ``platform``."""
  model = mf.ResidualPCN(D, width, hidden, C, precision=precision, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(0.01), wrt=nnx.Param)
  mesh = mf.make_mesh()
  step = mf.make_train_step(model, optimizer, mesh,
                            inference=mf.Inference(hidden, 1.0, engine=ENGINES["pallas"]))
  batch = per_device_batch * len(mesh.devices.flat)
  x, y = jnp.zeros((batch, D)), jnp.zeros((batch, C))
  traced = jax.jit(step).trace(nnx.state(model), nnx.state(optimizer), x, y)
  return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("precision,width,per_device_batch", CUDA_SHAPES)
def test_train_step_lowers_for_cuda_through_triton(precision, width, per_device_batch):
  text = lower_train_step("cuda", precision, width, per_device_batch)
  # H = 3 under the wavefront: blocks from layers 0 and 1 are fused (two
  # kernels each), the one from layer 2 (a single layer) is XLA's.
  assert text.count("custom_call @__gpu$xla.gpu.triton(") == 4
  for name in ("pc_errors", "pc_update"):
    assert text.count(f'name = "{name}"') == 2
  assert "mosaic_gpu" not in text
  rows, padded_width = max(16, 1 << (per_device_batch - 1).bit_length()), 1 << (width - 1).bit_length()
  dtype = "bf16" if precision == "bfloat16" else "f32"
  assert f"tensor<2x{padded_width}x{padded_width}x{dtype}>" in text  # the weights Triton gets
  assert f"x{rows}x{padded_width}xf32>" in text  # δ as Triton sees it (padded rows/units)


def test_train_step_interprets_the_kernels_when_lowered_for_cpu():
  text = lower_train_step("cpu", "float32", 128, 8)
  assert "__gpu$xla.gpu.triton" not in text and "custom_call" not in text.replace(
      "@Sharding", "").replace("@SPMDFullToShardShape", "").replace("@SPMDShardToFullShape", "")


def test_padding_for_triton_is_exact():
  """What Triton would run on a 12 × 96 layer (padded to 16 × 128, Triton's
  tiling), in interpret mode, against the unpadded kernels, from given errors."""
  rng = np.random.default_rng(8)
  layers, batch, width, classes = 4, 12, 96, 5
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  z0, start_errors, shift = normal(layers, batch, width), 0.1 * normal(layers, batch, width), \
      0.1 * normal(batch, width)
  weights = (normal(layers - 1, width, width) / np.sqrt(width), jnp.full((layers - 1,), 0.5))
  readout_kernel, y = normal(width, classes) / np.sqrt(width), normal(batch, classes)
  steps = {}
  for padded in (False, True):
    step = pallas_step.fused_step_of(jnp.tanh, lambda h: h @ readout_kernel, "float32", z0,
                                 start_errors, shift, weights, y, lambda out, y: y - out, 2.0,
                                 batch, interpret=True, padded_as_triton=padded)
    d = jnp.zeros_like(z0)
    for _ in range(3):
      d = jax.jit(step)(d)
    steps[padded] = d
  assert steps[True].shape == (layers, batch, width)
  np.testing.assert_allclose(steps[True], steps[False], rtol=1e-5, atol=1e-6)
  assert np.abs(steps[False]).max() > 1e-2  # the steps moved δ


def test_triton_plan_refuses_what_triton_cannot_take():
  assert pallas_step.tiling_for(64, 512) == pallas_step.Tiling(rows=64, columns=64, depth=32)
  assert pallas_step.tiling_for(256, 1024, jnp.bfloat16).depth == 64
  with pytest.raises(ValueError, match="width 96 must be padded"):
    pallas_step.tiling_for(64, 96)
  with pytest.raises(ValueError, match="batch 12 must be padded"):
    pallas_step.tiling_for(12, 128)
  with pytest.raises(ValueError, match="at least 16 rows"):
    pallas_step.tiling_for(8, 128)
  assert pallas_step.tiling_for(12, 96, for_triton=False) == pallas_step.Tiling(rows=4, columns=32, depth=32)



ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fused_kernels_compile_to_ptx_without_spills(tmp_path):
  """benchmarks/ptx_check.py: the train step's two Triton kernels, compiled for
  sm_90 at 256 × 32 and 512 × 128 (B = 64), fit an H100 block's shared memory
  and do not spill. Needs the CUDA wheels (in this environment, or at
  $MUPC_PTX_SITE, where .ci/run puts them)."""
  site = os.environ.get("MUPC_PTX_SITE", "")
  try:
    importlib.metadata.version("jax-cuda12-plugin")
  except importlib.metadata.PackageNotFoundError:
    if not os.path.isdir(os.path.join(site, "jax_plugins")):
      pytest.skip("the CUDA wheels (jax-cuda12-plugin, jax-cuda12-pjrt, nvidia-cuda-nvcc-cu12) "
                  "are not installed and $MUPC_PTX_SITE names none: see benchmarks/ptx_check.py")
  out = tmp_path / "ptx.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(p for p in (site, ROOT, os.environ.get("PYTHONPATH")) if p))
  done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "ptx_check.py"),
                         "--configs=256x32,512x128", "--batch=64", "--precisions=float32,bfloat16",
                         f"--json={out}"], env=env, capture_output=True, text=True, timeout=600)
  if done.returncode == 2:  # the check says why it cannot run here
    pytest.skip(done.stderr.strip().splitlines()[-1])
  assert done.returncode == 0, done.stdout + done.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert {(r["config"], r["precision"], r["kernel"]) for r in rows} == {
      (c, p, k) for c in ("256x32", "512x128") for p in ("float32", "bfloat16")
      for k in ("pc_errors", "pc_update")}
  for r in rows:
    assert r["ptxas_ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert 0 < r["registers"] <= 255 and 0 < r["smem_bytes"] <= 227 * 1024, r
