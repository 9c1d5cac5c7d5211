"""Learning-rate transfer sweeps: a grid of (η, β) over widths or depths.

    python -m mupc_flax.sweep --config=configs/mnist_depth.py --workdir=runs/sweep \\
        --learning_rates=0.5,0.1,0.05,0.01 --inference_lrs=10,1,0.5,0.1 --widths=64,256

Every grid point is an ordinary training run of the config (with
``train.learning_rate`` = η, ``inference.lr`` = β and the width or
depth set) in ``<workdir>/runs/<name>``: rerunning the command resumes
unfinished points and skips finished ones. ``--workers=N`` runs N processes
side by side (on GPUs, one device each). The table goes to
``<workdir>/sweep.csv`` and ``sweep.json``: one row per run with its status
(ok, diverged, error), minimum training loss (the smallest logged train-loss
mean), final training loss and test accuracy. Diverged runs are kept.
"""

import csv
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mupc_flax import cli, data, metrics, train, validation
from mupc_flax.networks import kinds
from mupc_flax.errors import UserError, check_writable_dir

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file (with its argument).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory.")
_LEARNING_RATES = flags.DEFINE_list("learning_rates", ["0.5", "0.1", "0.05", "0.01"], "η values.")
_INFERENCE_LRS = flags.DEFINE_list("inference_lrs", ["1", "0.5", "0.1"], "β values.")
_WIDTHS = flags.DEFINE_list("widths", [], "Widths N (default: the config's).")
_DEPTHS = flags.DEFINE_list("depths", [], "Hidden layers H (default: the config's).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Runs in parallel, one process each.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: i/N, run every N-th point from the i-th.")
flags.mark_flags_as_required(["config", "workdir"])

COLUMNS = ["name", "width", "hidden_layers", "learning_rate", "inference_lr", "status",
           "min_train_loss", "final_train_loss", "test_accuracy", "test_loss", "steps", "seconds",
           "error"]


def grid(config, learning_rates, inference_lrs, widths=(), depths=()) -> list[tuple[str, object]]:
  """(name, config) for every point of widths × depths × η × β."""
  points = []
  depth_field = kinds.get(config.model.kind).depth_field
  if depths and depth_field is None:
    raise UserError(f"The {config.model.kind} network names no depth field: give it a NetworkKind "
                    "with depth_field to sweep --depths.")
  if widths and "width" not in config.model:
    raise UserError(f"The {config.model.kind} network has no width field to sweep --widths over.")
  for width, depth, lr, beta in itertools.product(widths or [config.model.get("width")],
                                                  depths or [config.model.get(depth_field) if depth_field else None],
                                                  learning_rates, inference_lrs):
    point = config.copy_and_resolve_references()
    if widths:
      point.model.width = int(width)
    if depths:
      point.model[depth_field] = int(depth)
    point.train.learning_rate, point.inference.lr = float(lr), float(beta)
    shape = [f"{prefix}{int(v)}" for prefix, v in (("w", width), ("h", depth)) if v is not None]
    points.append(("_".join(shape + [f"lr{float(lr):g}", f"beta{float(beta):g}"]), point))
  return points


def run_point(name: str, config, workdir: pathlib.Path, splits=None) -> dict:
  """Trains one grid point (resuming it if needed) and writes its result.json."""
  run_dir = workdir / "runs" / name
  done = run_dir / "result.json"
  if done.exists():
    return json.loads(done.read_text())
  try:
    hidden_layers = kinds.hidden_layers(config.model, data.spec_of(config.data))
  except (ValueError, TypeError):
    hidden_layers = None  # a shape the network refuses: the run reports it
  row = {"name": name, "width": config.model.get("width"), "hidden_layers": hidden_layers,
         "learning_rate": config.train.learning_rate, "inference_lr": config.inference.lr}
  start = time.perf_counter()
  try:
    final = train.train_and_evaluate(config, str(run_dir), splits=splits)
    if "preempted_at" in final:  # not a result: the rerun resumes it
      return row | {"status": "preempted", "steps": final["preempted_at"]}
    row |= {"status": "ok", "test_accuracy": float(final["accuracy"]), "test_loss": float(final["loss"])}
  except UserError as e:
    row |= {"status": "diverged" if "Non-finite" in str(e) else "error", "error": str(e)}
  row["seconds"] = time.perf_counter() - start
  log = metrics.read(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
  losses = [r["loss"] for r in log if r["split"] == "train"]
  if losses:
    row |= {"min_train_loss": min(losses), "final_train_loss": losses[-1],
            "steps": max(r["step"] for r in log)}
  if row["status"] != "error":  # errors are not results: retried on the next run
    run_dir.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row, indent=2))
  return row


def collect(workdir: pathlib.Path, names: list[str]) -> list[dict]:
  """The rows of the finished points, in grid order, also written to sweep.csv/.json."""
  rows = [json.loads(p.read_text()) for name in names
          if (p := workdir / "runs" / name / "result.json").exists()]
  (workdir / "sweep.json").write_text(json.dumps(rows, indent=2))
  with open(workdir / "sweep.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return rows


def _spawn_workers(count: int) -> None:
  """Reruns this command as ``count`` worker processes; on GPUs one device each."""
  gpus = [d.id for d in jax.local_devices()] if jax.default_backend() == "gpu" else []
  processes = []
  for i in range(count):
    env = dict(os.environ)
    if gpus:
      env["CUDA_VISIBLE_DEVICES"] = str(gpus[i % len(gpus)])
    processes.append(subprocess.Popen([sys.executable, "-m", "mupc_flax.sweep", *sys.argv[1:],
                                       f"--worker={i}/{count}"], env=env))
  failed = [p.args for p in processes if p.wait() != 0]
  if failed:
    raise UserError(f"{len(failed)} of {count} sweep workers failed (their errors are above); "
                    "rerun the same command to resume their points.")


def _numbers(flag, kind):
  try:
    return [kind(v) for v in flag.value]
  except ValueError:
    raise UserError(f"--{flag.name}={','.join(flag.value)}: give comma-separated "
                    f"{'integers' if kind is int else 'numbers'}.") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}: every option is a --flag=value.")
  config, workdir = _CONFIG.value, cli.resolve_path(_WORKDIR.value, "--workdir")
  cli.resolve_data_paths(config)
  points = grid(config, _numbers(_LEARNING_RATES, float), _numbers(_INFERENCE_LRS, float),
                _numbers(_WIDTHS, int), _numbers(_DEPTHS, int))
  check_writable_dir(workdir, "The sweep directory")
  workdir.mkdir(parents=True, exist_ok=True)
  if _WORKERS.value > 1 and _WORKER.value is None:
    _spawn_workers(_WORKERS.value)
  else:
    index, count = map(int, (_WORKER.value or "0/1").split("/"))
    splits = validation.load_splits(config)  # loaded once, shared by every run of this worker
    for name, point in points[index::count]:
      row = run_point(name, point, workdir, splits)
      if row["status"] == "preempted":
        logging.warning("Preempted during %s; rerun the same command to resume the sweep.", name)
        return
      logging.info("%s: %s", name, {k: row.get(k) for k in ("status", "min_train_loss", "test_accuracy")})
    if _WORKER.value is not None:
      return
  rows = collect(workdir, [name for name, _ in points])
  print(f"{len(rows)} of {len(points)} runs in {workdir / 'sweep.csv'}")


if __name__ == "__main__":
  cli.run(main)
