"""The deep-inference study of docs/results.md (section 9): which inference
reaches the bottom of a deep μPC network, and what training with it gives.

    MUPC_MNIST_DIR=../shared/data/mnist python docs/deep_inference.py --workdir=/tmp/mupc_deep
    ... --parts=profiles          # one part: profiles, eta, training, shapes, transfer

Parts (each resumable: runs are ordinary workdirs under --workdir, profiles are
cached in docs/deep_inference.json, which holds every number):

- profiles: at initialisation, on the first 64 test images, the per-matrix
  cosine and norm ratio of the PC weight gradient against BP's, for the
  paper's recipe, plain descent with the deep recipe's steps, the deep recipe,
  and the equilibrium (momentum descent until the relative activity gradient
  is below 1e-6, at most 200·H steps).
- eta: the deep recipe's weight learning rate, dense width 128, H = 32.
- training: one epoch of MNIST, dense width 128 at H = 16, 32, 64 and the
  convolutional network at 2, 4, 6 residual layers per stage; the paper's
  recipe, the deep recipe and BP.
- shapes: the same at shapes the recipe was not chosen on (dense 256 × 32,
  64 × 64).
- transfer: an (η, β) grid over two depths under the deep recipe.
"""

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_results  # noqa: E402  (its config loading and evaluation reading)

import mupc_flax as mf  # noqa: E402
from mupc_flax import data, diagnostics, metrics, plots, sweep  # noqa: E402
from mupc_flax.train import build_model, inference_of  # noqa: E402

REPO = make_results.REPO
FIGURES = make_results.FIGURES
SAVED = REPO / "docs" / "deep_inference.json"

DENSE = [(128, 16), (128, 32), (128, 64)]
CONV = [2, 4, 6]  # residual layers per stage: 6, 12, 18 in all
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
    if config.model.kind == "conv":
      model.unroll_inference = False  # same numbers; unrolling 3H-step loops compiles for minutes
    hidden = model.hidden_layers
    deep = inference_of(make_results.load_config("configs/mnist_depth.py", "deep"), model)
    inferences = {
        "paper": mf.Inference(hidden, 0.5),
        "gd, 3H steps": mf.Inference(3 * hidden, 0.5),
        "deep": deep,
        "equilibrium": mf.Inference(200 * hidden, deep.lr, "plain", optimizer="momentum",
                                    momentum=deep.momentum, tolerance=1e-6),
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


def eta(workdir, splits, data_dir, results) -> list:
  rows = []
  for learning_rate in (0.003, 0.01, 0.03, 0.1):
    config = dense_config(128, 32, f"deep,learning_rate={learning_rate}")
    rows.append(run(config, f"deep_w128_h32_lr{learning_rate:g}", workdir / "eta", splits, data_dir)
                | {"learning_rate": learning_rate})
    print("eta", learning_rate, rows[-1]["status"], rows[-1].get("test_accuracy"), flush=True)
  results["eta"] = rows
  return rows


def training(workdir, splits, data_dir, results, dense_shapes, conv_depths, key) -> dict:
  out = results.setdefault(key, {})
  for method, variant in METHODS.items():
    for width, depth in dense_shapes:
      name = f"{method}_w{width}_h{depth}"
      out[name] = run(dense_config(width, depth, variant), name, workdir / key, splits, data_dir)
      print(name, out[name]["status"], out[name].get("test_accuracy"),
            round(out[name]["seconds"]), flush=True)
      SAVED.write_text(json.dumps(results, indent=1))
    for residual in conv_depths:
      name = f"{method}_conv_r{residual}"
      out[name] = run(conv_config(residual, variant), name, workdir / key, splits, data_dir)
      print(name, out[name]["status"], out[name].get("test_accuracy"),
            round(out[name]["seconds"]), flush=True)
      SAVED.write_text(json.dumps(results, indent=1))
  return out


def transfer(workdir, splits, data_dir, results, steps=300) -> list:
  config = dense_config(128, 8, "deep")
  config.data.data_dir = data_dir
  config.train.num_steps = steps
  config.log_every_steps = 25
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  config.log_gradient_agreement = False
  points = sweep.grid(config, ["0.03", "0.01", "0.003", "0.001"], ["64", "32", "16", "8"],
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
              ("paper", "gd, 3H steps", "deep", "equilibrium") if f"{shape} | {m}" in prof}
    if series:
      plots.cosine_profile(series, FIGURES / file)
  train = results.get("training", {})
  for tag, file, label in (("w128_h64", "deep_layer_learning_dense.png", "dense 128 × 64"),
                           ("conv_r6", "deep_layer_learning_conv.png", "conv, 18 residual")):
    series = {f"{m}, {label}": train[f"{m}_{tag}"]["weight_change"] for m in METHODS
              if train.get(f"{m}_{tag}", {}).get("weight_change")}
    if series:
      plots.layer_learning(series, FIGURES / file)
  if results.get("transfer"):
    plots.lr_transfer(results["transfer"], FIGURES / "deep_transfer_depths.png", by="hidden_layers")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--parts", default="profiles,eta,training,shapes,transfer")
  args = parser.parse_args()
  parts = set(args.parts.split(","))
  workdir = pathlib.Path(args.workdir).absolute()
  data_dir = str(workdir / "tfds")
  data.prepare("mnist", data_dir, manual_dir=os.environ.get("MUPC_MNIST_DIR"))
  splits = tuple(data.Split("mnist", s, data_dir) for s in ("train", "test"))
  results = json.loads(SAVED.read_text()) if SAVED.exists() else {}
  results["environment"] = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
                            "backend": jax.default_backend(), "cpus": os.cpu_count()}
  if "profiles" in parts:
    profiles(splits, results)
  if "eta" in parts:
    eta(workdir, splits, data_dir, results)
  if "training" in parts:
    training(workdir, splits, data_dir, results, DENSE, CONV, "training")
  if "shapes" in parts:
    training(workdir, splits, data_dir, results, OTHER_SHAPES, [], "shapes")
  if "transfer" in parts:
    transfer(workdir, splits, data_dir, results)
  SAVED.write_text(json.dumps(results, indent=1))
  figures(results)
  print("done:", SAVED)


if __name__ == "__main__":
  main()
