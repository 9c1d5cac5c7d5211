"""Compiles the fused Pallas step's Triton kernels to PTX and SASS, without a GPU.

    JAX_PLATFORMS=cpu python benchmarks/ptx_check.py                    # 256x32, 512x128 at B = 64
    JAX_PLATFORMS=cpu python benchmarks/ptx_check.py --configs=1024x16 --batch=256 --json=ptx.json

Needs the CUDA wheels of jax's own version, importable (or on PYTHONPATH,
as .ci/run installs them) and no GPU or driver:

    V=$(python -c 'import jax; print(jax.__version__)')
    pip install --no-deps jax-cuda12-plugin==$V jax-cuda12-pjrt==$V nvidia-cuda-nvcc-cu12

(``--no-deps``: without it the plugin brings the CUDA runtime libraries, GBs
that compiling does not need; ptxas comes from nvidia-cuda-nvcc-cu12). For each WIDTHxHIDDEN
and product precision it builds mupc_flax's public train step (ResidualPCN,
``Engine(kernel="pallas")``, one device, per-device batch --batch),
lowers it for CUDA (``jax.jit(step).trace(...).lower(lowering_platforms=
("cuda",))``), takes every ``__gpu$xla.gpu.triton`` custom call out of the
StableHLO (the Triton module and the num_warps / num_stages it will be
compiled with), compiles each distinct one to PTX for sm_90 through the CUDA
plugin's Triton compiler (as XLA would on an H100: ``jax._src.lib.triton.
compile``, which reports the shared memory a block needs), and assembles the
PTX with ``ptxas -v -arch=sm_90a``, which reports registers per thread and
spill bytes. One row per kernel; the exit status is 1 if any kernel fails
the check: ptxas error, a spill, or more shared memory than an H100 block
may have (227 KB).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import mupc_flax as mf

# The most dynamic shared memory one H100 (sm_90) thread block may use.
SMEM_LIMIT_BYTES = 227 * 1024
TRITON_CALL = "__gpu$xla.gpu.triton"


def ptxas_path() -> str | None:
  """ptxas from the nvidia-cuda-nvcc-cu12 wheel, else from PATH, else None."""
  try:
    import nvidia.cuda_nvcc
    for root in nvidia.cuda_nvcc.__path__:
      candidate = os.path.join(root, "bin", "ptxas")
      if os.access(candidate, os.X_OK):
        return candidate
  except ImportError:
    pass
  return shutil.which("ptxas")


def missing() -> str | None:
  """Why the check cannot run here (a sentence), or None if it can."""
  from jax._src.lib import triton
  jax.devices()  # plugins register their Triton compilers when the backends start
  if not triton.has_compilation_handler("cuda"):
    return ("no Triton compiler for CUDA: install jax-cuda12-plugin and jax-cuda12-pjrt "
            f"=={jax.__version__} with --no-deps")
  if ptxas_path() is None:
    return "no ptxas: install nvidia-cuda-nvcc-cu12"
  return None


def triton_calls(lowered) -> list[dict]:
  """The Triton custom calls of a lowered computation: name, Triton module
  bytecode, num_warps and num_stages of each, in program order."""
  from jax._src.lib.mlir import ir
  calls = []

  def visit(op):
    op = op.operation
    if op.name == "stablehlo.custom_call" and \
        ir.StringAttr(op.attributes["call_target_name"]).value == TRITON_CALL:
      # API version 4 custom calls keep their backend config as a dictionary here.
      config = ir.DictAttr(op.attributes["mhlo.backend_config"])
      calls.append({
          "name": ir.StringAttr(config["name"]).value,
          "module": ir.StringAttr(config["ir"]).value_bytes,
          "num_warps": ir.IntegerAttr(config["num_warps"]).value,
          "num_stages": ir.IntegerAttr(config["num_stages"]).value,
      })
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          visit(inner)

  module = lowered.compiler_ir("stablehlo")
  with module.context:
    for op in module.body.operations:
      visit(op)
  return calls


def lower_train_step(width: int, hidden: int, batch: int, precision: str, activation: str):
  """The public PC train step of a width × hidden dense network, lowered for CUDA."""
  model = mf.ResidualPCN(784, width, hidden, 10, activation=activation, precision=precision,
                         rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(0.01), wrt=nnx.Param)
  step = mf.make_train_step(model, optimizer, mf.make_mesh(jax.local_devices()[:1]),
                            inference=mf.Inference(hidden, 0.5, engine=mf.Engine(kernel="pallas")))
  x, y = jnp.zeros((batch, 784)), jnp.zeros((batch, 10))
  return jax.jit(step).trace(nnx.state(model), nnx.state(optimizer), x, y).lower(
      lowering_platforms=("cuda",))


def ptxas(ptx: str, arch: str = "sm_90a") -> dict:
  """``ptxas -v`` of one PTX module: registers, spill bytes, stack, errors."""
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "kernel.ptx")
    with open(path, "w") as f:
      f.write(ptx)
    done = subprocess.run([ptxas_path(), "-v", f"-arch={arch}", path, "-o",
                           os.path.join(folder, "kernel.cubin")], capture_output=True, text=True)
  log = done.stdout + done.stderr
  number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else None
  return {"ptxas_ok": done.returncode == 0, "registers": number(r"Used (\d+) registers"),
          "spill_stores": number(r"(\d+) bytes spill stores"),
          "spill_loads": number(r"(\d+) bytes spill loads"),
          "stack_frame": number(r"(\d+) bytes stack frame"),
          "ptxas_log": log.strip() if done.returncode else ""}


def check(width: int, hidden: int, batch: int, precision: str, activation: str = "relu") -> list[dict]:
  """One row per distinct Triton kernel of the train step (kernels that differ
  only in their grid's layer count compile alike: the first of each name is kept)."""
  from jax._src.lib import triton
  rows, seen = [], set()
  for call in triton_calls(lower_train_step(width, hidden, batch, precision, activation)):
    if call["name"] in seen:
      continue
    seen.add(call["name"])
    row = {"config": f"{width}x{hidden}", "batch": batch, "precision": precision,
           "activation": activation, "kernel": call["name"], "num_warps": call["num_warps"],
           "num_stages": call["num_stages"]}
    try:
      result = triton.compile("cuda", call["module"], "9.0", num_warps=call["num_warps"],
                              num_ctas=1, num_stages=call["num_stages"])
    except Exception as error:  # noqa: BLE001  (Triton's errors are plain RuntimeErrors)
      rows.append(row | {"ok": False, "error": f"Triton: {str(error).strip()[:400]}"})
      continue
    row |= {"smem_bytes": result.smem_bytes} | ptxas(result.asm)
    row["ok"] = bool(row["ptxas_ok"] and row["spill_stores"] == 0 and row["spill_loads"] == 0
                     and row["smem_bytes"] <= SMEM_LIMIT_BYTES)
    rows.append(row)
  if len(seen) != 2:
    raise AssertionError(f"expected the two fused kernels, found {sorted(seen)}")
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="256x32,512x128", help="WIDTHxHIDDEN, comma-separated")
  parser.add_argument("--batch", type=int, default=64, help="per-device batch")
  parser.add_argument("--precisions", default="float32,tf32,bfloat16")
  parser.add_argument("--activation", default="relu")
  parser.add_argument("--json", help="write the rows to this file")
  args = parser.parse_args(argv)
  reason = missing()
  if reason:
    print(f"ptx_check: cannot run: {reason}", file=sys.stderr)
    return 2
  rows = []
  for config in args.configs.split(","):
    width, hidden = map(int, config.lower().split("x"))
    for precision in args.precisions.split(","):
      rows += check(width, hidden, args.batch, precision, args.activation)
  print(f"jax {jax.__version__}, sm_90a | config | B | precision | kernel | warps | stages | "
        "registers | spill stores / loads (bytes) | smem (bytes) | ok")
  for r in rows:
    print(f"| {r['config']} | {r['batch']} | {r['precision']} | {r['kernel']} | {r['num_warps']} | "
          f"{r['num_stages']} | {r.get('registers')} | {r.get('spill_stores')} / {r.get('spill_loads')} | "
          f"{r.get('smem_bytes')} | {'yes' if r['ok'] else 'NO'} |")
    if not r["ok"] and (r.get("error") or r.get("ptxas_log")):
      print("   ", r.get("error") or r.get("ptxas_log"))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
