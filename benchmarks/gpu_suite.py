"""The GPU measurement in one command: the fused Pallas step checked, then every step timed.

    python benchmarks/gpu_suite.py --out=$OUT                 # on a GPU: ≤ 8 min on an H100
    python benchmarks/gpu_suite.py --dry_run --out=/tmp/dry   # tiny shapes on the CPU (CI)
    python benchmarks/gpu_suite.py --plan_only --budget_s=300 # what a budget keeps; runs nothing

On whatever device it finds (one device: a 1-device mesh), in this order:

1. Checks the fused Pallas train step against the XLA one: one train step
   each, from the same weights and batch, at 512 × 16 and 512 × 128 in
   float32 and bfloat16. The weight gradients are compared through Adam's
   first moment after that step ((1 − β₁) × ∂L/∂W for every parameter, not
   rounded into the weights), and the energies and loss of the metrics: the
   relative error ‖pallas − xla‖ / ‖xla‖ of each must be within
   ``TOLERANCES``. A mismatch stops the suite with one ``error: …`` line
   (exit status 1), after writing what was checked.
2. Times, round-robin in one process (``--rounds`` rounds of ``--steps``
   steps per case, medians of the per-step times; compilation and one
   warm-up step apart, ``jax.block_until_ready`` at the end of each round):
   the train step at 512 × 128, B = 64, T = 128 through XLA in float32, tf32
   and bfloat16 and through the fused Pallas step in float32 and bfloat16;
   the ``:deep`` and ``:epc`` steps at 128 × 64; the convolutional network of
   configs/mnist_conv.py (18 residual layers); the transformer of
   configs/mnist_transformer.py at 8 blocks; and BP's step on each network
   (on the dense network in each precision).
3. Reports per case ms/step, the ratio to BP's step on the same network (and
   precision), the fraction of the roofline where docs/benchmarks.md has a
   memory-traffic model (``step_benchmark.inference_bytes``: dense networks,
   state inference by gradient descent; the time that model's bytes take at
   the copy rate measured in the same run, over the measured time), XLA's
   memory analysis of the compiled step and the device's peak memory; and
   writes ``suite.json`` and ``suite.md`` (a table for docs/benchmarks.md)
   into ``--out``.

``--budget_s`` (default 480 s) holds the whole run: each case has an
estimate (compile + warm-up + rounds; ``ESTIMATES``, guesses until a GPU run
measures them: ``--estimates=<an earlier suite.json>`` takes that run's
figures), the checks always run, and the slowest timed cases are dropped
first until the estimate fits; at run time a case whose estimate no longer
fits is dropped too, and the rounds stop early (after ``MIN_ROUNDS``) once
the budget is spent. What was dropped is printed and written.

``--dry_run`` runs the same code on tiny shapes (``DRY``) with two rounds of
one step, and lowers every case for CUDA as well (``jax.jit(step).trace(…)
.lower(lowering_platforms=("cuda",))``, no GPU needed): the Pallas cases must
hold the Triton calls, the float32 cases HIGHEST products and the tf32 and
bfloat16 ones none. On a CPU the Pallas kernels run in interpret mode (slow,
exact), so their times there are no speed.

Imports jax, flax, optax and mupc_flax (whose network kinds import
ml_collections: on the GPU image install the wheels of
../shared/tools/gpu-wheels.sh first); no data pipeline: synthetic batches.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

try:
  import mupc_flax as mf
  from mupc_flax.networks import kinds
except ImportError as missing:  # the GPU image lacks ml_collections (mupc_flax.networks.kinds)
  sys.exit(f"error: cannot import mupc_flax ({missing}); on the GPU image install the wheels of "
           "../shared/tools/gpu-wheels.sh first (docs/benchmarks.md, \"On a GPU\").")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_benchmark  # noqa: E402  (the memory-traffic model and the copy rate)

IMAGE_SHAPE, CLASSES = (28, 28, 1), 10
# The paper's recipe: T = H steps of β = 0.5 (MUPC.md).
PAPER_STEP = 0.5
# configs/default.py's `deep` variant: heavy-ball momentum 0.9, T = 2H, β = B/4
# (a per-sample step of 1/4), the step guard's 5 power iterations.
DEEP_MOMENTUM, DEEP_STEPS_PER_LAYER, DEEP_STEP_PER_SAMPLE, DEEP_GUARD = 0.9, 2, 0.25, 5
# configs/default.py's `epc` variant: T = 1 step on the errors, β = B/100.
EPC_STEPS, EPC_STEP_PER_SAMPLE = 1, 0.01
# Adam's η for every case: small, so that repeated steps on one batch stay
# finite (a step's time does not depend on it); β₁ = 0.9, so after the first
# step the first moment is 0.1 × the weight gradient.
LEARNING_RATE = 1e-3
# Relative error allowed between the Pallas and XLA steps' gradients and
# energies, per dtype of the products. float32: both sum the same products
# in another order; bfloat16: both round the operands alike, but δ's rounding
# differs and feeds back through T steps. Not yet measured on a GPU: the
# JSON records the errors found, to tighten these.
TOLERANCES = {"float32": 1e-4, "bfloat16": 3e-2}
MIN_ROUNDS = 3
DEFAULT_BUDGET_S = 480.0

# Per network, (kind, fields) of mupc_flax.networks.kinds, at full size and in the dry run.
FULL = {
    "dense": ("dense", dict(width=512, hidden_layers=128)),
    "dense_check": ("dense", dict(width=512, hidden_layers=16)),
    "narrow": ("dense", dict(width=128, hidden_layers=64)),
    # configs/mnist_conv.py: 3 stages of 16/32/64 channels, 6 residual layers each.
    "conv": ("conv", dict(width=16, stages=3, residual_layers=6, stem_stride=2)),
    # configs/mnist_transformer.py at blocks=8.
    "vit": ("transformer", dict(width=64, blocks=8, patch_size=7, heads=4, mlp_ratio=4,
                                activation="gelu")),
}
# The dry run checks at one size (the same code as at two), and its narrow
# network is its dense one: BP's step there compiles to the same program.
DRY = {
    "dense": ("dense", dict(width=16, hidden_layers=4)),
    "narrow": ("dense", dict(width=16, hidden_layers=4)),
    "conv": ("conv", dict(width=4, stages=3, residual_layers=1, stem_stride=2)),
    "vit": ("transformer", dict(width=16, blocks=1, patch_size=7, heads=4, mlp_ratio=4,
                                activation="gelu")),
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One train step to build: ``key`` names it in the JSON whatever the shapes."""

  key: str
  network: str  # a key of FULL / DRY
  label: str  # the table's "step" column
  algorithm: str = "pc"  # "pc" | "bp"
  precision: str = "float32"
  kernel: str = "xla"  # "xla" | "pallas"
  recipe: str = "paper"  # "paper" | "deep" | "epc" (inference; PC only)
  baseline: str | None = None  # key of BP's case on the same network (and precision)
  timed: bool = True  # False: built for the check only


def _dense(precision: str, kernel: str, timed: bool = True, network: str = "dense") -> Case:
  return Case(f"{network}/{kernel}/{precision}", network,
              f"{dict(xla='XLA', pallas='Pallas')[kernel]} {precision}",
              precision=precision, kernel=kernel,
              baseline=f"{network}/bp/{precision}" if timed else None, timed=timed)


CASES = (
    [_dense(p, k, timed=False, network="dense_check") for p in TOLERANCES for k in ("xla", "pallas")]
    + [_dense(p, "xla") for p in ("float32", "tf32", "bfloat16")]
    + [_dense(p, "pallas") for p in ("float32", "bfloat16")]
    + [Case(f"dense/bp/{p}", "dense", f"BP {p}", algorithm="bp", precision=p)
       for p in ("float32", "tf32", "bfloat16")]
    + [Case("narrow/deep", "narrow", ":deep (momentum 0.9, T = 2H, β = B/4, guard 5)",
            recipe="deep", baseline="narrow/bp"),
       Case("narrow/epc", "narrow", ":epc (errors, T = 1, β = B/100)", recipe="epc",
            baseline="narrow/bp"),
       Case("narrow/bp", "narrow", "BP", algorithm="bp"),
       Case("conv/pc", "conv", "μPC, T = H", baseline="conv/bp"),
       Case("conv/bp", "conv", "BP", algorithm="bp"),
       Case("vit/pc", "vit", "μPC, T = H", baseline="vit/bp"),
       Case("vit/bp", "vit", "BP", algorithm="bp")])
CASE = {case.key: case for case in CASES}
# Pallas against XLA: (network, precision); each pair is that network's two cases.
CHECKS = [(network, precision) for network in ("dense_check", "dense") for precision in TOLERANCES]


def checks_for(shapes: dict) -> list[tuple[str, str]]:
  return [(network, precision) for network, precision in CHECKS if network in shapes]


def checked(shapes: dict) -> set[str]:
  """The keys of the cases the checks build (and so always run)."""
  return {f"{network}/{kernel}/{precision}" for network, precision in checks_for(shapes)
          for kernel in ("xla", "pallas")}


# (compile + first step s, ms per step) per case on an H100: guesses from
# ../shared/reference/GPU.md (19.7 / 14.7 / 27.6 ms at 512 × 128, BP 4.9) and
# the model in docs/benchmarks.md, until a GPU run measures them.
ESTIMATES = {
    "dense_check/xla/float32": (12, 4), "dense_check/pallas/float32": (15, 3),
    "dense_check/xla/bfloat16": (12, 3), "dense_check/pallas/bfloat16": (15, 2),
    "dense/xla/float32": (40, 28), "dense/xla/tf32": (40, 20), "dense/xla/bfloat16": (40, 15),
    "dense/pallas/float32": (50, 15), "dense/pallas/bfloat16": (50, 10),
    "dense/bp/float32": (10, 7), "dense/bp/tf32": (10, 5), "dense/bp/bfloat16": (10, 4),
    "narrow/deep": (60, 40), "narrow/epc": (20, 3), "narrow/bp": (8, 1),
    "conv/pc": (40, 30), "conv/bp": (10, 3), "vit/pc": (40, 30), "vit/bp": (10, 3),
}
# The same on the CPU in the dry run (measured here, 2 cores).
DRY_ESTIMATES = {key: (1.5, 5) for key in ESTIMATES} | {
    key: (3.0, 50) for key in CASE if "/pallas/" in key}


@dataclasses.dataclass
class Built:
  """A case's compiled step and its state (donated and replaced at each step)."""

  case: Case
  run: Callable  # state -> (model_state, opt_state, metrics), not waited for
  state: tuple
  model: nnx.Module
  inference: object
  compile_s: float
  memory_bytes: float
  first: tuple  # the first step's (opt_state, metrics), on the host
  cuda_lowering: str | None  # dry run: cuda_lowering's verdict
  peak_after: int | None = None  # the device's peak bytes once this case had run
  times: list = dataclasses.field(default_factory=list)


def network(name: str, shapes: dict, precision: str):
  kind, fields = shapes[name]
  spec = argparse.Namespace(input_size=math.prod(IMAGE_SHAPE), image_shape=IMAGE_SHAPE,
                            num_classes=CLASSES)
  return kinds.get(kind).make(spec, rngs=nnx.Rngs(0), **fields, precision=precision)


def inference_for(case: Case, hidden: int, batch: int):
  """pc.Inference of a PC case's recipe at H = ``hidden`` and batch ``batch``; None for BP."""
  if case.algorithm == "bp":
    return None
  if case.recipe == "deep":
    return mf.Inference(DEEP_STEPS_PER_LAYER * hidden, DEEP_STEP_PER_SAMPLE * batch,
                        optimizer="momentum", momentum=DEEP_MOMENTUM, step_guard=DEEP_GUARD)
  if case.recipe == "epc":
    return mf.Inference(EPC_STEPS, EPC_STEP_PER_SAMPLE * batch, method="errors")
  return mf.Inference(hidden, PAPER_STEP, engine=mf.Engine(kernel=case.kernel))


def describe(name: str, shapes: dict, batch: int) -> str:
  """The table's network column, e.g. "dense 512 × 128" (its B and T go in the header)."""
  kind, f = shapes[name]
  if kind == "dense":
    return f"dense {f['width']} × {f['hidden_layers']}"
  if kind == "conv":
    return f"conv {f['width']} ch, {f['stages'] * f['residual_layers']} residual"
  return f"ViT d = {f['width']}, {f['blocks']} blocks"


def synthetic_batch(batch: int, mesh):
  """x [B, 784] standard normal, y [B, 10] one-hot, split over the mesh's data axis."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, math.prod(IMAGE_SHAPE))).astype(np.float32)
  y = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, batch)]
  return jax.device_put((x, y), NamedSharding(mesh, P("data")))


def make_step(case: Case, shapes: dict, batch: int, mesh):
  """(step, state, model, inference) of a case; the state replicated on the mesh as
  the step returns it (uncommitted arrays would compile the step a second time)."""
  model = network(case.network, shapes, case.precision)
  optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
  inference = inference_for(case, model.hidden_layers, batch)
  step = mf.make_train_step(model, optimizer, mesh, algorithm=case.algorithm, inference=inference)
  state = jax.device_put((nnx.state(model), nnx.state(optimizer)), NamedSharding(mesh, P()))
  return step, state, model, inference


def compiled_bytes(step, state, x, y) -> float:
  """Device bytes of the step by XLA's memory analysis: arguments + outputs −
  aliased + temporaries, of the larger compiled part (they run in turn). Reuses
  the executables the first calls compiled."""
  sizes = []
  for lowered in step.lower(*state, x, y):
    m = lowered.compile().memory_analysis()
    if m is None:
      return float("nan")
    sizes.append(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)
  return float(max(sizes))


def lowers_for_cuda(case: Case) -> bool:
  """Whether the dry run lowers a case for CUDA: the dense PC steps, whose GPU
  paths (the Triton kernels, the products' precision) the CPU does not run."""
  return case.network.startswith("dense") and case.algorithm == "pc"


def cuda_lowering(step, state, x, y, case: Case) -> str:
  """"ok", or what is wrong with the step lowered for CUDA (on any machine)."""
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (*state, x, y))
  text = jax.jit(step).trace(*abstract).lower(lowering_platforms=("cuda",)).as_text()
  triton = text.count("__gpu$xla.gpu.triton")
  if (case.kernel == "pallas") != (triton > 0) or "mosaic_gpu" in text:
    return f"{triton} Triton calls for the {case.kernel} kernel"
  if (case.precision == "float32") != ("HIGHEST" in text):
    return f"HIGHEST products {'missing' if case.precision == 'float32' else 'present'}"
  return "ok"


def build(case: Case, shapes: dict, batch: int, mesh, x, y, log, lower_for_cuda: bool) -> Built:
  """Compiles a case and takes its first step (kept for the check), then a second,
  the warm-up; compile_s is the first call's wall time."""
  log(f"{case.key}: compiling ({describe(case.network, shapes, batch)}, {case.label})")
  step, state, model, inference = make_step(case, shapes, batch, mesh)
  cuda = cuda_lowering(step, state, x, y, case) if lower_for_cuda and lowers_for_cuda(case) \
      else None
  start = time.perf_counter()
  model_state, opt_state, metrics = jax.block_until_ready(step(*state, x, y))
  compile_s = time.perf_counter() - start
  first = jax.device_get((opt_state, metrics))
  state = jax.block_until_ready(step(model_state, opt_state, x, y))[:2]
  return Built(case, lambda s: step(*s, x, y), state, model, inference, compile_s,
               compiled_bytes(step, state, x, y), first, cuda)


def first_moments(opt_state) -> dict:
  """Adam's first moment per parameter path: (1 − β₁) × the first step's gradient."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if "mu" in names:
      found["/".join(n for n in names[names.index("mu") + 1:] if n != "value")] = leaf
  return found


def compared(first: tuple) -> dict:
  """The quantities the check compares: "grad:<param>" and "metric:<name>", float64."""
  opt_state, metrics = first
  quantities = {f"grad:{k}": v for k, v in first_moments(opt_state).items()}
  quantities |= {f"metric:{k}": metrics[k] for k in ("loss", "energy", "layer_energies")}
  return {k: np.asarray(v, np.float64) for k, v in quantities.items()}


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
  """‖candidate − reference‖ / ‖reference‖ (the absolute norm if the reference is 0;
  inf if either is not finite)."""
  if not (np.isfinite(reference).all() and np.isfinite(candidate).all()):
    return float("inf")
  scale = float(np.linalg.norm(reference))
  return float(np.linalg.norm(candidate - reference)) / (scale if scale > 0 else 1.0)


def check(xla: Built, pallas: Built, precision: str, perturb=None) -> dict:
  """The Pallas step's first-step gradients and energies against XLA's; ``perturb``
  (tests) alters the Pallas quantities first."""
  reference, candidate = compared(xla.first), compared(pallas.first)
  if perturb is not None:
    candidate = perturb(candidate)
  errors = {k: relative_error(reference[k], candidate[k]) for k in reference}
  worst = max(errors, key=errors.get)
  return {"network": xla.case.network, "precision": precision, "tolerance": TOLERANCES[precision],
          "worst": worst, "worst_error": errors[worst], "errors": errors,
          "passed": errors[worst] <= TOLERANCES[precision]}


def cost(key: str, estimates: dict, rounds: int, steps: int) -> float:
  """Estimated seconds of a case: compile and first step, warm-up, rounds."""
  compile_s, ms = estimates[key]
  return compile_s + (1 + rounds * steps) * ms / 1e3


def plan(shapes: dict, estimates: dict, budget_s: float, rounds: int, steps: int):
  """(kept, dropped, total_s): the keys of the timed PC cases kept within
  ``budget_s``, of those dropped with their estimated seconds, and the estimate
  of the whole. The checks' cases always run (their timing then costs only the
  rounds); BP's baselines count while a kept case needs them; the slowest case
  is dropped first."""
  gate = checked(shapes)

  def case_cost(key):
    return cost(key, estimates, rounds, steps) - (estimates[key][0] if key in gate else 0)

  fixed = sum(cost(key, estimates, 0, 0) for key in gate)
  kept = [c.key for c in CASES if c.network in shapes and c.timed and c.algorithm == "pc"]
  dropped = []
  while True:
    baselines = {CASE[key].baseline for key in kept}
    total = fixed + sum(map(case_cost, kept)) + sum(map(case_cost, baselines))
    if total <= budget_s or not kept:
      return kept, dropped, total
    slowest = max(kept, key=case_cost)
    kept.remove(slowest)
    dropped.append((slowest, case_cost(slowest)))


def load_estimates(path: str) -> dict:
  """Measured (compile s, ms per step) per case from an earlier suite.json."""
  with open(path) as f:
    cases = json.load(f)["cases"]
  return {key: (c["compile_s"], c["ms"]) for key, c in cases.items()
          if c.get("compile_s") is not None and c.get("ms") is not None}


def commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)),
                          timeout=10).stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def device_peak_bytes(device) -> int | None:
  """The device's peak bytes in use so far in this process (None where not reported, e.g. CPU)."""
  return (device.memory_stats() or {}).get("peak_bytes_in_use")


def mib(value) -> str:
  return "n/a" if value is None or not math.isfinite(value) else f"{value / 2**20:,.1f}"


def markdown(report: dict) -> str:
  """The section for docs/benchmarks.md: a header line, the table, the check and notes."""
  report = plain(report)
  cases, h = report["cases"], report["header"]
  lines = [f"## On a GPU: {h['date'][:10]}, {h['device']}, jax {h['jax']}, flax {h['flax']}, "
           f"commit {h['commit']}{' (dry run)' if h['dry_run'] else ''}", "",
           f"`python benchmarks/gpu_suite.py` ({h['rounds']} rounds × {h['steps']} steps "
           f"round-robin, medians; batch {h['batch']}, T = H unless said; ratio to BP on the "
           "same network and precision; roofline: the memory-traffic model's bytes at the "
           f"copy rate measured in the same run, {h['copy_gb_per_s']:.0f} GB/s):", "",
           "| network | step | ms / step | × BP | of roofline | XLA MiB | compile s |",
           "|---|---|---|---|---|---|---|"]
  for key, c in cases.items():
    if c.get("ms") is None:
      continue
    ratio = "—" if c["ratio_to_bp"] is None else f"{c['ratio_to_bp']:.2f}"
    roof = "n/a" if c["roofline_fraction"] is None else f"{c['roofline_fraction']:.0%}"
    lines.append(f"| {c['network']} | {c['label']} | {c['ms']:.2f} | {ratio} | {roof} | "
                 f"{mib(c['memory_bytes'])} | {c['compile_s']:.1f} |")
  lines += ["", "Pallas against XLA, one train step (relative error of the gradients and "
            "energies, worst quantity):"]
  lines += [f"{c['network_size']} {c['precision']}: {c['worst_error']:.1e} ({c['worst']}, "
            f"tolerance {c['tolerance']:.0e}) {'ok' if c['passed'] else 'FAILED'}"
            for c in report["checks"]]
  lines += ["", f"Device peak memory: {mib(report['device_peak_bytes'])} MiB."]
  if report["dropped"]:
    lines.append("Dropped for the budget: " + ", ".join(
        f"{d['case']} ({d['why']})" for d in report["dropped"]) + ".")
  return "\n".join(lines) + "\n"


def plain(value):
  """``value`` for strict JSON: non-finite floats as None, numpy scalars as Python's."""
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  return None if isinstance(value, float) and not math.isfinite(value) else value


def write(report: dict, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "suite.json"), "w") as f:
    json.dump(plain(report), f, indent=2, allow_nan=False)
  with open(os.path.join(out, "suite.md"), "w") as f:
    f.write(markdown(report))


def main(argv=None, *, perturb=None) -> int:
  """Runs the suite; returns the exit status (0, or 1 on a failed check).
  ``perturb`` (tests): applied to the Pallas step's checked quantities."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="gpu_suite", help="folder for suite.json and suite.md")
  parser.add_argument("--dry_run", action="store_true",
                      help="tiny shapes, 2 rounds of 1 step, also lowered for CUDA")
  parser.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S,
                      help="seconds for the whole run; the slowest timed cases go first")
  parser.add_argument("--estimates", help="an earlier suite.json: its measured cost per case")
  parser.add_argument("--rounds", type=int, help="round-robin rounds (default 10; dry run 2)")
  parser.add_argument("--steps", type=int, help="steps per case per round (default 5; dry 1)")
  parser.add_argument("--batch", type=int, help="global batch (default 64; dry run 8)")
  parser.add_argument("--plan_only", action="store_true", help="print the plan, run nothing")
  args = parser.parse_args(argv)
  started = time.perf_counter()
  elapsed = lambda: time.perf_counter() - started

  def log(message):
    print(f"[{elapsed():6.1f} s] {message}", flush=True)

  shapes = DRY if args.dry_run else FULL
  rounds = args.rounds or (2 if args.dry_run else 10)
  steps = args.steps or (1 if args.dry_run else 5)
  batch = args.batch or (8 if args.dry_run else 64)
  estimates = dict(DRY_ESTIMATES if args.dry_run else ESTIMATES)
  if args.estimates:
    estimates |= load_estimates(args.estimates)
  kept, dropped, total = plan(shapes, estimates, args.budget_s, rounds, steps)
  log(f"plan: {len(kept)} timed cases, estimated {total:.0f} s of a {args.budget_s:.0f} s budget"
      + (f"; dropped, slowest first: {', '.join(f'{k} ({s:.0f} s)' for k, s in dropped)}"
         if dropped else ""))
  dropped = [{"case": key, "why": f"estimated {seconds:.0f} s"} for key, seconds in dropped]
  if args.plan_only:
    return 0

  device = jax.local_devices()[0]
  mesh = mf.make_mesh([device])
  x, y = synthetic_batch(batch, mesh)
  log(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
      f"flax {flax.__version__}")
  bandwidth = step_benchmark.copy_bandwidth(16 if args.dry_run else 1024)
  log(f"copy rate: {bandwidth / 1e9:.1f} GB/s")
  report = {
      "header": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "device": device.device_kind, "platform": device.platform,
                 "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                 "commit": commit(), "dry_run": args.dry_run, "batch": batch, "rounds": rounds,
                 "steps": steps, "budget_s": args.budget_s, "copy_gb_per_s": bandwidth / 1e9},
      "networks": {name: {"kind": kind, **fields} for name, (kind, fields) in shapes.items()},
      "checks": [], "cases": {}, "dropped": dropped, "device_peak_bytes": None,
  }
  built = {}

  def make(key):
    if key not in built:
      built[key] = build(CASE[key], shapes, batch, mesh, x, y, log, lower_for_cuda=args.dry_run)
      built[key].peak_after = device_peak_bytes(device)
    return built[key]

  # 1. The check: the gate for everything else.
  for name, precision in checks_for(shapes):
    xla, pallas = (make(f"{name}/{kernel}/{precision}") for kernel in ("xla", "pallas"))
    result = check(xla, pallas, precision, perturb)
    result["network_size"] = describe(name, shapes, batch)
    report["checks"].append(result)
    log(f"check {result['network_size']} {precision}: worst relative error "
        f"{result['worst_error']:.1e} ({result['worst']}), tolerance {result['tolerance']:.0e}")
    if not result["passed"]:
      write(report, args.out)
      print(f"error: the fused Pallas step differs from the XLA step at {result['network_size']}, "
            f"{precision}: {result['worst']} relative error {result['worst_error']:.2e} > "
            f"{result['tolerance']:.0e} (all errors in {args.out}/suite.json)", file=sys.stderr)
      return 1
  for key in [k for k in built if not CASE[k].timed]:  # free the check-only states
    del built[key]

  # 2. Build the kept cases, cheapest first, so that a budget overrun drops the slowest.
  need = sorted({*kept, *(CASE[key].baseline for key in kept)},
                key=lambda k: 0 if k in built else cost(k, estimates, 0, 0))
  for key in need:
    remaining = args.budget_s - elapsed() - sum(
        cost(k, estimates, rounds, steps) - estimates[k][0] for k in built)
    if key not in built and cost(key, estimates, rounds, steps) > remaining:
      report["dropped"].append({"case": key, "why": "over the budget at run time"})
      log(f"{key}: dropped, {remaining:.0f} s left")
      continue
    make(key)
  timed = [b for b in built.values() if b.case.timed and (
      b.case.algorithm == "pc" or any(o.case.baseline == b.case.key for o in built.values()))]

  # 3. Round-robin: every case sees the same machine.
  for r in range(rounds):
    if r >= MIN_ROUNDS and elapsed() > args.budget_s:
      log(f"rounds stopped after {r}: the budget is spent")
      report["header"]["rounds"] = r
      break
    for b in timed:
      start = time.perf_counter()
      for _ in range(steps):
        result = b.run(b.state)
        b.state = result[:2]
      jax.block_until_ready(result)
      b.times.append((time.perf_counter() - start) / steps)
    log(f"round {r + 1}/{rounds}: " + ", ".join(
        f"{b.case.key} {b.times[-1] * 1e3:.2f} ms" for b in timed))

  medians = {b.case.key: statistics.median(b.times) for b in timed}
  for b in sorted(timed, key=lambda b: CASES.index(b.case)):  # the table in CASES' order
    case, seconds = b.case, medians[b.case.key]
    bp = medians.get(case.baseline)
    moved = (step_benchmark.inference_bytes(b.model, batch, b.inference.phases_for(
        b.model.hidden_layers), case.kernel == "pallas")
             if case.recipe == "paper" and case.algorithm == "pc" else float("nan"))
    report["cases"][case.key] = {
        "network": describe(case.network, shapes, batch), "label": case.label,
        "ms": seconds * 1e3, "ms_rounds": [t * 1e3 for t in b.times],
        "ratio_to_bp": seconds / bp if bp else None,
        "model_bytes": moved, "roofline_fraction": moved / bandwidth / seconds,
        "memory_bytes": b.memory_bytes, "peak_bytes": b.peak_after,
        "compile_s": b.compile_s, "cuda_lowering": b.cuda_lowering,
        "check": next(({k: c[k] for k in ("worst", "worst_error", "passed")}
                       for c in report["checks"] if case.key in
                       {f"{c['network']}/{k}/{c['precision']}" for k in ("xla", "pallas")}), None),
    }
  report["device_peak_bytes"] = device_peak_bytes(device)
  write(report, args.out)
  print()
  print(markdown(report))
  bad = {key: c["cuda_lowering"] for key, c in report["cases"].items()
         if c["cuda_lowering"] not in (None, "ok")}
  if bad:
    print(f"error: lowered for CUDA, {', '.join(f'{k}: {v}' for k, v in bad.items())}",
          file=sys.stderr)
    return 1
  log(f"done: {args.out}/suite.json and suite.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
