"""Runs the CPU experiments of docs/results.md and draws its figures.

    MUPC_MNIST_DIR=../shared/data/mnist python docs/make_results.py --workdir=/tmp/mupc_results

Every training run is an ordinary run in its own workdir under --workdir
(rerunning resumes and skips finished runs); figures go to docs/figures/ and
the numbers to docs/results.json. About an hour on 2 CPU cores.
"""

import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mupc_flax as mf
from mupc_flax import data, diagnostics, metrics, plots, sweep

REPO = pathlib.Path(__file__).resolve().parent.parent
FIGURES = REPO / "docs" / "figures"


def load_config(path: str, arg: str | None = None):
  """The config at ``path`` (relative to the repository) with the variant argument ``arg``."""
  from mupc_flax import configuration  # noqa: PLC0415
  return configuration.load(str(REPO / path) + (f":{arg}" if arg else ""))


def prepared_mnist(workdir: str) -> tuple[pathlib.Path, str, tuple]:
  """(the absolute workdir, its data directory, the (train, test) splits), with
  MNIST prepared there from ``$MUPC_MNIST_DIR``."""
  workdir = pathlib.Path(workdir).absolute()
  data_dir = str(workdir / "tfds")
  data.prepare("mnist", data_dir, manual_dir=os.environ.get("MUPC_MNIST_DIR"))
  return workdir, data_dir, tuple(data.Split("mnist", s, data_dir) for s in ("train", "test"))


def saved_results(path: pathlib.Path) -> dict:
  """The numbers saved in ``path`` so far, stamped with this run's date and versions."""
  results = json.loads(path.read_text()) if path.exists() else {}
  results["environment"] = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
                            "backend": jax.default_backend(), "cpus": os.cpu_count()}
  return results


def study_main(doc: str, saved: pathlib.Path, parts_of, figures) -> None:
  """The command line of a study script: ``--workdir`` and ``--parts``.

  ``parts_of(workdir, data_dir, splits, results)`` returns {name: callable};
  the named parts (all, by default) run in the order given, then the
  results are saved to ``saved`` and ``figures(results)`` draws them.
  """
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--parts", default="", help="comma-separated parts, in order (default: all)")
  args = parser.parse_args()
  workdir, data_dir, splits = prepared_mnist(args.workdir)
  results = saved_results(saved)
  parts = parts_of(workdir, data_dir, splits, results)
  for name in (args.parts or ",".join(parts)).split(","):
    parts[name]()
  saved.write_text(json.dumps(results, indent=1))
  figures(results)
  print("done:", saved)


def last_eval(workdir: pathlib.Path) -> dict:
  return [r for r in metrics.read(workdir / "metrics.jsonl") if r["split"] == "eval"][-1]


def depth_study(workdir, splits, data_dir, width=128, depths=(8, 16, 32)) -> dict:
  """(1) + (2): 1 epoch of MNIST per depth for standard PC, μPC and BP."""
  methods = {"standard PC": "sp", "μPC": "", "BP (Depth-μP)": "bp"}
  results = {}
  for label, variant in methods.items():
    for depth in depths:
      arg = ",".join(filter(None, [f"width={width}", f"hidden_layers={depth}", variant]))
      config = load_config("configs/mnist_depth.py", arg)
      config.data.data_dir = data_dir
      config.checkpoint_every_steps = 10_000
      name = f"{variant or 'mupc'}_w{width}_h{depth}"
      row = sweep.run_point(name, config, workdir / "depth", splits)
      evaluation = last_eval(workdir / "depth" / "runs" / name) if row["status"] == "ok" else {}
      results.setdefault(label, []).append({
          "hidden_layers": depth, "status": row["status"], "test_accuracy": row.get("test_accuracy"),
          "seconds": row["seconds"], "weight_change": evaluation.get("weight_change")})
      print(label, depth, row["status"], row.get("test_accuracy"), flush=True)
  return results


def conv_study(workdir, splits, data_dir, depths=(2, 4, 6)) -> dict:
  """(7): the convolutional network of configs/mnist_conv.py, 1 epoch of MNIST
  per depth (residual layers per stage) for standard PC, μPC and BP."""
  methods = {"standard PC": "sp", "μPC": "", "BP (Depth-μP)": "bp"}
  results = {}
  for label, variant in methods.items():
    for depth in depths:
      config = load_config("configs/mnist_conv.py", ",".join(filter(None, [f"residual_layers={depth}", variant])))
      config.data.data_dir = data_dir
      config.checkpoint_every_steps = 10_000
      name = f"{variant or 'mupc'}_r{depth}"
      row = sweep.run_point(name, config, workdir / "conv", splits)
      evaluation = last_eval(workdir / "conv" / "runs" / name) if row["status"] == "ok" else {}
      results.setdefault(label, []).append({
          "residual_layers": config.model.stages * depth, "hidden_layers": row["hidden_layers"],
          "status": row["status"],
          "test_accuracy": row.get("test_accuracy"), "seconds": row["seconds"],
          "weight_change": evaluation.get("weight_change")})
      print(label, depth, row["status"], row.get("test_accuracy"), round(row["seconds"]), flush=True)
  return results


def gradient_profile(x, y, width=128, depths=(8, 16, 32)) -> dict:
  """Per-layer norm of the PC weight gradient on one batch at init (paper's β, B)."""
  out = {}
  for depth in depths:
    model = mf.ResidualPCN(x.shape[1], width, depth, 10, rngs=nnx.Rngs(0))
    grads, _ = mf.pc_gradients(model, x, y, mf.Inference(depth, 0.5))
    out[depth] = diagnostics.layer_norms(model, jax.device_get(grads)).tolist()
  return out


def short_runs(config, data_dir: str, steps: int):
  """``config`` for a grid point of ``steps`` steps: logged every 25, one
  evaluation and one checkpoint at the end, no gradient-agreement probe."""
  config.data.data_dir = data_dir
  config.train.num_steps = steps
  config.log_every_steps = 25
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  config.log_gradient_agreement = False
  return config


def transfer_study(workdir, splits, data_dir, steps: int) -> dict:
  """(3): minimum training loss over an (η, β) grid, two widths and two depths."""
  learning_rates, inference_lrs = ["0.5", "0.1", "0.05", "0.01"], ["5", "1", "0.5", "0.1", "0.05"]
  studies = {"mupc_widths": ("", {"widths": ["64", "256"], "depths": ["8"]}),
             "mupc_depths": ("", {"widths": ["128"], "depths": ["8", "32"]}),
             "sp_widths": ("sp", {"widths": ["64", "256"], "depths": ["8"]})}
  out = {}
  for study, (variant, axes) in studies.items():
    config = short_runs(load_config("configs/mnist_depth.py", variant or None), data_dir, steps)
    points = sweep.grid(config, learning_rates, inference_lrs, **axes)
    for name, point in points:
      sweep.run_point(name, point, workdir / study, splits)
    out[study] = sweep.collect(workdir / study, [name for name, _ in points])
  return out


def hessian_study(x, y) -> list[dict]:
  """(4): condition number of the activity Hessian at init, one test example."""
  rows = []
  for parameterization in ("mupc", "sp"):
    for width in (16, 32, 64, 128):
      for depth in (2, 4, 8, 16, 32):
        if width * depth > 4096:
          continue
        model = mf.ResidualPCN(x.shape[1], width, depth, 10, parameterization=parameterization,
                               rngs=nnx.Rngs(0))
        spectrum = diagnostics.hessian_spectrum(model, jnp.asarray(x[0]), jnp.asarray(y[0]))
        rows.append({"parameterization": parameterization, "width": width, "hidden_layers": depth}
                    | spectrum)
        print("hessian", parameterization, width, depth, f"{spectrum['condition']:.3g}", flush=True)
  return rows


def hessian_during_training(workdir, splits, data_dir) -> list[tuple[int, float]]:
  config = load_config("configs/mnist_depth.py", "width=64,hidden_layers=8")
  config.data.data_dir = data_dir
  config.log_hessian = True
  config.eval_every_steps = 94
  config.checkpoint_every_steps = 10_000
  sweep.run_point("hessian_w64_h8", config, workdir / "hessian", splits)
  log = metrics.read(workdir / "hessian" / "runs" / "hessian_w64_h8" / "metrics.jsonl")
  return [(r["step"], r["hessian_condition"]) for r in log if r["split"] == "eval"]


def cosine_study() -> list[dict]:
  """(6): PC–BP gradient cosine at the inference equilibrium, linear μPC nets."""
  x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
  y = np.eye(4, dtype=np.float32)[np.arange(8) % 4]
  rows = []
  for width, depth in [(8, 4), (32, 4), (128, 4), (512, 4), (8, 16), (32, 16), (128, 16), (512, 16)]:
    model = mf.ResidualPCN(16, width, depth, 4, activation="linear", rngs=nnx.Rngs(0))
    agreement = diagnostics.pc_bp_agreement(model, x, y, mf.Inference(2000, 0.2 * 8, "plain"))
    rows.append({"width": width, "hidden_layers": depth, "cosine": agreement["cosine"]})
    print("cosine", width, depth, round(agreement["cosine"], 4), flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--transfer_steps", type=int, default=300)
  parser.add_argument("--studies", default="dense,conv",
                      help="dense (sections 1–6), conv (section 7), or both; the others' "
                           "numbers in docs/results.json are kept")
  args = parser.parse_args()
  studies = set(args.studies.split(","))
  workdir, data_dir, splits = prepared_mnist(args.workdir)
  test = data.pipeline.preprocess(*splits[1].read(np.arange(64)), splits[1].spec)
  x, y = jnp.asarray(test["x"]), jnp.asarray(test["y"])

  saved = REPO / "docs" / "results.json"
  results = json.loads(saved.read_text()) if saved.exists() else {}
  FIGURES.mkdir(parents=True, exist_ok=True)
  if "conv" in studies:
    results["conv"] = conv_study(workdir, splits, data_dir)
    saved.write_text(json.dumps(results, indent=1, default=float))
    conv = results["conv"]
    plots.accuracy_vs_depth({k: [(r["residual_layers"], r["test_accuracy"] or 0.0) for r in v]
                             for k, v in conv.items()}, FIGURES / "conv_accuracy_vs_depth.png",
                            title="MNIST, conv, 1 epoch (x: residual layers)")
    deepest = max(r["residual_layers"] for r in conv["μPC"])
    plots.layer_learning({f"{k}, {deepest} residual": r["weight_change"] for k, v in conv.items()
                          for r in v if r["residual_layers"] == deepest and r["weight_change"]},
                         FIGURES / "conv_layer_learning.png")
  if "dense" not in studies:
    return
  results["depth"] = depth_study(workdir, splits, data_dir)
  results["gradient_profile"] = gradient_profile(x, y)
  results["transfer"] = transfer_study(workdir, splits, data_dir, args.transfer_steps)
  results["hessian"] = hessian_study(x, y)
  results["hessian_training"] = hessian_during_training(workdir, splits, data_dir)
  results["coordinate_check"] = {
      p: {w: v.tolist() for w, v in diagnostics.coordinate_check(
          lambda width, **kw: mf.ResidualPCN(x.shape[1], width, 8, y.shape[1], **kw),
          (64, 128, 256, 512, 1024), x, y, parameterization=p, steps=3).items()}
      for p in ("mupc", "sp")}
  results["cosine"] = cosine_study()
  saved.write_text(json.dumps(results, indent=1, default=float))

  plots.accuracy_vs_depth({k: [(r["hidden_layers"], r["test_accuracy"] or 0.0) for r in v]
                           for k, v in results["depth"].items()},
                          FIGURES / "accuracy_vs_depth.png", title="MNIST, 1 epoch, N = 128")
  mupc_runs = {f"μPC, H = {r['hidden_layers']}": r["weight_change"] for r in results["depth"]["μPC"]}
  plots.layer_learning(mupc_runs | {f"BP, H = {r['hidden_layers']}": r["weight_change"]
                                    for r in results["depth"]["BP (Depth-μP)"]},
                       FIGURES / "layer_learning.png")
  beta_over_b = 0.5 / 64
  plots.layer_learning(
      {f"H = {h}": v[:-1] for h, v in results["gradient_profile"].items()},
      FIGURES / "gradient_profile.png", ylabel="‖∂F/∂W_ℓ‖ at init (one batch)",
      reference={f"(β/B)^k, H = {h}": np.asarray(v[-2]) * beta_over_b ** np.arange(h - 1, -1, -1.0)
                 for h, v in results["gradient_profile"].items()})
  for study, rows in results["transfer"].items():
    by = "width" if "widths" in study else "hidden_layers"
    plots.lr_transfer(rows, FIGURES / f"transfer_{study}.png", by=by)
  plots.hessian_condition(results["hessian"], FIGURES / "hessian_condition.png")
  plots.coordinate_check({p: {int(w): np.asarray(v) for w, v in d.items()}
                          for p, d in results["coordinate_check"].items()},
                         FIGURES / "coordinate_check.png")
  runs = {f"{k}, H = 32": workdir / "depth" / "runs" / f"{v}_w128_h32"
          for k, v in {"standard PC": "sp", "μPC": "mupc", "BP": "bp"}.items()}
  plots.training_curves({k: str(v) for k, v in runs.items()}, FIGURES / "training_curves.png")
  print("done:", FIGURES)


if __name__ == "__main__":
  main()
