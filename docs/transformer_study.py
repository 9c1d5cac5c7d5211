"""The transformer study of docs/results.md (section 10), and the depth exponent α.

    MUPC_MNIST_DIR=../shared/data/mnist python docs/transformer_study.py --workdir=/tmp/mupc_vit
    ... --parts=alpha,depth      # some parts, run in the order given

Parts (each run an ordinary resumable workdir under --workdir; every number
goes to docs/transformer_study.json):

- bp_lr: BP's learning rate for configs/mnist_transformer.py (4 blocks, 1 epoch).
- depth: one epoch of MNIST at 2, 4 and 8 blocks (4, 8 and 16 residual PC
  layers): μPC under the paper's recipe (at the config's η = 0.03 and the
  paper's 0.1) and the deep recipe, standard PC, BP.
- alpha: α = 1/2 against α = 1 (CompleteP) for the transformer (2 and 4
  blocks) and the dense network (width 128, H = 8 and 32, under the paper's
  recipe and the deep one): a grid of η over both depths, 300 steps each,
  for the transfer of η across depth and which layers learn.
"""

import json
import pathlib
import sys


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_results  # noqa: E402

from mupc_flax import metrics, plots, sweep  # noqa: E402

REPO = make_results.REPO
FIGURES = make_results.FIGURES
SAVED = REPO / "docs" / "transformer_study.json"
# label: (run name, config variant)
METHODS = {"μPC, η = 0.1": ("mupc_lr0.1", "learning_rate=0.1"), "μPC": ("mupc", ""),
           "μPC, deep recipe": ("deep", "deep"), "standard PC": ("sp", "sp"), "BP": ("bp", "bp")}


def run(config, name, workdir, splits, data_dir) -> dict:
  """One run (resumed, or skipped if done): its row and last evaluation."""
  config.data.data_dir = data_dir
  config.checkpoint_every_steps = 10_000
  row = sweep.run_point(name, config, workdir, splits)
  evaluation = make_results.last_eval(workdir / "runs" / name) if row["status"] == "ok" else {}
  log = metrics.read(workdir / "runs" / name / "metrics.jsonl")
  rates = [r["examples_per_second"] for r in log if r["split"] == "train"][1:]  # without compiling
  batch = config.train.batch_size
  return row | {"weight_change": evaluation.get("weight_change"),
                "pc_bp_cosines": evaluation.get("pc_bp_cosines"),
                "seconds_per_step": batch / (sum(rates) / len(rates)) if rates else None}


def bp_lr(workdir, splits, data_dir, results) -> list:
  rows = []
  for lr in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
    config = make_results.load_config("configs/mnist_transformer.py", f"bp,learning_rate={lr}")
    rows.append(run(config, f"bp_lr{lr:g}", workdir / "bp_lr", splits, data_dir) | {"lr": lr})
    print("bp lr", lr, rows[-1].get("test_accuracy"), flush=True)
  results["bp_lr"] = rows
  return rows


def depth(workdir, splits, data_dir, results, blocks=(2, 4, 8)) -> dict:
  out = results.setdefault("depth", {})
  for b in blocks:
    for label, (run_name, variant) in METHODS.items():
      name = f"{run_name}_b{b}"
      config = make_results.load_config("configs/mnist_transformer.py",
                                        ",".join(filter(None, [f"blocks={b}", variant])))
      out[name] = run(config, name, workdir / "depth", splits, data_dir) | {"method": label,
                                                                           "blocks": b}
      print(name, out[name]["status"], out[name].get("test_accuracy"),
            round(out[name]["seconds"]), flush=True)
      SAVED.write_text(json.dumps(results, indent=1))
  return out


def alpha(workdir, splits, data_dir, results, steps=300) -> dict:
  out = results.setdefault("alpha", {})
  paper = (["0.3", "0.1", "0.03", "0.01"], ["0.5"])  # η grid, β grid
  studies = {  # network: (config, its argument, depths, grids)
      "transformer": ("configs/mnist_transformer.py", "", ["2", "4"], paper),
      "dense": ("configs/mnist_depth.py", ",width=128", ["8", "32"], paper),
      "dense, deep recipe": ("configs/mnist_depth.py", ",width=128,deep", ["8", "32"],
                             (["0.03", "0.01", "0.003"], ["16"])),
  }
  for network, (path, arg, depths, (lrs, betas)) in studies.items():
    for exponent in (0.5, 1.0):
      config = make_results.short_runs(
          make_results.load_config(path, f"depth_exponent={exponent}{arg}"), data_dir, steps)
      folder = workdir / f"alpha_{network.replace(', ', '_').replace(' ', '_')}_{exponent:g}"
      points = sweep.grid(config, lrs, betas, depths=depths)
      for name, point in points:
        sweep.run_point(name, point, folder, splits)
      rows = sweep.collect(folder, [name for name, _ in points])
      for row in rows:
        evaluation = make_results.last_eval(folder / "runs" / row["name"]) if row["status"] == "ok" else {}
        row["weight_change"] = evaluation.get("weight_change")
      out[f"{network} α={exponent:g}"] = rows
      SAVED.write_text(json.dumps(results, indent=1))
      print(network, exponent, [(r["hidden_layers"], r["learning_rate"], r.get("min_train_loss"),
                                 r.get("test_accuracy")) for r in rows], flush=True)
  return out


def figures(results) -> None:
  rows = results.get("depth", {}).values()
  series = {}
  for r in rows:
    if r.get("test_accuracy") is not None:
      series.setdefault(r["method"], []).append((2 * r["blocks"], r["test_accuracy"]))
  if series:
    plots.accuracy_vs_depth(series, FIGURES / "transformer_accuracy_vs_depth.png",
                            title="Transformer, MNIST, 1 epoch", xlabel="residual PC layers (2R)")
  deepest = {r["method"]: r["weight_change"] for r in rows
             if r.get("blocks") == 8 and r.get("weight_change")}
  if deepest:
    plots.layer_learning({f"{k}, 8 blocks": v for k, v in deepest.items()},
                         FIGURES / "transformer_layer_learning.png")


def parts_of(workdir, data_dir, splits, results) -> dict:
  return {"bp_lr": lambda: bp_lr(workdir, splits, data_dir, results),
          "depth": lambda: depth(workdir, splits, data_dir, results),
          "alpha": lambda: alpha(workdir, splits, data_dir, results)}


def main():
  make_results.study_main(__doc__, SAVED, parts_of, figures)


if __name__ == "__main__":
  main()
