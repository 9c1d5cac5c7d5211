"""Seconds per PC training step, against the reference design and the matmul peak.

    python benchmarks/step_benchmark.py                       # CPU: 128x8 and 256x32
    python benchmarks/step_benchmark.py --configs=512x128     # e.g. on a GPU
    python benchmarks/step_benchmark.py --levers              # each speed lever on/off
    python benchmarks/step_benchmark.py --configs=conv16x6 --levers  # convolutional μPC

WIDTHxHIDDEN is the dense network; convCxR the convolutional one of
configs/mnist_conv.py on 28×28×1 images: a stride-2 stem, then 3 stages of
C, 2C and 4C channels (14×14, 7×7, 4×4) with R residual layers each;
vitDxK the transformer of configs/mnist_transformer.py (7×7 patches, width D,
K blocks, 4 heads), whose inference takes the general path (``jax.grad`` of
the energy; its FLOPs are not counted); lmDxK the causal transformer of
configs/shakespeare.py (windows of 64 of 84 characters, width D, K blocks,
4 heads, cross-entropy).

One step = feed-forward start + T = H inference steps + Adam update, μPC,
ReLU, batch 64 (MUPC.md's recipe); BP and ePC (the `epc` variant: one step
on the errors) are timed beside it. For every config, all variants are timed
round-robin in the same process (this machine is shared and noisy, so only
medians and ratios measured side by side mean anything): median seconds per
step over --repeats rounds after warm-up, compile time apart. FLOPs are
counted analytically (matrix products only) for the work each variant does;
the FLOP rate is compared with a large matrix product timed in the same run.
Bytes per step come from a model of what the inference loop moves through
memory (``inference_bytes``; dense networks only), the rate compared with a
large copy timed in the same run, and "of roofline" divides the roofline time
max(FLOPs / product peak, bytes / copy peak) by the measured time.
On a GPU the fused Pallas inference step (``--levers``) and the three product
precisions are timed too; on CPU Pallas runs only in interpret mode (a
correctness check, not a speed), so it is not timed there.
Imports only jax, flax, optax and mupc_flax's core, so it runs wherever JAX does.
"""

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import flax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mupc_flax as mf  # noqa: E402
import reference_pc  # noqa: E402
from mupc_flax.networks.layers import PRECISIONS  # noqa: E402

IN_FEATURES, CLASSES = 784, 10
LM_VOCABULARY, LM_CONTEXT = 84, 64  # configs/shakespeare.py: its characters, its window
# configs/default.py's `deep` variant at batch 64.
DEEP_RECIPE = dict(optimizer="momentum", momentum=0.9, lr=16.0, steps_per_layer=2)
# configs/default.py's `epc` variant at batch 64: one step on the errors.
EPC_RECIPE = dict(method="errors", schedule="plain", steps=1, lr=0.64)


@dataclasses.dataclass
class Variant:
  name: str
  step: object  # callable(state) -> state, blocks on the result
  state: object
  flops: float
  bytes: float = float("nan")
  precision: str = "float32"
  compile_seconds: float = float("nan")
  memory_bytes: float = float("nan")
  times: list = dataclasses.field(default_factory=list)


def matmul_peak(precision: str, n: int) -> float:
  """FLOP/s of one n×n×n matrix product at ``precision`` (median of 5)."""
  dtype, lax_precision = PRECISIONS[precision]
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=lax_precision, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(times)


def copy_bandwidth(megabytes: int) -> float:
  """Bytes/s of reading and writing one float32 array of ``megabytes`` (median of 5)."""
  x = jnp.ones((megabytes * 2**18,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - start)
  return 2 * x.nbytes / statistics.median(times)


def inference_bytes(model, batch: int, blocks, fused: bool) -> float:
  """Bytes the inference loop of a dense network moves per train step (a model).

  Per inference step each active layer's residual weights are read twice (the
  product into the layer above, the errors back through Wᵀ) in the products'
  dtype, and [B, N] float32 activity arrays are read or written: 9 per layer
  in the fused Pallas step (errors: δ_{k−1}, z⁰_{k−1}, δ_k, e_k; update:
  e_{k+1}, e_k, δ_k, z⁰_k, δ_k; re-reads of a row by a layer's column tiles
  assumed to hit L2), and about 16 in XLA's loop body (two batched products'
  operands and results, four elementwise fusions, the copy of the carry:
  ../shared/reference/GPU.md lists that body). The rest of the step (feed-
  forward, weight gradient, Adam) is a few passes over the weights and is left out.
  """
  if not isinstance(model, mf.ResidualPCN):
    return float("nan")
  n, weight_bytes = model.width, jnp.dtype(PRECISIONS[model.precision][0]).itemsize
  per_layer_step = 2 * n * n * weight_bytes + (9 if fused else 16) * batch * n * 4
  layer_steps = sum(steps * (model.hidden_layers - first) for first, steps in blocks)
  return layer_steps * per_layer_step


def step_flops(entry: float, branch: list[float], readout: float, blocks, algorithm: str = "pc") -> float:
  """Product FLOPs of one training step (elementwise work ignored), from the
  FLOPs of each hidden layer's product: ``entry`` for layer 0 (from x),
  ``branch[ℓ]`` for layer ℓ ≥ 1 (from the layer below), ``readout``."""
  above = lambda first: sum(branch[first:]) + readout  # products inside a block from layer ``first``
  forward = entry + above(1)
  if algorithm == "bp":  # forward, then gradients w.r.t. activations and weights
    return forward + 2 * above(1) + entry
  if algorithm == "epc":  # T × (perturbed forward, backward to the errors; the first forward is
    # the feed-forward start); final forward; weight gradients
    steps = sum(steps for _, steps in blocks)
    return (1 + steps) * forward + steps * above(1) + entry + above(1)
  inference = sum(steps * 2 * above(first + 1) + (branch[first] if first else 0)
                  for first, steps in blocks)
  final = above(1)  # errors at the final activities
  weight_grads = entry + above(1)
  return forward + readout + inference + final + weight_grads


def layer_flops(model, batch: int) -> tuple[float, list[float], float]:
  """(entry, branch per hidden layer, readout) product FLOPs of ``model``."""
  if isinstance(model, mf.TransformerPCN):
    return float("nan"), [float("nan")] * model.hidden_layers, float("nan")
  if isinstance(model, mf.ConvResidualPCN):
    shapes = [s.shape for s in jax.eval_shape(model.feedforward, jnp.zeros((batch, IN_FEATURES)))]
    costs = []
    for stage, shape in enumerate(shapes):
      _, _, h, w, c = shape
      c_in = model.image_shape[2] if stage == 0 else shapes[stage - 1][-1]
      k = model.entries[stage].kernel.shape[0]
      costs += [2 * batch * h * w * c_in * c * k * k] + [2 * batch * h * w * c * c * k * k] * (shape[0] - 1)
    return costs[0], costs, 2 * batch * shapes[-1][-1] * CLASSES
  n = model.width
  return (2 * batch * IN_FEATURES * n, [0.0] + [2 * batch * n * n] * (model.hidden_layers - 1),
          2 * batch * n * CLASSES)


def _batch(batch: int, model=None):
  """Images and labels, or for the language model windows of token ids and
  the one-hot next tokens."""
  rng = np.random.default_rng(0)
  if isinstance(model, mf.CausalTransformerPCN):
    x = rng.integers(0, model.vocab_size, (batch, model.context + 1))
    return (jnp.asarray(x[:, :-1], jnp.int32),
            jnp.asarray(np.eye(model.vocab_size, dtype=np.float32)[x[:, 1:]]))
  x = rng.standard_normal((batch, IN_FEATURES)).astype(np.float32)
  y = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, batch)]
  return jnp.asarray(x), jnp.asarray(y)


def build(config: str, **model_options):
  """The network of a config name: WIDTHxHIDDEN (dense), convCxR, vitDxK or lmDxK."""
  if config.startswith("lm"):
    width, blocks = map(int, config[2:].split("x"))
    return mf.CausalTransformerPCN(LM_VOCABULARY, LM_CONTEXT, width, blocks, rngs=nnx.Rngs(0),
                                   **model_options)
  if config.startswith("vit"):
    width, blocks = map(int, config[3:].split("x"))
    return mf.TransformerPCN((28, 28, 1), 7, width, blocks, CLASSES, rngs=nnx.Rngs(0),
                             **model_options)
  if config.startswith("conv"):
    channels, residual = map(int, config[4:].split("x"))
    return mf.ConvResidualPCN((28, 28, 1), (channels, 2 * channels, 4 * channels), residual,
                              CLASSES, stem_stride=2, rngs=nnx.Rngs(0), **model_options)
  width, hidden = map(int, config.split("x"))
  return mf.ResidualPCN(IN_FEATURES, width, hidden, CLASSES, rngs=nnx.Rngs(0), **model_options)


def ours(name, config, batch, mesh, *, algorithm="pc", engine=None, steps_per_layer=1,
         **options) -> Variant:
  """mupc_flax's train step; ``options`` go to the model (precision) and to
  Inference (T = ``steps_per_layer`` × H), ``engine`` to its ``mf.Engine``
  (the engine's speed choices)."""
  model_options = {k: options.pop(k) for k in ("precision",) if k in options}
  split = options.pop("split", None)
  model = build(config, **model_options)
  hidden = model.hidden_layers
  optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
  inference = mf.Inference(options.pop("steps", steps_per_layer * hidden), options.pop("lr", 0.5),
                           engine=mf.Engine(**(engine or {})), **options) \
      if algorithm == "pc" else None
  language = isinstance(model, mf.CausalTransformerPCN)
  step = mf.make_train_step(model, optimizer, mesh, algorithm=algorithm, inference=inference,
                            split=split, loss="ce" if language else "mse")
  x, y = _batch(batch, model)
  state = (nnx.state(model), nnx.state(optimizer))
  start = time.perf_counter()
  compiled = [lowered.compile() for lowered in step.lower(*state, x, y)]
  compile_seconds = time.perf_counter() - start
  # Peak scratch memory of the compiled parts (the larger one: they run in turn).
  memory = max(getattr(c.memory_analysis(), "temp_size_in_bytes", float("nan")) for c in compiled)

  def run(state):
    model_state, opt_state, metrics = step(*state, x, y)
    jax.block_until_ready(metrics)
    return model_state, opt_state

  # An older mupc_flax (timed by compare_commits.py --script=new) calls it ``blocks``.
  phases_for = getattr(inference, "phases_for", None) or getattr(inference, "blocks", None)
  blocks = phases_for(hidden) if inference else ()
  moved = (inference_bytes(model, batch, blocks, inference.engine.kernel == "pallas")
           if inference else float("nan"))
  counted = "epc" if inference and inference.method == "errors" else algorithm
  return Variant(name, run, state, step_flops(*layer_flops(model, batch), blocks, counted),
                 moved, model.precision, compile_seconds, memory)


def reference(name, width, hidden, batch, host_loop: bool) -> Variant:
  weights, scales = reference_pc.init(jax.random.PRNGKey(0), IN_FEATURES, width, hidden, CLASSES)
  host_step, jitted_step, tx = reference_pc.make_steps(scales, hidden, 0.5, 0.1)
  x, y = _batch(batch)
  state = (weights, tx.init(weights))
  step = host_step if host_loop else jitted_step
  start = time.perf_counter()
  jax.block_until_ready(step(*state, x, y))
  compile_seconds = time.perf_counter() - start  # includes one run

  def run(state):
    return jax.block_until_ready(step(*state, x, y))

  costs = layer_flops(build(f"{width}x{hidden}"), batch)
  return Variant(name, run, state, step_flops(*costs, ((0, hidden),)),
                 compile_seconds=compile_seconds)


def measure(variants: list[Variant], repeats: int, warmup: int = 2) -> None:
  for v in variants:
    for _ in range(warmup):
      v.state = v.step(v.state)
  for _ in range(repeats):  # round-robin: every variant sees the same machine load
    for v in variants:
      start = time.perf_counter()
      v.state = v.step(v.state)
      v.times.append(time.perf_counter() - start)


def peak_memory() -> str:
  stats = jax.local_devices()[0].memory_stats() or {}
  return f"{stats['peak_bytes_in_use'] / 2**20:.0f} MiB" if "peak_bytes_in_use" in stats else "n/a"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="128x8,256x32",
                      help="WIDTHxHIDDEN (dense) or convCxR, comma-separated")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--levers", action="store_true", help="also time each lever on and off")
  parser.add_argument("--no-reference", action="store_true", help="skip the reference designs")
  parser.add_argument("--json", help="write the results to this file")
  args = parser.parse_args()

  device = jax.local_devices()[0]
  mesh = mf.make_mesh(jax.local_devices()[:1])
  peak_size = 4096 if device.platform == "gpu" else 2048
  peaks = {name: matmul_peak(name, peak_size) for name in PRECISIONS}
  bandwidth = copy_bandwidth(1024 if device.platform == "gpu" else 256)
  header = (f"{datetime.date.today()} | {device.device_kind} ({device.platform}), "
            f"{os.cpu_count()} CPUs | jax {jax.__version__}, flax {flax.__version__}, "
            f"python {platform.python_version()}")
  print(header)
  print(f"matmul peak ({peak_size}³): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
        + f"; copy {bandwidth / 1e9:.1f} GB/s")

  rows = []
  for config in args.configs.split(","):
    config, b = config.lower(), args.batch
    conv, dense = config.startswith("conv"), not config.startswith(("conv", "vit", "lm"))
    variants = [ours("mupc_flax", config, b, mesh)]
    if not args.no_reference and dense:  # the reference design is dense only
      width, hidden = map(int, config.split("x"))
      variants += [reference("reference, fully jitted", width, hidden, b, host_loop=False),
                   reference("reference, host loop", width, hidden, b, host_loop=True)]
    variants.append(ours("mupc_flax BP", config, b, mesh, algorithm="bp"))
    variants.append(ours("mupc_flax ePC (configs: epc)", config, b, mesh, **EPC_RECIPE))
    if args.levers:  # the inference optimisers at the paper's T, and the deep recipe (configs: deep)
      variants += [
          ours("inference: heavy-ball momentum", config, b, mesh, optimizer="momentum", momentum=0.9),
          ours("inference: Nesterov", config, b, mesh, optimizer="nesterov", momentum=0.9),
          ours("inference: the deep recipe", config, b, mesh, **DEEP_RECIPE),
      ]
    if args.levers and conv:
      variants += [
          ours("lever: inference loops not unrolled", config, b, mesh,
               engine=dict(unroll=False)),
          ours("lever: stacked weight gradient", config, b, mesh,
               engine=dict(gradient_layout="stacked")),
          ours("lever: stacked products", config, b, mesh, engine=dict(layout="stacked")),
      ]
    elif args.levers and dense:
      hidden = build(config).hidden_layers
      variants += [
          ours("lever: plain schedule", config, b, mesh, schedule="plain"),
          ours("lever: wavefront, 4 phases", config, b, mesh, phases=4),
          ours(f"lever: wavefront, {hidden} phases", config, b, mesh, phases=hidden),
          ours("lever: stacked products", config, b, mesh, engine=dict(layout="stacked")),
          ours("lever: per-layer products", config, b, mesh, engine=dict(layout="per_layer")),
          ours("precision: tf32", config, b, mesh, precision="tf32"),
          ours("precision: bfloat16", config, b, mesh, precision="bfloat16"),
          ours("lever: inference loops unrolled", config, b, mesh,
               engine=dict(unroll=True)),
          ours("lever: one compiled function", config, b, mesh, split=False),
          ours("lever: two compiled functions", config, b, mesh, split=True),
      ]
      if device.platform == "gpu":  # elsewhere Pallas only interprets (see the docstring)
        variants += [ours(f"fused Pallas step, {p}", config, b, mesh, engine=dict(kernel="pallas"),
                          precision=p) for p in PRECISIONS]
    measure(variants, args.repeats)
    best_reference = min((statistics.median(v.times) for v in variants if v.name.startswith("reference")),
                         default=float("nan"))
    for v in variants:
      seconds = statistics.median(v.times)
      rows.append({
          "config": config, "variant": v.name, "seconds": seconds,
          "examples_per_second": b / seconds, "compile_seconds": v.compile_seconds,
          "gflop": v.flops / 1e9, "gflop_per_second": v.flops / seconds / 1e9,
          "fraction_of_peak": v.flops / seconds / peaks[v.precision],
          "gb": v.bytes / 1e9, "gb_per_second": v.bytes / seconds / 1e9,
          "fraction_of_copy_rate": v.bytes / seconds / bandwidth,
          "fraction_of_roofline": max(v.flops / peaks[v.precision], v.bytes / bandwidth) / seconds,
          "speedup_vs_best_reference": best_reference / seconds,
          "temp_mib": v.memory_bytes / 2**20,
      })
    print(f"  {config}: done ({len(variants)} variants × {args.repeats} rounds)", flush=True)

  print()
  print(header)
  print("| config | variant | ms/step (median) | examples/s | compile s | GFLOP/step | GFLOP/s | "
        "of product peak | GB/step (model) | GB/s | of copy rate | of roofline | vs best reference | temp MiB |")
  print("|---" * 14 + "|")
  for r in rows:
    print(f"| {r['config']} | {r['variant']} | {r['seconds'] * 1e3:.2f} | {r['examples_per_second']:.0f} | "
          f"{r['compile_seconds']:.1f} | {r['gflop']:.2f} | {r['gflop_per_second']:.1f} | "
          f"{r['fraction_of_peak']:.0%} | {r['gb']:.3f} | {r['gb_per_second']:.1f} | "
          f"{r['fraction_of_copy_rate']:.0%} | {r['fraction_of_roofline']:.0%} | "
          f"{r['speedup_vs_best_reference']:.2f}× | {r['temp_mib']:.1f} |")
  print(f"device peak memory: {peak_memory()}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "peaks": peaks, "copy_bytes_per_second": bandwidth, "rows": rows},
                f, indent=2)


if __name__ == "__main__":
  main()
