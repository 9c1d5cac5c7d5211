"""One epoch of real MNIST per (network, recipe, seed): test accuracy, mean ± spread.

    python docs/inference_study.py --workdir=runs/inference_study \\
        --networks=width=128,hidden_layers=16 --recipes=bp,epc,deep --seeds=0,1,2

Each point is an ordinary run of ``configs/default.py`` with the network's
fields, the recipe (a config variant; ``bp`` is given the cosine decay the
``deep`` and ``epc`` variants use, so every recipe has the same weight
schedule) and ``seed``; a finished point is read back, not rerun. Prints a
markdown table: per network and recipe, the mean and the spread (max − min)
of the final test accuracy over the seeds, the smallest per-matrix weight
change as a fraction of BP's, the smallest per-matrix PC–BP gradient cosine
at the last evaluation (PC only) and the median s/step (batch 64).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# bp on the same weight schedule as the PC recipes it is compared with.
RECIPES = {"bp": "bp,lr_schedule=cosine"}


def run(workdir: pathlib.Path, network: str, recipe: str, seed: int) -> list[dict]:
  """The metrics records of one point, training it first unless it finished."""
  point = workdir / f"{network.replace('=', '').replace(',', '_')}_{recipe}_s{seed}"
  log, done = point / "metrics.jsonl", point / "finished"
  if not done.exists():
    config = f"configs/default.py:{network},{RECIPES.get(recipe, recipe)}"
    result = subprocess.run([sys.executable, "-m", "mupc_flax.main", f"--config={config}",
                             f"--workdir={point}", f"--config.seed={seed}",
                             "--config.log_every_steps=100"],
                            cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
      sys.exit(f"error: {point.name} failed: {result.stderr.strip().splitlines()[-1]}")
    done.touch()
  return [json.loads(line) for line in log.read_text().splitlines()]


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--networks", nargs="+", default=["width=128,hidden_layers=16"])
  parser.add_argument("--recipes", default="bp,epc,deep")
  parser.add_argument("--seeds", default="0,1,2")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  print("| network | recipe | test accuracy (mean, spread) | seeds | min change / BP's | "
        "PC–BP cosine (last eval) | s/step |\n|---|---|---|---|---|---|---|")
  for network in args.networks:
    bp_change = None
    for recipe in args.recipes.split(","):
      accuracies, changes, cosines, speeds = [], [], [], []
      for seed in seeds:
        records = run(args.workdir, network, recipe, seed)
        final = [r for r in records if r["split"] == "eval"][-1]
        accuracies.append(100 * final["accuracy"])
        changes.append(final.get("weight_change"))
        cosines.append(min(final["pc_bp_cosines"]) if "pc_bp_cosines" in final else None)
        speeds += [64 / r["examples_per_second"] for r in records
                   if r["split"] == "train" and r.get("examples_per_second")]
      change = [statistics.mean(c) for c in zip(*changes)] if all(changes) else None
      if recipe == "bp":
        bp_change = change
      ratio = (min(c / b for c, b in zip(change, bp_change)) if change and bp_change else None)
      cosine = (f"{statistics.mean(cosines):.3f}" if all(c is not None for c in cosines) else "—")
      print(f"| {network} | {recipe} | {statistics.mean(accuracies):.2f} % "
            f"({max(accuracies) - min(accuracies):.2f}) | {len(seeds)} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | {cosine} | "
            f"{statistics.median(speeds) if speeds else float('nan'):.3f} |", flush=True)


if __name__ == "__main__":
  main()
