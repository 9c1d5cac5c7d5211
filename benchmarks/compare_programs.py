"""Whether two checkouts compile the same train steps: their StableHLO, side by side.

    git worktree add /tmp/old <old commit>
    python benchmarks/compare_programs.py --old=/tmp/old --new=.

A refactor that should not change what runs is checked here exactly, where
timing (``compare_commits.py``) can only say "within the noise". Each
checkout runs, in a process of its own, one PC and one BP train step (one
device, batch 64, the paper's inference) of each config, with every
compiled program dumped (``jax_dump_ir_to``). The programs are compared in
the order they compiled, without their source locations, names and result
labels (metadata the compiler does not read). Exit status 1 if any differs.
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile

CONFIGS = {  # name -> (kind, fields): those compare_commits.py times
    "128x8": ("dense", dict(width=128, hidden_layers=8)),
    "256x32": ("dense", dict(width=256, hidden_layers=32)),
    "conv16x2": ("conv", dict(width=16, stages=2, residual_layers=1)),
    "vit64x4": ("transformer", dict(width=64, blocks=4, patch_size=7, heads=4)),
}

STEPS = """
import sys
import jax
jax.config.update("jax_dump_ir_to", sys.argv[1])
jax.config.update("jax_dump_ir_modes", "stablehlo")
import numpy as np, optax
from flax import nnx
import mupc_flax as mf
from mupc_flax import data
from mupc_flax.networks import kinds
spec = data.pipeline.DatasetSpec((28, 28, 1), (0.0,), (1.0,), num_classes=10)
for kind, fields in {configs!r}:
  for algorithm in ("pc", "bp"):
    net = kinds.get(kind).make(spec, rngs=nnx.Rngs(0), **fields)
    opt = nnx.Optimizer(net, optax.adam(1e-3), wrt=nnx.Param)
    step = mf.make_train_step(net, opt, mf.make_mesh(jax.devices()[:1]), algorithm=algorithm,
                              inference=mf.Inference() if algorithm == "pc" else None)
    jax.block_until_ready(step(net, opt, np.zeros((64, 784), np.float32),
                               np.zeros((64, 10), np.float32)))
"""


def without_locations(text: str) -> str:
  """The module without ``loc(…)`` annotations (nested parentheses and all),
  ``#loc`` definitions, its name and result labels."""
  text = "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))
  pieces, i = [], 0
  while (j := text.find("loc(", i)) >= 0:
    pieces.append(text[i:j])
    depth, i = 0, j + 3
    while True:
      depth += {"(": 1, ")": -1}.get(text[i], 0)
      i += 1
      if not depth:
        break
  pieces.append(text[i:])
  text = re.sub(r"module @[\w.]+", "module @M", "".join(pieces))
  return re.sub(r'jax\.result_info = "[^"]*"', "jax.result_info", text)


def programs(checkout: pathlib.Path, configs: list, folder: pathlib.Path) -> list[tuple[str, str]]:
  run = subprocess.run([sys.executable, "-c", STEPS.format(configs=configs), str(folder)],
                       env=dict(os.environ, PYTHONPATH=str(checkout.resolve())), capture_output=True,
                       text=True)
  if run.returncode:
    sys.exit(f"error: the train steps of {checkout} failed:\n{run.stderr[-2000:]}")
  return [(p.name, without_locations(p.read_text())) for p in sorted(folder.iterdir())]


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--old", required=True, type=pathlib.Path)
  parser.add_argument("--new", default=".", type=pathlib.Path)
  parser.add_argument("--configs", default=",".join(CONFIGS))
  args = parser.parse_args()
  configs = [CONFIGS[name] for name in args.configs.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    old, new = (programs(c, configs, pathlib.Path(tmp) / n) for c, n in
                ((args.old, "old"), (args.new, "new")))
  differ = [(a, b) for (a, x), (b, y) in zip(old, new) if x != y]
  print(f"{len(old)} programs (old) and {len(new)} (new) for {args.configs}; "
        f"{len(differ)} differ")
  for a, b in differ:
    print(f"  {a} | {b}")
  sys.exit(1 if differ or len(old) != len(new) else 0)


if __name__ == "__main__":
  main()
