"""The language study of docs/results.md (section 12): the limits paper's
transformer experiment and training against BP on Shakespeare.

    MUPC_SHAKESPEARE_DIR=../shared/data/shakespeare python docs/language_study.py --workdir=/tmp/mupc_text
    ... --parts=cosine_width,cosine_depth   # some parts, run in the order given

Parts (every number goes to docs/language_study.json):

- cosine_width: the cosine of the PC weight gradient at the end of inference
  with BP's, against the width d at 12 blocks, on the limits paper's network
  (``configs/shakespeare.py:limits``: a PC layer per block, no layer norm,
  α = 1) at initialisation, for a batch of 8 test windows of 32 characters;
  state PC by gradient descent and ePC, each for T = 200 steps at a
  per-sample step of 0.25 (and after T/2 = 100: where the two agree,
  inference has settled), 3 seeds.
- cosine_depth: the same against the blocks at d = 64.
- cosine_widest: the same at d = 512, 12 blocks.
- bp_lr: BP's η at each training shape (seed 0, a grid of 4).
- training: validation bits per character after 300 steps of 64 windows of
  64 characters (1.2 M characters) at d ∈ {32, 64} × {2, 4} blocks, BP at
  its best η, ePC (``epc``) at the same η, state PC (the paper's recipe,
  T = H) at the same η, 3 seeds.
- training_deep: state PC under the ``deep`` recipe (heavy ball, T = 2H, the
  step guard) at d = 32, 2 blocks, 3 seeds.
- figures: docs/figures/limits_cosine.png from the cosine parts.
"""

import argparse
import json
import os
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_results  # noqa: E402

import mupc_flax as mf  # noqa: E402
from mupc_flax import data, diagnostics, metrics, sweep  # noqa: E402
from mupc_flax.networks import kinds  # noqa: E402

REPO = make_results.REPO
FIGURES = make_results.FIGURES
SAVED = REPO / "docs" / "language_study.json"
SEEDS = (0, 1, 2)
COSINE_CONTEXT, COSINE_BATCH = 32, 8
COSINE_STEPS, COSINE_STEP_PER_SAMPLE = 200, 0.25
WIDTHS = (8, 16, 32, 64, 128, 256)
WIDEST = 512
DEPTHS = (2, 4, 8, 12, 24)
TRAIN_STEPS = 300
SHAPES = [(32, 2), (32, 4), (64, 2), (64, 4)]  # (d, blocks)
BP_RATES = (3e-2, 0.1, 0.3, 1.0)


def _limits_network(width: int, blocks: int, seed: int):
  config = make_results.load_config("configs/shakespeare.py", "limits")
  config.model.update(width=width, blocks=blocks, heads=max(1, min(4, width // 8)))
  return kinds.build(config.model, data.text.spec("shakespeare", COSINE_CONTEXT), seed)


def _cosines(split, width: int, blocks: int) -> list[dict]:
  """Per seed and method: the cosine after T/2 and after T steps (equal where
  inference has settled) and the per-matrix cosines after T."""
  rows = []
  batch = split.examples(np.arange(COSINE_BATCH) * 997)
  nets = {seed: _limits_network(width, blocks, seed) for seed in SEEDS}
  for method in ("states", "errors"):
    measured = {}
    for steps in (COSINE_STEPS // 2, COSINE_STEPS):
      inference = mf.Inference(steps, COSINE_STEP_PER_SAMPLE * COSINE_BATCH, method=method)
      for seed, net in nets.items():
        measured[seed, steps] = diagnostics.pc_bp_agreement(net, batch["x"], batch["y"],
                                                            inference, loss="ce")
    for seed in SEEDS:
      final, half = measured[seed, COSINE_STEPS], measured[seed, COSINE_STEPS // 2]
      rows.append({"width": width, "blocks": blocks, "seed": seed, "method": method,
                   "cosine": final["cosine"], "cosine_half_steps": half["cosine"],
                   "layer_cosines": final["layer_cosines"]})
      print(width, blocks, seed, method, f"cosine {final['cosine']:.4f} "
            f"(after T/2: {half['cosine']:.4f})", flush=True)
  return rows


def cosine_width(split, results) -> None:
  results["cosine_width"] = [r for d in WIDTHS for r in _cosines(split, d, 12)]


def cosine_widest(split, results) -> None:
  """d = 512 at 12 blocks, kept apart as ``cosine_widest`` (minutes per
  method here)."""
  results["cosine_widest"] = _cosines(split, WIDEST, 12)


def cosine_depth(split, results) -> None:
  results["cosine_depth"] = [r for blocks in DEPTHS for r in _cosines(split, 64, blocks)]


def _train(workdir, data_dir, name, arg, splits, seed=0, **fields) -> dict:
  config = make_results.load_config("configs/shakespeare.py", arg)
  config.seed = seed
  config.data.data_dir = data_dir
  config.train.num_steps = TRAIN_STEPS
  config.train.warmup_steps = 30
  config.eval_every_steps = TRAIN_STEPS
  config.log_every_steps = 50
  config.checkpoint_every_steps = 10_000
  config.log_gradient_agreement = False
  for key, value in fields.items():
    section, field = key.split(".")
    config[section][field] = value
  row = sweep.run_point(name, config, workdir, splits)
  if row["status"] != "ok":
    return row
  log = metrics.read(workdir / "runs" / name / "metrics.jsonl")
  rates = [r["examples_per_second"] for r in log if r["split"] == "train"][1:]
  final = make_results.last_eval(workdir / "runs" / name)
  return row | {"bits_per_character": final["bits_per_character"],
                "seconds_per_step": config.train.batch_size / float(np.median(rates))}


def bp_lr(workdir, data_dir, splits, results) -> None:
  rows = results.setdefault("bp_lr", [])
  for width, blocks in SHAPES:
    for lr in BP_RATES:
      if any(r["width"] == width and r["blocks"] == blocks and r["lr"] == lr for r in rows):
        continue
      row = _train(workdir / "bp_lr", data_dir, f"bp_d{width}_b{blocks}_lr{lr:g}", "bp", splits,
                   **{"model.width": width, "model.blocks": blocks, "train.learning_rate": lr})
      rows.append(row | {"width": width, "blocks": blocks, "lr": lr})
      print("bp", width, blocks, lr, row.get("bits_per_character"), flush=True)
      SAVED.write_text(json.dumps(results, indent=1))


def _best_lr(results, width, blocks) -> float:
  rows = [r for r in results["bp_lr"] if r["width"] == width and r["blocks"] == blocks
          and r.get("bits_per_character") is not None]
  return min(rows, key=lambda r: r["bits_per_character"])["lr"]


def training(workdir, data_dir, splits, results) -> None:
  rows = results.setdefault("training", [])
  for width, blocks in SHAPES:
    lr = _best_lr(results, width, blocks)
    for method, arg in (("BP", "bp"), ("ePC", "epc"), ("state PC", "")):
      for seed in SEEDS:
        if any(r["width"] == width and r["blocks"] == blocks and r["method"] == method
               and r["seed"] == seed for r in rows):
          continue
        name = f"{arg or 'pc'}_d{width}_b{blocks}_s{seed}"
        row = _train(workdir / "training", data_dir, name, arg, splits,
                     seed=seed, **{"model.width": width, "model.blocks": blocks,
                                   "train.learning_rate": lr})
        rows.append(row | {"width": width, "blocks": blocks, "method": method, "seed": seed})
        print(method, width, blocks, seed, row.get("bits_per_character"), flush=True)
        SAVED.write_text(json.dumps(results, indent=1))


def training_deep(workdir, data_dir, splits, results) -> None:
  """State PC under the ``deep`` recipe at the smallest shape, 3 seeds."""
  rows = results.setdefault("training_deep", [])
  width, blocks = SHAPES[0]
  lr = _best_lr(results, width, blocks)
  for seed in SEEDS:
    if any(r["seed"] == seed for r in rows):
      continue
    row = _train(workdir / "training", data_dir, f"deep_d{width}_b{blocks}_s{seed}", "deep", splits,
                 seed=seed, **{"model.width": width, "model.blocks": blocks,
                               "train.learning_rate": lr})
    rows.append(row | {"width": width, "blocks": blocks, "method": "state PC, deep", "seed": seed})
    print("deep", width, blocks, seed, row.get("bits_per_character"), flush=True)
    SAVED.write_text(json.dumps(results, indent=1))


def figures(results) -> None:
  """docs/figures/limits_cosine.png: the cosine against d (12 blocks) and
  against the blocks (d = 64), mean and standard deviation over the seeds."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
  for ax, part, by, label in ((axes[0], "cosine_width", "width", "width d (12 blocks)"),
                              (axes[1], "cosine_depth", "blocks", "blocks (d = 64)")):
    rows = results.get(part, []) + (results.get("cosine_widest", []) if by == "width" else [])
    for method, name in (("states", "state PC, T = 200"), ("errors", "ePC, T = 200")):
      xs = sorted({r[by] for r in rows if r["method"] == method})
      values = [[r["cosine"] for r in rows if r[by] == x and r["method"] == method] for x in xs]
      if xs:
        ax.errorbar(xs, [np.mean(v) for v in values], [np.std(v) for v in values], fmt="o-",
                    capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("cos(PC, BP) of the weight gradient")
  axes[0].legend()
  fig.suptitle("Causal transformer on Shakespeare, at initialisation (3 seeds)")
  fig.tight_layout()
  FIGURES.mkdir(exist_ok=True)
  fig.savefig(FIGURES / "limits_cosine.png", dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--parts", default="cosine_width,cosine_depth,cosine_widest,bp_lr,training,"
                      "training_deep,figures")
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir).absolute()
  data_dir = str(workdir / "tfds")
  data.prepare("shakespeare", data_dir, manual_dir=os.environ.get("MUPC_SHAKESPEARE_DIR"))
  config = make_results.load_config("configs/shakespeare.py")
  splits = (data.TextSplit("shakespeare", "train", data_dir, config.data.context),
            data.TextSplit("shakespeare", "test", data_dir, config.data.context, disjoint=True,
                           max_windows=config.data.eval_windows))
  cosine_split = data.TextSplit("shakespeare", "test", data_dir, COSINE_CONTEXT)
  results = make_results.saved_results(SAVED)
  parts = {"cosine_width": lambda: cosine_width(cosine_split, results),
           "cosine_depth": lambda: cosine_depth(cosine_split, results),
           "cosine_widest": lambda: cosine_widest(cosine_split, results),
           "bp_lr": lambda: bp_lr(workdir, data_dir, splits, results),
           "training": lambda: training(workdir, data_dir, splits, results),
           "training_deep": lambda: training_deep(workdir, data_dir, splits, results),
           "figures": lambda: figures(results)}
  for name in args.parts.split(","):
    parts[name]()
    SAVED.write_text(json.dumps(results, indent=1))
  print("done:", SAVED)


if __name__ == "__main__":
  main()
