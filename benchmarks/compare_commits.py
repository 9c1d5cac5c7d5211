"""Seconds per PC training step of two checkouts, side by side in one run.

    git worktree add /tmp/old <old commit>
    python benchmarks/compare_commits.py --old=/tmp/old --new=. --configs=128x8,256x32,conv16x2

Each round runs each checkout's own ``benchmarks/step_benchmark.py`` once per
config (the "mupc_flax" variant, no reference), old and new back to back, so
both see the same machine load; the table gives, per config, the median over
rounds of each checkout's median ms per step and their ratio (new / old).
``--script=new`` runs the new checkout's benchmark script on both packages
(for configs the old script does not know, e.g. vit64x2).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile


def step_ms(checkout: pathlib.Path, config: str, repeats: int,
            script_from: pathlib.Path | None = None) -> float:
  """The median ms per step of ``checkout``'s train step at ``config``, timed by
  the benchmark script of ``script_from`` (default: the checkout's own)."""
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    run = subprocess.run([sys.executable, "benchmarks/step_benchmark.py", f"--configs={config}",
                          "--no-reference", f"--repeats={repeats}", f"--json={out.name}"],
                         cwd=script_from or checkout, env=dict(os.environ, PYTHONPATH=str(checkout)),
                         capture_output=True, text=True)
    if run.returncode:
      sys.exit(f"error: the benchmark of {checkout} at {config} failed:\n{run.stderr[-2000:]}")
    rows = json.loads(pathlib.Path(out.name).read_text())["rows"]
  return next(r["seconds"] for r in rows if r["variant"] == "mupc_flax") * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--old", required=True, type=pathlib.Path)
  parser.add_argument("--new", default=".", type=pathlib.Path)
  parser.add_argument("--configs", default="128x8,256x32,conv16x2")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--script", choices=("own", "new"), default="own",
                      help="whose benchmarks/step_benchmark.py times each checkout")
  args = parser.parse_args()
  configs = args.configs.split(",")
  times = {(c, side): [] for c in configs for side in ("old", "new")}
  for round_ in range(args.rounds):
    for config in configs:
      for side in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
        script_from = args.new.resolve() if args.script == "new" else None
        times[config, side].append(step_ms(getattr(args, side).resolve(), config, args.repeats,
                                           script_from))
        print(f"round {round_ + 1}, {config}, {side}: {times[config, side][-1]:.2f} ms", flush=True)
  print("\n| config | old ms/step | new ms/step | new / old |\n|---|---|---|---|")
  for config in configs:
    old, new = (statistics.median(times[config, side]) for side in ("old", "new"))
    print(f"| {config} | {old:.2f} | {new:.2f} | {new / old:.3f} |")


if __name__ == "__main__":
  main()
