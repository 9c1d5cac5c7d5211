"""The deep-inference study of docs/results.md (section 9): which inference
reaches the bottom of a deep μPC network, and what training with it gives.

    MUPC_MNIST_DIR=../shared/data/mnist python docs/deep_inference.py --workdir=/tmp/mupc_deep
    ... --parts=profiles          # some parts, run in the order given

Parts (each resumable: runs are ordinary workdirs under --workdir, profiles are
cached in docs/deep_inference.json, which holds every number):

- profiles: at initialisation, on the first 64 test images, the per-matrix
  cosine and norm ratio of the PC weight gradient against BP's, for the
  paper's recipe, plain descent with the deep recipe's β and T, the deep recipe,
  and the equilibrium (momentum descent until the relative activity gradient
  is below 1e-6, at most 50·H steps).
- training: one epoch of MNIST, dense width 128 at H = 16, 32, 64; the
  paper's recipe, the deep recipe and BP.
- shapes: the same at shapes the recipe was not chosen on (dense 256 × 32,
  64 × 64).
- transfer: an (η, β) grid over two depths under the deep recipe, 300 steps.
- conv: the deep recipe on the convolutional network at 2 and 4 residual
  layers per stage (6 and 12 in all), at the config's η = 0.03 and at BP's
  0.01; the paper's recipe and BP there are section 7's runs, read from
  docs/results.json.
"""

import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_results  # noqa: E402  (its config loading and evaluation reading)

import mupc_flax as mf  # noqa: E402
from mupc_flax import data, diagnostics, plots, sweep  # noqa: E402
from mupc_flax.validation import build_model, inference_of  # noqa: E402

REPO = make_results.REPO
FIGURES = make_results.FIGURES
SAVED = REPO / "docs" / "deep_inference.json"

DENSE = [(128, 16), (128, 32), (128, 64)]
# Residual layers per stage: 6, 12 and 18 in all for the profiles. Training
# stops at 12: the deep recipe at 18 takes about 4 s a step here, over an
# hour an epoch.
CONV = [2, 4, 6]
CONV_TRAINING = [2, 4]
OTHER_SHAPES = [(256, 32), (64, 64)]
METHODS = {"paper": "", "deep": "deep", "bp": "bp"}


def dense_config(width, depth, variant=""):
  return make_results.load_config(
      "configs/mnist_depth.py", ",".join(filter(None, [f"width={width}", f"hidden_layers={depth}",
                                                       variant])))


def conv_config(residual, variant=""):
  return make_results.load_config(
      "configs/mnist_conv.py", ",".join(filter(None, [f"residual_layers={residual}", variant])))


def profile(model, x, y, inference) -> dict:
  start = time.perf_counter()
  agreement = diagnostics.pc_bp_agreement(model, x, y, inference)
  return {"layer_cosines": agreement["layer_cosines"], "norm_ratios": agreement["norm_ratios"],
          "reach": agreement["reach"], "steps": agreement["inference_steps"],
          "seconds": time.perf_counter() - start}


def profiles(splits, results) -> dict:
  """Per shape and method, the PC–BP agreement at initialisation."""
  out = results.setdefault("profiles", {})
  batch = data.pipeline.preprocess(*splits[1].read(np.arange(64)), splits[1].spec)
  x, y = batch["x"], batch["y"]
  shapes = ([(f"dense {w}x{h}", dense_config(w, h)) for w, h in DENSE + OTHER_SHAPES]
            + [(f"conv {3 * r} residual", conv_config(r)) for r in CONV])
  for name, config in shapes:
    model = build_model(config, splits[0].spec)
    # Same numbers; unrolling 3H-step loops of convolutions compiles for minutes.
    engine = mf.Engine(unroll=False)
    hidden = model.hidden_layers
    deep = inference_of(make_results.load_config("configs/mnist_depth.py", "deep"))
    deep = dataclasses.replace(deep, engine=engine).resolved(hidden)  # T = 2H on this network
    inferences = {
        "paper": mf.Inference(hidden, 0.5, engine=engine),
        "gd, deep's β and T": mf.Inference(deep.steps, deep.lr, engine=engine),
        "deep": deep,
        "equilibrium": mf.Inference(50 * hidden, deep.lr, "plain", optimizer="momentum",
                                    momentum=deep.momentum, tolerance=1e-6, engine=engine),
    }
    for method, inference in inferences.items():
      key = f"{name} | {method}"
      if key not in out:
        out[key] = profile(model, x, y, inference)
        SAVED.write_text(json.dumps(results, indent=1))
      row = out[key]
      cos = np.asarray(row["layer_cosines"])
      print(f"{key}: reach {row['reach']}, cos > 0.9: {int((cos > 0.9).sum())}/{cos.size}, "
            f"min cos {cos.min():.3f}, min ratio {min(row['norm_ratios']):.1e}, "
            f"{row['steps']} steps", flush=True)
  return out


def run(config, name, workdir, splits, data_dir) -> dict:
  """One training run (resumed or skipped if done); its row and last evaluation."""
  config.data.data_dir = data_dir
  config.checkpoint_every_steps = 10_000
  row = sweep.run_point(name, config, workdir, splits)
  evaluation = (make_results.last_eval(workdir / "runs" / name) if row["status"] == "ok" else {})
  keep = ("weight_change", "pc_bp_cosines", "reach")
  return row | {k: evaluation.get(k) for k in keep} | {"num_steps": evaluation.get("step")}


def training(workdir, splits, data_dir, results, dense_shapes, key) -> dict:
  out = results.setdefault(key, {})
  for width, depth in dense_shapes:
    for method, variant in METHODS.items():
      name = f"{method}_w{width}_h{depth}"
      out[name] = run(dense_config(width, depth, variant), name, workdir / key, splits, data_dir)
      print(name, out[name]["status"], out[name].get("test_accuracy"),
            round(out[name]["seconds"]), flush=True)
      SAVED.write_text(json.dumps(results, indent=1))
  return out


def conv(workdir, splits, data_dir, results) -> dict:
  """The deep recipe on the conv network; the paper's recipe and BP from section 7."""
  out = results.setdefault("conv", {})
  section7 = json.loads((REPO / "docs" / "results.json").read_text())["conv"]
  for method, label in (("paper", "μPC"), ("bp", "BP (Depth-μP)")):
    for row in section7[label]:
      out[f"{method}_conv_r{row['residual_layers'] // 3}"] = row
  for residual in CONV_TRAINING:
    # The config's deep η (0.03), and BP's η = 0.01 as for the dense network.
    for name, variant in ((f"deep_conv_r{residual}", "deep"),
                          (f"deep_conv_r{residual}_lr0.01", "deep,learning_rate=0.01")):
      out[name] = run(conv_config(residual, variant), name, workdir / "conv", splits, data_dir)
      print(name, out[name]["status"], out[name].get("test_accuracy"),
            round(out[name]["seconds"]), flush=True)
      SAVED.write_text(json.dumps(results, indent=1))
  return out


def transfer(workdir, splits, data_dir, results, steps=300) -> list:
  config = make_results.short_runs(dense_config(128, 8, "deep"), data_dir, steps)
  points = sweep.grid(config, ["0.03", "0.01", "0.003"], ["32", "16", "8"],
                      depths=["8", "32"])
  for name, point in points:
    sweep.run_point(name, point, workdir / "transfer", splits)
  results["transfer"] = sweep.collect(workdir / "transfer", [name for name, _ in points])
  return results["transfer"]


def figures(results) -> None:
  prof = results.get("profiles", {})
  for shape, file in (("dense 128x64", "deep_cosines_dense.png"),
                      ("conv 18 residual", "deep_cosines_conv.png")):
    series = {m: prof[f"{shape} | {m}"]["layer_cosines"] for m in
              ("paper", "gd, deep's β and T", "deep", "equilibrium") if f"{shape} | {m}" in prof}
    if series:
      plots.cosine_profile(series, FIGURES / file)
  runs = results.get("training", {}) | results.get("conv", {})
  for tag, file, label in (("w128_h64", "deep_layer_learning_dense.png", "dense 128 × 64"),
                           ("conv_r4", "deep_layer_learning_conv.png", "conv, 12 residual")):
    series = {f"{m}, {label}": runs[f"{m}_{tag}"]["weight_change"] for m in METHODS
              if runs.get(f"{m}_{tag}", {}).get("weight_change")}
    if series:
      plots.layer_learning(series, FIGURES / file)
  if results.get("transfer"):
    plots.lr_transfer(results["transfer"], FIGURES / "deep_transfer_depths.png", by="hidden_layers")


def parts_of(workdir, data_dir, splits, results) -> dict:
  return {
      "profiles": lambda: profiles(splits, results),
      "training": lambda: training(workdir, splits, data_dir, results, DENSE, "training"),
      "shapes": lambda: training(workdir, splits, data_dir, results, OTHER_SHAPES, "shapes"),
      "transfer": lambda: transfer(workdir, splits, data_dir, results),
      "conv": lambda: conv(workdir, splits, data_dir, results),
  }


def main():
  make_results.study_main(__doc__, SAVED, parts_of, figures)


if __name__ == "__main__":
  main()
