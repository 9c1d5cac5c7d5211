"""benchmarks/gpu_suite.py: its dry run on the CPU, the budget's plan, the check's failure."""

import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import gpu_suite  # noqa: E402


def test_dry_run_writes_every_case_and_passes_the_check(tmp_path):
  assert gpu_suite.main(["--dry_run", f"--out={tmp_path}"]) == 0
  report = json.loads((tmp_path / "suite.json").read_text())
  expected = {c.key for c in gpu_suite.CASES if c.network in gpu_suite.DRY and c.timed}
  assert set(report["cases"]) == expected
  for case in report["cases"].values():
    assert case["ms"] > 0 and math.isfinite(case["ms"])
    assert case["cuda_lowering"] in (None, "ok")
  assert report["checks"] and all(c["passed"] for c in report["checks"])
  table = (tmp_path / "suite.md").read_text()
  assert table.count("\n| ") == len(expected) + 1  # the header and one row per case


def test_budget_drops_the_slowest_case_first(capsys):
  estimates = dict(gpu_suite.ESTIMATES)
  kept, dropped, _ = gpu_suite.plan(gpu_suite.FULL, estimates, 1e9, 10, 5)
  assert not dropped
  estimates["vit/pc"] = (1000, 30)  # now the slowest by far
  kept, dropped, total = gpu_suite.plan(gpu_suite.FULL, estimates, 480, 10, 5)
  assert dropped[0][0] == "vit/pc" and "vit/pc" not in kept and total <= 480
  assert gpu_suite.main(["--plan_only", "--budget_s=0"]) == 0
  assert "dropped, slowest first" in capsys.readouterr().out


def test_a_pallas_xla_mismatch_stops_with_one_error_line(tmp_path, capsys):
  perturb = lambda quantities: {k: v * 1.1 for k, v in quantities.items()}
  assert gpu_suite.main(["--dry_run", "--budget_s=0", f"--out={tmp_path}"], perturb=perturb) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: the fused Pallas step differs from the XLA step")
  assert not json.loads((tmp_path / "suite.json").read_text())["checks"][-1]["passed"]
