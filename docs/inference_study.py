"""One epoch of real MNIST per (network, recipe, seed): test accuracy, mean ± spread.

    python docs/inference_study.py --workdir=runs/inference_study \\
        --networks width=128,hidden_layers=16 --recipes bp epc deep --seeds=0,1,2
    python docs/inference_study.py --workdir=runs/inference_study --config=configs/mnist_conv.py \\
        --networks residual_layers=6 --recipes bp epc

Each point is an ordinary run of ``--config`` with the network's fields, the
recipe and ``seed``; a finished point is read back, not rerun. A recipe is a
name of ``RECIPES`` or ``label:spec`` with ``spec`` a config argument (variants
and overrides, e.g. ``epc5:epc,steps=5``). Per-sample steps are
written for batch 64 (β = 64 × step). ``bp`` is given the cosine decay the
``deep`` and ``epc`` variants use, and with ``--bp_learning_rate`` the PC
recipe's η, so every recipe has the same weight schedule.

Prints a markdown table: per network and recipe, the mean and the spread
(max − min) of the final test accuracy over the seeds, the smallest
per-matrix weight change as a fraction of BP's, the smallest per-matrix
PC–BP gradient cosine at initialisation (seed 0, the first 64 test examples)
and at the last evaluation (PC only, mean over seeds), the median s/step
(batch 64) and its ratio to the BP row's (runs one after another on a shared
machine: rough; ``benchmarks/step_benchmark.py`` times them side by side).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
# Named recipes: config arguments appended to the network's fields. The ePC
# steps are per sample (β = 64 s): s = 0.01 is the variant's, 0.1 the step
# that collapsed at 128 × 64 in the calibration, T = 10 at s = 0.25
# runs close to PC's equilibrium (ePC's fixed point is state PC's). The epc*
# recipes keep Adam's default ε (optimizer_eps=0), as section 11 measured them;
# epc_eps is the :epc variant itself, which sets ε = 1e-12.
_EPC = "epc,optimizer_eps=0"
RECIPES = {
    "bp": "bp,lr_schedule=cosine",
    "paper": "",
    "deep": "deep",
    "deep_gamma": "deep,output_precision=0.01",
    "epc": _EPC,
    "epc_eps": "epc",
    "epc_t3": _EPC + ",steps=3,lr=6.4",
    "epc_t10": _EPC + ",steps=10,lr=16",
    "epc_t10_guard": _EPC + ",steps=10,lr=16,step_guard=5",
    "epc_s0.1": _EPC + ",lr=6.4",
    "epc_s0.1_guard": _EPC + ",lr=6.4,step_guard=5",
}


def recipe_spec(recipe: str, bp_learning_rate: float | None) -> tuple[str, str]:
  """(label, config argument) of a recipe name or ``label:spec``."""
  label, _, spec = recipe.partition(":")
  spec = spec if spec else RECIPES[label]
  if label == "bp" and bp_learning_rate:
    spec += f",learning_rate={bp_learning_rate}"
  return label, spec


def run(workdir: pathlib.Path, config: str, network: str, label: str, spec: str,
        seed: int) -> list[dict]:
  """The metrics records of one point, training it first unless it finished."""
  point = workdir / f"{network.replace('=', '').replace(',', '_')}_{label}_s{seed}"
  log, done = point / "metrics.jsonl", point / "finished"
  if not done.exists():
    argument = ",".join(filter(None, (network, spec)))
    result = subprocess.run([sys.executable, "-m", "mupc_flax.main",
                             f"--config={config}:{argument}", f"--workdir={point}",
                             f"--config.seed={seed}", "--config.log_every_steps=100"],
                            cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
      sys.exit(f"error: {point.name} failed: {result.stderr.strip().splitlines()[-1]}")
    done.touch()
  return [json.loads(line) for line in log.read_text().splitlines()]


def initial_cosines(workdir: pathlib.Path, config: str, network: str, label: str,
                    spec: str) -> list[float] | None:
  """Per-matrix PC–BP gradient cosines of the seed-0 network at initialisation
  on the first 64 test examples (None for BP), cached beside the points."""
  cache = workdir / f"{network.replace('=', '').replace(',', '_')}_{label}_init.json"
  if not cache.exists():
    sys.path.insert(0, str(REPO))
    from mupc_flax import configuration, data, diagnostics, validation  # noqa: PLC0415
    arg = ",".join(filter(None, (network, spec)))
    cfg = configuration.load(str(REPO / config) + (f":{arg}" if arg else ""))
    cosines = None
    if cfg.train.algorithm == "pc":
      _, test = validation.load_splits(cfg)
      model = validation.build_model(cfg, test.spec)
      batch = data.pipeline.preprocess(*test.read(np.arange(64)), test.spec)
      cosines = diagnostics.pc_bp_agreement(model, batch["x"], batch["y"],
                                            validation.inference_of(cfg),
                                            loss=cfg.train.loss)["layer_cosines"]
    workdir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(cosines))
  return json.loads(cache.read_text())


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--networks", nargs="+", default=["width=128,hidden_layers=16"])
  parser.add_argument("--recipes", nargs="+", default=["bp", "epc", "deep"])
  parser.add_argument("--bp_learning_rate", type=float, default=None,
                      help="BP's η (default: the config's bp variant's)")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--gap_figure", type=pathlib.Path, default=None,
                      help="also draw BP's lead over each recipe against N/L (dense networks)")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  print(f"{args.config}\n\n| network | recipe | test accuracy (mean, spread) | seeds | "
        "min change / BP's | min PC–BP cosine, init | min PC–BP cosine, end | s/step | / BP's |\n"
        "|---|---|---|---|---|---|---|---|---|")
  means = {}  # (network, label) -> [accuracy of each seed]
  for network in args.networks:
    bp_change = bp_speed = None
    for recipe in args.recipes:
      label, spec = recipe_spec(recipe, args.bp_learning_rate)
      accuracies, changes, cosines, speeds = [], [], [], []
      for seed in seeds:
        records = run(args.workdir, args.config, network, label, spec, seed)
        final = [r for r in records if r["split"] == "eval"][-1]
        accuracies.append(100 * final["accuracy"])
        changes.append(final.get("weight_change"))
        cosines.append(min(final["pc_bp_cosines"]) if "pc_bp_cosines" in final else None)
        speeds += [64 / r["examples_per_second"] for r in records
                   if r["split"] == "train" and r.get("examples_per_second")]
      means[network, label] = accuracies
      change = [statistics.mean(c) for c in zip(*changes)] if all(changes) else None
      speed = statistics.median(speeds) if speeds else float("nan")
      if label == "bp":
        bp_change, bp_speed = change, speed
      ratio = (min(c / b for c, b in zip(change, bp_change)) if change and bp_change else None)
      at_init = initial_cosines(args.workdir, args.config, network, label, spec)
      end = (f"{statistics.mean(cosines):.3f}" if all(c is not None for c in cosines) else "—")
      print(f"| {network} | {label} | {statistics.mean(accuracies):.2f} % "
            f"({max(accuracies) - min(accuracies):.2f}) | {len(seeds)} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | "
            f"{'—' if at_init is None else f'{min(at_init):.3f}'} | {end} | {speed:.3f} | "
            f"{speed / bp_speed if bp_speed else float('nan'):.1f} |", flush=True)
  if args.gap_figure:
    gap_figure(means, args.gap_figure)


def gap_figure(accuracies: dict, path: pathlib.Path) -> None:
  """BP's mean test accuracy minus each recipe's (points, with the range over
  seeds of the recipe) against N/L = width / (hidden_layers + 1), one line
  per recipe and depth."""
  import matplotlib  # noqa: PLC0415 (only for the figure)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fields = lambda network: dict(item.split("=") for item in network.split(","))
  lines = {}
  for (network, label), values in accuracies.items():
    f = fields(network)
    if label == "bp" or (network, "bp") not in accuracies:
      continue
    bp = statistics.mean(accuracies[network, "bp"])
    depth = int(f["hidden_layers"])
    lines.setdefault((label, depth), []).append(
        (int(f["width"]) / (depth + 1), bp - statistics.mean(values),
         bp - max(values), bp - min(values)))
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for (label, depth), points in sorted(lines.items()):
    x, y, low, high = map(list, zip(*sorted(points)))
    ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, low)], [b - a for a, b in zip(y, high)]],
                marker="o", capsize=3, label=f"{label}, H = {depth}")
  ax.axhline(0, color="grey", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("N / L (width over weight layers)")
  ax.set_ylabel("BP − method, test accuracy (points)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
