"""Learning-rate sweeps end to end, and the figures drawn from their output."""

import json
import os
import sys

import numpy as np
import pytest

import mupc_flax as mf
from mupc_flax import diagnostics, metrics, plots
from programs import run_program


def sweep(workdir, data_dir, *extra):
  return run_program(
      [sys.executable, "-m", "mupc_flax.sweep", "--config=configs/default.py:smoke",
       f"--workdir={workdir}", "--learning_rates=0.1,0.05", "--inference_lrs=0.5,1e9",
       f"--config.data.data_dir={data_dir}",
       "--config.train.num_steps=20", "--config.eval_every_steps=20",
       "--config.checkpoint_every_steps=20", *extra],
      dict(os.environ), timeout=600)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, mnist_data_dir):
  workdir = tmp_path_factory.mktemp("sweep")
  result = sweep(workdir, mnist_data_dir, "--workers=2")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_two_by_two_sweep_writes_its_table(finished_sweep, mnist_data_dir):
  rows = json.loads((finished_sweep / "sweep.json").read_text())
  assert len(rows) == 4
  assert {(r["learning_rate"], r["inference_lr"]) for r in rows} == \
      {(0.1, 0.5), (0.1, 1e9), (0.05, 0.5), (0.05, 1e9)}
  for r in rows:
    if r["inference_lr"] == 1e9:  # diverges at once: recorded, not dropped
      assert r["status"] == "diverged" and "Non-finite" in r["error"]
    else:
      assert r["status"] == "ok" and r["test_accuracy"] > 0.1 and r["steps"] == 20
      assert 0 < r["min_train_loss"] <= r["final_train_loss"] + 1e-9
  header = (finished_sweep / "sweep.csv").read_text().splitlines()[0]
  assert header.startswith("name,width,hidden_layers,learning_rate,inference_lr,status")
  # A rerun resumes: every point is finished, nothing is trained again.
  again = sweep(finished_sweep, mnist_data_dir)
  assert again.returncode == 0 and "4 of 4 runs" in again.stdout
  assert json.loads((finished_sweep / "sweep.json").read_text()) == rows


def test_figures_from_real_sweep_output(finished_sweep, tmp_path):
  rows = json.loads((finished_sweep / "sweep.json").read_text())
  ok = [r for r in rows if r["status"] == "ok"]
  runs = {r["name"]: finished_sweep / "runs" / r["name"] for r in ok}
  last_eval = {name: [m for m in metrics.read(d / "metrics.jsonl") if m["split"] == "eval"][-1]
               for name, d in runs.items()}
  files = [
      plots.lr_transfer(rows, tmp_path / "transfer.png"),
      plots.training_curves({k: str(v) for k, v in runs.items()}, tmp_path / "curves.png"),
      plots.accuracy_vs_depth({"μPC": [(4, r["test_accuracy"]) for r in ok[:1]] + [(8, 0.5)]},
                              tmp_path / "depth.png"),
      plots.layer_learning({name: e["weight_change"] for name, e in last_eval.items()},
                           tmp_path / "layers.png"),
      plots.hessian_condition([{"parameterization": "mupc", "width": 64, "hidden_layers": h,
                                "condition": c} for h, c in [(4, 10.0), (8, 30.0)]],
                              tmp_path / "hessian.png"),
  ]
  for path in files:
    assert path.exists() and path.stat().st_size > 5_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The layer profile drawn is the run's own: one value per weight matrix (H + 1 = 5).
  assert all(len(e["weight_change"]) == 5 for e in last_eval.values())
  cli = run_program([sys.executable, "-m", "mupc_flax.plots", "sweep", str(finished_sweep)],
                    dict(os.environ))
  assert cli.returncode == 0 and (finished_sweep / "lr_transfer.png").exists()


def test_coordinate_check_figure(tmp_path):
  x = np.random.default_rng(0).standard_normal((16, 20)).astype(np.float32)
  y = np.eye(10, dtype=np.float32)[np.arange(16) % 10]
  # The figure of whatever the check measured (test_diagnostics checks the measures).
  make = lambda width, **kw: mf.ResidualPCN(20, width, 2, 10, **kw)
  results = {p: diagnostics.coordinate_check(make, (8, 16), x, y, parameterization=p, steps=1)
             for p in ("mupc", "sp")}
  path = plots.coordinate_check(results, tmp_path / "coord.png")
  assert path.stat().st_size > 5_000
