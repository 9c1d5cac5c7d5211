"""Figures: LR-transfer heatmaps, accuracy vs depth, training curves, coordinate
checks, per-layer learning, PC–BP cosine profiles and Hessian conditioning.
Needs matplotlib (``pip install -e '.[plots]'``). Each function writes one
image file.

    python -m mupc_flax.plots sweep runs/sweep            # -> runs/sweep/lr_transfer.png
    python -m mupc_flax.plots curves runs/a runs/b --out=curves.png
    python -m mupc_flax.plots cosines runs/a runs/b --out=cosines.png
"""

import importlib.util
import json
import math
import pathlib
import sys

if __name__ == "__main__" and importlib.util.find_spec("matplotlib") is None:
  sys.exit("error: the figures need matplotlib: pip install -e '.[plots]'.")

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from absl import app, flags  # noqa: E402

from mupc_flax import cli, metrics  # noqa: E402
from mupc_flax.errors import UserError, check_writable_dir  # noqa: E402


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if fig.get_layout_engine() is None:
    fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def lr_transfer(rows: list[dict], path, by: str = "width") -> pathlib.Path:
  """One heatmap per width (or ``by="hidden_layers"``) of the minimum training
  loss over η (rows) × β (columns), from sweep rows; diverged runs are grey
  and marked ×, each panel's best (η, β) is starred."""
  groups = sorted({r[by] for r in rows})
  etas = sorted({r["learning_rate"] for r in rows}, reverse=True)
  betas = sorted({r["inference_lr"] for r in rows}, reverse=True)
  finite = [r["min_train_loss"] for r in rows if r["status"] == "ok" and r.get("min_train_loss")]
  vmin, vmax = (np.log10(min(finite)), np.log10(max(finite))) if finite else (0, 1)
  fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 1, 3.2), squeeze=False,
                           layout="constrained")
  cmap = plt.get_cmap("viridis_r").with_extremes(bad="lightgrey")
  label = {"width": "N", "hidden_layers": "H"}[by]
  for ax, group in zip(axes[0], groups):
    grid = np.full((len(etas), len(betas)), np.nan)
    best = None
    for r in rows:
      if r[by] != group:
        continue
      i, j = etas.index(r["learning_rate"]), betas.index(r["inference_lr"])
      if r["status"] == "ok" and r.get("min_train_loss") is not None:
        grid[i, j] = np.log10(r["min_train_loss"])
        if best is None or grid[i, j] < grid[best]:
          best = (i, j)
      else:
        ax.text(j, i, "×", ha="center", va="center", color="black")
    image = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap=cmap)
    if best is not None:
      ax.text(best[1], best[0], "★", ha="center", va="center", color="red", fontsize=14)
    ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas], rotation=45)
    ax.set_yticks(range(len(etas)), [f"{e:g}" for e in etas])
    ax.set_xlabel("activity lr β")
    ax.set_ylabel("weight lr η")
    ax.set_title(f"{label} = {group}")
  fig.colorbar(image, ax=axes[0].tolist(), label="log10 min train loss", shrink=0.8)
  return _save(fig, path)


def accuracy_vs_depth(series: dict[str, list[tuple[int, float]]], path, title: str = "",
                      xlabel: str = "hidden layers H") -> pathlib.Path:
  """Test accuracy against depth (by default the number of hidden layers), one line per method."""
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  for name, points in series.items():
    depths, accuracies = zip(*sorted(points))
    ax.plot(depths, [100 * a for a in accuracies], "o-", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.legend()
  return _save(fig, path)


def training_curves(runs: dict[str, str], path) -> pathlib.Path:
  """Training loss and test accuracy against step, from each run's metrics.jsonl."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
  for name, workdir in runs.items():
    records = metrics.read(pathlib.Path(workdir) / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    evals = [(r["step"], 100 * r["accuracy"]) for r in records if r["split"] == "eval"]
    if train:
      left.plot(*zip(*train), label=name)
    if evals:
      right.plot(*zip(*evals), "o-", label=name)
  left.set_yscale("log")
  left.set_xlabel("step")
  left.set_ylabel("train loss")
  right.set_xlabel("step")
  right.set_ylabel("test accuracy (%)")
  left.legend()
  return _save(fig, path)


def coordinate_check(results: dict[str, dict[int, np.ndarray]], path) -> pathlib.Path:
  """muP-style coordinate check: per-layer activity RMS against width, one panel
  per parameterisation, one line per layer, after the last training step."""
  fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.2), squeeze=False)
  for ax, (name, by_width) in zip(axes[0], results.items()):
    widths = sorted(by_width)
    table = np.stack([by_width[w][-1] for w in widths])  # [widths, H + 1]
    for layer in range(table.shape[1]):
      ax.plot(widths, table[:, layer], "o-", color=plt.cm.viridis(layer / max(1, table.shape[1] - 1)),
              label="output" if layer == table.shape[1] - 1 else None)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width N")
    ax.set_ylabel("activity RMS (colour: layer)")
    ax.set_title(name)
  return _save(fig, path)


def layer_learning(profiles: dict[str, np.ndarray], path, ylabel: str = "‖W − W⁰‖ / ‖W⁰‖",
                   reference: dict[str, np.ndarray] | None = None) -> pathlib.Path:
  """A per-layer quantity (e.g. relative weight change) against layer index,
  on a log scale; ``reference`` adds dashed lines (e.g. the (β/B)^k decay)."""
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for name, values in profiles.items():
    values = np.asarray(values, float)
    ax.plot(np.arange(1, len(values) + 1), np.where(values > 0, values, np.nan), "o-", label=name)
  for name, values in (reference or {}).items():
    ax.plot(np.arange(1, len(values) + 1), values, "--", color="grey", label=name)
  ax.set_yscale("log")
  ax.set_xlabel("weight matrix ℓ (1 = input, L = readout)")
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  return _save(fig, path)


def cosine_profile(profiles: dict[str, np.ndarray], path, threshold: float = 0.9) -> pathlib.Path:
  """The per-matrix cosine between the PC and the BP weight gradient against
  layer index, one line per method; the dotted line is the reach threshold."""
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for name, values in profiles.items():
    ax.plot(np.arange(1, len(values) + 1), values, "o-", markersize=3, label=name)
  ax.axhline(threshold, color="grey", linestyle=":")
  ax.set_ylim(min(-0.05, *(min(v) for v in profiles.values())), 1.02)
  ax.set_xlabel("weight matrix ℓ (1 = input, L = readout)")
  ax.set_ylabel("cos(PC gradient, BP gradient)")
  ax.legend(fontsize=8)
  return _save(fig, path)


def hessian_condition(rows: list[dict], path) -> pathlib.Path:
  """Condition number of the activity Hessian against depth, one line per
  (parameterisation, width). ``rows``: dicts with those keys and "condition"."""
  fig, ax = plt.subplots(figsize=(5, 3.4))
  keys = sorted({(r["parameterization"], r["width"]) for r in rows})
  for parameterization, width in keys:
    points = sorted((r["hidden_layers"], r["condition"]) for r in rows
                    if (r["parameterization"], r["width"]) == (parameterization, width)
                    and math.isfinite(r["condition"]))
    if points:
      ax.plot(*zip(*points), "o-", label=f"{parameterization}, N = {width}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("hidden layers H")
  ax.set_ylabel("condition number of ∂²F/∂z²")
  ax.legend(fontsize=8)
  return _save(fig, path)


_OUT = flags.DEFINE_string("out", None, "Image file to write (default: lr_transfer.png in the "
                           "sweep folder; curves.png or cosines.png in the first WORKDIR).")
_USAGE = ("usage: python -m mupc_flax.plots sweep SWEEP_DIR | curves WORKDIR... | cosines WORKDIR... "
          "[--out=FILE]")


def _records(folder: pathlib.Path, name: str, made_by: str) -> pathlib.Path:
  if not (folder / name).is_file():
    raise UserError(f"{folder} has no {name}; give a folder written by {made_by}.")
  return folder / name


def main(argv: list[str]) -> None:
  command, folders = (argv[1], argv[2:]) if len(argv) > 2 else (None, [])
  if command not in ("sweep", "curves", "cosines") or (command == "sweep" and len(folders) != 1):
    raise app.UsageError(f"{_USAGE} (got {argv[1:] or 'nothing'}).")
  folders = [cli.resolve_path(f, command.upper()) for f in folders]
  if command == "sweep":
    rows = json.loads(_records(folders[0], "sweep.json", "python -m mupc_flax.sweep").read_text())
    if not rows:
      raise UserError(f"{folders[0]}/sweep.json holds no finished runs yet; rerun the sweep.")
    out = cli.resolve_path(_OUT.value or folders[0] / "lr_transfer.png", "--out")
    check_writable_dir(out.parent, "The folder of --out")
    by = "width" if len({r["width"] for r in rows}) > 1 else "hidden_layers"
    print(lr_transfer(rows, out, by=by))
    return
  paths = [_records(folder, "metrics.jsonl", "python -m mupc_flax.main (its --workdir)")
           for folder in folders]
  out = cli.resolve_path(_OUT.value or folders[0] / f"{command}.png", "--out")  # beside its input
  check_writable_dir(out.parent, "The folder of --out")
  if command == "curves":
    print(training_curves({folder.name: folder for folder in folders}, out))
    return
  profiles = {}
  for folder, path in zip(folders, paths):
    evals = [r for r in metrics.read(path) if r["split"] == "eval" and "pc_bp_cosines" in r]
    if not evals:
      raise UserError(f"{path} has no PC–BP cosines: they are logged at each evaluation of a PC run "
                      "with config.log_gradient_agreement = true.")
    profiles[f"{folder.name}, step {evals[-1]['step']}"] = evals[-1]["pc_bp_cosines"]
  print(cosine_profile(profiles, out))


if __name__ == "__main__":
  cli.run(main)
