"""The training program end to end: main, configs, checkpoints, resume, faults."""

import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from mupc_flax import configuration, data, metrics, optimizers, preemption, validation
from mupc_flax.errors import UserError
from mupc_flax.networks import kinds
from programs import (REPO, RESUMABLE, checkpoint_steps, command, environment, load_checkpoint,
                      run)


def tensorboard_scalars(workdir):
  """Reads the event files (TFRecord framing, Event protos): tag -> [(step, value)]."""
  scalars = {}
  for path in (pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*"):
    payload = path.read_bytes()
    offset = 0
    while offset < len(payload):
      (length,) = struct.unpack("<Q", payload[offset:offset + 8])
      event = event_pb2.Event.FromString(payload[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


# --- Configs ----------------------------------------------------------------------


def load_config(path, arg=None):
  return configuration.load(str(REPO / path) + (f":{arg}" if arg else ""))


@pytest.mark.parametrize("path,arg,expected", [
    ("configs/default.py", None, {"model.hidden_layers": 8, "model.width": 512, "train.learning_rate": 0.1}),
    ("configs/default.py", "smoke", {"train.num_steps": 60}),
    ("configs/mnist_depth.py", "hidden_layers=32,width=256", {"model.hidden_layers": 32, "model.width": 256}),
    ("configs/mnist_depth.py", "hidden_layers=64,bp", {"train.algorithm": "bp", "train.learning_rate": 1e-2}),
    ("configs/mnist_depth.py", "activation=linear,bp", {"train.learning_rate": 1e-3}),
    ("configs/mnist_depth.py", "activation=tanh", {"inference.lr": 1.0}),
    ("configs/mnist_depth.py", "activation=tanh,lr=0.25", {"inference.lr": 0.25}),
    ("configs/mnist_depth.py", "sp", {"model.parameterization": "sp", "inference.lr": 1e-2}),
    ("configs/mnist_128.py", None, {"model.hidden_layers": 128, "train.num_epochs": 5}),
    ("configs/mnist_128.py", "bp", {"train.learning_rate": 5e-3}),
    ("configs/fashion_mnist_128.py", None, {"data.name": "fashion_mnist", "train.num_epochs": 15,
                                           "train.learning_rate": 0.05}),
    ("configs/cifar10_128.py", None, {"data.name": "cifar10", "train.loss": "ce", "train.batch_size": 128,
                                     "inference.lr": 0.01, "data.augment": True}),
    ("configs/mnist_conv.py", None, {"model.kind": "conv", "model.residual_layers": 6,
                                     "train.learning_rate": 0.1, "inference.lr": 0.5}),
    ("configs/mnist_conv.py", "residual_layers=2,sp", {"model.residual_layers": 2,
                                                       "model.parameterization": "sp"}),
    ("configs/mnist_conv.py", "smoke,bp", {"model.width": 8, "train.algorithm": "bp"}),
    ("configs/cifar10_conv.py", None, {"model.kind": "conv", "data.name": "cifar10", "train.loss": "ce",
                                       "data.augment": True, "inference.lr": 0.01}),
    ("configs/mnist_depth.py", "deep", {"inference.optimizer": "momentum",
                                        "inference.momentum": 0.9, "inference.steps_per_layer": 2,
                                        "inference.lr": 16.0, "train.learning_rate": 1e-2,
                                        "train.lr_schedule": "cosine"}),
    # Overrides win over variants wherever they stand; variants see them.
    ("configs/mnist_depth.py", "learning_rate=0.003,batch_size=128,deep",
     {"train.learning_rate": 0.003, "inference.lr": 32.0}),
    ("configs/cifar10_conv.py", "deep", {"inference.lr": 32.0, "inference.steps_per_layer": 2}),
    ("configs/mnist_conv.py", "deep", {"train.learning_rate": 0.03, "train.lr_schedule": "cosine"}),
    ("configs/mnist_conv.py", "deep,learning_rate=0.01", {"train.learning_rate": 0.01}),
    ("configs/mnist_128.py", "deep", {"train.learning_rate": 5e-3, "model.hidden_layers": 128}),
    ("configs/mnist_depth.py", "epc", {"inference.method": "errors", "inference.steps": 1,
                                       "inference.lr": 0.64, "train.optimizer_eps": 1e-12,
                                       "train.lr_schedule": "cosine"}),
    # ε only where the optimizer has one; an override wins over the variant's.
    ("configs/mnist_depth.py", "train.optimizer=sgd,epc", {"train.optimizer_eps": 0.0}),
    ("configs/mnist_depth.py", "inference.optimizer=nesterov,momentum=0.5", {"inference.optimizer": "nesterov", "inference.momentum": 0.5}),
    ("configs/mnist_depth.py", "steps=3,step_guard=2", {"inference.steps": 3, "inference.step_guard": 2}),
    ("configs/default.py", "closed_form=false,gradient_layout=per_layer", {"engine.closed_form": False, "engine.gradient_layout": "per_layer"}),
    ("configs/mnist_depth.py", "epc,optimizer_eps=0", {"train.optimizer_eps": 0.0}),
    ("configs/mnist_transformer.py", None, {"model.kind": "transformer", "model.width": 64,
                                            "model.blocks": 4, "model.patch_size": 7,
                                            "model.heads": 4, "train.learning_rate": 0.03}),
    ("configs/mnist_transformer.py", "smoke,bp", {"model.width": 16, "model.blocks": 1,
                                                  "train.algorithm": "bp", "train.learning_rate": 1e-2}),
    ("configs/mnist_transformer.py", "depth_exponent=1", {"model.depth_exponent": 1.0}),
    # A config's own recipe sets the η of bp and epc, wherever it stands.
    ("configs/mnist_transformer.py", "bp,adamw", {"train.algorithm": "bp", "train.loss": "ce",
                                                  "train.optimizer": "adamw",
                                                  "train.weight_decay": 0.01,
                                                  "train.warmup_steps": 100,
                                                  "train.learning_rate": 0.03}),
    ("configs/mnist_transformer.py", "adamw,epc", {"inference.method": "errors",
                                                   "train.learning_rate": 0.03,
                                                   "train.optimizer_eps": 1e-12}),
    ("configs/mnist_transformer.py", "batch_size=128,limits",
     {"model.pc_layer": "block", "model.layer_norm": False, "model.depth_exponent": 1.0,
      "train.optimizer_scaling": "per_role", "train.learning_rate": 0.1, "train.loss": "ce",
      "inference.lr": 57.6, "inference.steps_per_layer": 1}),
    ("configs/mnist_transformer.py", "limits,epc,learning_rate=0.3",
     {"inference.method": "errors", "inference.lr": 0.64, "train.learning_rate": 0.3,
      "model.pc_layer": "block"}),
    ("configs/cifar10_transformer.py", None, {"model.kind": "transformer", "model.patch_size": 4,
                                              "data.name": "cifar10", "train.loss": "ce"}),
])
def test_configs_hold_the_paper_settings(path, arg, expected):
  config = load_config(path, arg)
  validation.validate_config(config, num_devices=1, num_processes=1)
  for field, value in expected.items():
    assert validation.field(config, field) == value, field


@pytest.mark.parametrize("field,value,message", [
    ("model.width", 0, "config.model \\(dense\\) cannot be built for mnist .*width to be a positive integer, got 0"),
    ("train.batch_size", -4, "config.train.batch_size must be positive"),
    ("model.activation", "swish", "Unknown activation 'swish'"),
    ("model.parameterization", "ntk", "Unknown parameterization 'ntk'"),
    ("data.name", "imagenet", "config.data.name = 'imagenet' is not one of"),
    ("train.algorithm", "ep", "config.train.algorithm = 'ep' is not one of"),
    ("train.optimizer", "adamm", "not an optax optimizer"),
    ("train.optimizer,train.optimizer_eps", ("sgd", 1e-12), "optax.sgd takes no eps"),
    ("train.optimizer_eps", -1e-8, "config.train.optimizer_eps must be non-negative"),
    ("train.weight_decay", 0.1, "optax.adam takes no weight_decay"),
    ("train.optimizer_scaling", "mup", "config.train.optimizer_scaling = 'mup' is not one of"),
    ("train.warmup_steps", -1, "config.train.warmup_steps must be non-negative"),
    ("train.batch_size", 60, "divisible by the number of devices \\(8\\)"),
    ("model.precision", "fp16", "precision must be one of"),
    # The engine's and inference's own checks, named by their field.
    ("engine.kernel", "triton", "config.engine.kernel: Engine kernel must be one of"),
    ("engine.layout", "batched", "config.engine.layout: Engine layout must be one of"),
    ("engine.kernel,engine.layout", ("pallas", "per_layer"), "config.engine.layout: .*stacked layout"),
    ("inference.optimizer", "adagrad", "config.inference.optimizer: Unknown inference optimizer 'adagrad'"),
    ("inference.momentum", 1.0, "config.inference.momentum: Inference momentum must be in"),
    ("inference.tolerance", -0.1, "config.inference.tolerance: Inference tolerance must be in"),
    ("inference.momentum", 0.9, "config.inference.momentum: .*needs optimizer='momentum' or 'nesterov'"),
    ("inference.optimizer,engine.kernel", ("momentum", "pallas"),
     "config.inference.optimizer: .*runs plain gradient descent"),
    ("inference.steps_per_layer", 0, "config.inference.steps_per_layer: .*positive integer"),
    ("inference.method,inference.schedule", ("errors", "wavefront"),
     "config.inference.schedule: .*no wavefront"),
    ("model.depth_exponent", 1.5, "depth_exponent must be in \\[0, 1\\]"),
    # A field the chosen kind does not take is an error naming it.
    ("model.blocks", 4, "config.model.blocks is not a field of the dense network"),
    ("model.kind", "unet", "Unknown network kind 'unet'"),
    ("model.kind", "no_such_module:make", "Cannot import 'no_such_module'"),
])
def test_config_errors_are_clear(field, value, message):
  config = load_config("configs/default.py")
  fields, values = field.split(","), value if "," in field else (value,)
  with config.unlocked():  # a config file may set any field; the program checks them
    for field, value in zip(fields, values):
      section, name = field.split(".")
      config[section][name] = value
  with pytest.raises(UserError, match=message):
    validation.validate_config(config, num_devices=8, num_processes=1)


@pytest.mark.parametrize("eps", [0.0, 1e-12])
def test_weight_optimizer_takes_the_configured_eps(eps):
  """Adam's first step is −η g / (|g| + ε) (bias-corrected, by hand): at a
  gradient of 1e-8, the default ε = 1e-8 halves it, ε = 1e-12 does not."""
  config = load_config("configs/default.py", "lr_schedule=cosine")
  config.train.optimizer_eps = eps
  tx = optimizers.weight_optimizer(config, num_steps=10)
  g = np.full((3,), 1e-8, np.float32)
  updates, _ = tx.update(g, tx.init(np.zeros(3, np.float32)))
  expected = -config.train.learning_rate * g / (np.abs(g) + (eps or 1e-8))
  np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-5)


@pytest.mark.parametrize("arg,expected", [
    ("kind=conv", {"model.residual_layers": 6, "model.width": 16}),  # its own fields, defaults
    ("kind=conv,residual_layers=2,smoke", {"model.residual_layers": 2, "model.width": 8}),
    ("smoke,kind=transformer", {"model.blocks": 1, "model.width": 16, "model.heads": 2}),
])
def test_a_kind_override_brings_the_kinds_own_fields(arg, expected):
  config = load_config("configs/default.py", arg)
  validation.validate_config(config, num_devices=8, num_processes=1)
  assert "hidden_layers" not in config.model
  for field, value in expected.items():
    assert validation.field(config, field) == value, field


def test_a_plain_factory_is_a_kind_whose_fields_are_its_keyword_arguments(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO))
  kind = kinds.get("examples.mixer:make_network")
  assert kind.fields == {"width": 32, "blocks": 4, "patch_size": 7, "parameterization": "mupc"}
  assert kind.smoke == {} and kind.depth_field is None
  config = kinds.model_config("examples.mixer:make_network", blocks=2)
  assert dict(config) == {"kind": "examples.mixer:make_network", "width": 32, "blocks": 2,
                          "patch_size": 7, "parameterization": "mupc"}
  with pytest.raises(ValueError, match="takes no field 'hidden_layers'"):
    kinds.model_config("examples.mixer:make_network", hidden_layers=3)
  with pytest.raises(ValueError, match="has no network factory 'missing'"):
    kinds.get("examples.mixer:missing")


@pytest.mark.parametrize("arg,engine_kernel,message", [
    ("kind=transformer,heads=5", "xla", "width \\(64\\) must be a multiple of heads \\(5\\)"),
    ("kind=transformer,patch_size=5", "xla", "must be multiples of the patch size 5"),
    ("kind=conv", "pallas", "config.engine does not fit config.model \\(conv\\).*dense network"),
])
def test_the_networks_own_refusals_come_before_any_compute(arg, engine_kernel, message):
  config = load_config("configs/default.py", arg)
  config.engine.kernel = engine_kernel
  with pytest.raises(validation.TrainingError, match=message):
    validation.validate_config(config, num_devices=8, num_processes=1)


# --- End to end -------------------------------------------------------------------


def test_smoke_run_writes_metrics_events_and_checkpoints(smoke_run):
  workdir, result = smoke_run
  records = metrics.read(workdir / "metrics.jsonl")
  train_records = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in train_records] == [10, 20, 30, 40, 50, 60]
  assert [r["step"] for r in evals] == [30, 60]
  assert evals[-1]["examples"] == 10_000 and evals[-1]["accuracy"] > 0.3  # chance is 0.1
  assert train_records[-1]["loss"] < train_records[0]["loss"]
  assert len(train_records[0]["layer_energies"]) == 5  # H = 4 hidden layers + output
  # Which layers learn: per-matrix update norms (train) and change from init (eval).
  assert len(train_records[0]["update_norms"]) == 5 and min(train_records[0]["update_norms"]) >= 0
  change = evals[-1]["weight_change"]
  assert len(change) == 5 and change[-1] > 0  # the readout moved
  assert train_records[0]["examples_per_second"] > 0 and "eta_seconds" in train_records[0]
  assert checkpoint_steps(workdir) == [30, 60]
  assert (workdir / "config.json").exists()
  scalars = tensorboard_scalars(workdir)
  assert [s for s, _ in scalars["train/loss"]] == [10, 20, 30, 40, 50, 60]
  np.testing.assert_allclose(scalars["eval/accuracy"][-1][1], evals[-1]["accuracy"], rtol=1e-6)
  assert "[eval] step 60/60" in result.stderr  # the console log
  assert re.search(r"^I.*\[train\] step 10/60: .* eta \d+s$", result.stderr, re.M), result.stderr[-2000:]
  assert "eta_seconds" not in result.stderr and "OpenCV" not in result.stderr
  # The first step's compile is not throughput (before, it made the first window 10× slower;
  # a loaded machine was seen to slow one window 4×).
  assert train_records[0]["examples_per_second"] > 0.15 * train_records[1]["examples_per_second"]
  # One TensorBoard curve per layer for each per-layer value.
  assert [s for s, _ in scalars["train/layer_energies/5"]] == [10, 20, 30, 40, 50, 60]
  assert {f"eval/{k}/{l}" for k in ("weight_change", "pc_bp_cosines") for l in range(1, 6)} <= set(scalars)
  assert "train/update_norms/1" in scalars


@pytest.mark.parametrize("seconds,text", [(0.4, "0s"), (45, "45s"), (750.4, "12m30s"), (11100, "3h05m")])
def test_eta_is_formatted(seconds, text):
  assert metrics.format_duration(seconds) == text


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tmp_path, mnist_data_dir):
  straight = subprocess.Popen(  # the uninterrupted run, beside the killed one
      command(tmp_path / "straight", mnist_data_dir, *RESUMABLE), cwd=REPO, env=environment(),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  workdir = tmp_path / "killed"
  process = subprocess.Popen(command(workdir, mnist_data_dir, *RESUMABLE), cwd=REPO,
                             env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (workdir / "checkpoints" / "50").is_dir() and time.time() < deadline:
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  at_kill = checkpoint_steps(workdir)
  assert 50 in at_kill and 300 not in at_kill, at_kill  # killed mid-run

  resumed = run(workdir, mnist_data_dir, *RESUMABLE)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from step" in resumed.stderr
  _, errors = straight.communicate(timeout=300)
  assert straight.returncode == 0, errors[-3000:]
  a, b = load_checkpoint(tmp_path / "straight", 300), load_checkpoint(workdir, 300)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  for name in ("optimizer",):
    for key, value in load_checkpoint(tmp_path / "straight", 300, name).items():
      np.testing.assert_array_equal(value, load_checkpoint(workdir, 300, name)[key])
  timing = ("examples_per_second", "eta_seconds")
  strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]
  assert strip(metrics.read(workdir / "metrics.jsonl")) == \
      strip(metrics.read(tmp_path / "straight" / "metrics.jsonl"))


@pytest.mark.slow
def test_sigterm_and_ctrl_c_save_the_current_step_and_exit_cleanly(tmp_path, mnist_data_dir):
  """SIGTERM (a preemption) to one run and SIGINT (Ctrl-C) to another, side by
  side, each soon after its checkpoint 50."""
  lines = {signal.SIGTERM: "Preempted", signal.SIGINT: "Interrupted"}
  workdirs = {signum: tmp_path / signum.name for signum in lines}
  logs = {signum: tmp_path / f"{signum.name}.log" for signum in lines}
  processes = {}
  for signum in lines:
    with open(logs[signum], "w") as log:
      processes[signum] = subprocess.Popen(command(workdirs[signum], mnist_data_dir, *RESUMABLE),
                                           cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                                           stderr=log)
  deadline, saw_50, pending = time.time() + 240, {}, set(lines)
  while pending and time.time() < deadline:
    for signum in list(pending):
      if processes[signum].poll() is not None:  # ended by itself: the checks below say how
        pending.discard(signum)
      elif signum not in saw_50 and (workdirs[signum] / "checkpoints" / "50").is_dir():
        saw_50[signum] = time.time()
      elif signum in saw_50 and time.time() > saw_50[signum] + 0.2:
        processes[signum].send_signal(signum)
        pending.discard(signum)
    time.sleep(0.01)
  for signum in pending:  # past the deadline: signal anyway, and let the checks say what ran
    processes[signum].send_signal(signum)
  for signum, line in lines.items():
    processes[signum].wait(timeout=120)
    stderr = logs[signum].read_text()
    assert processes[signum].returncode == 0, stderr[-3000:]
    assert f"{line}: saved step " in stderr and "; rerun the same command to resume." in stderr
    saved = int(stderr.split(f"{line}: saved step ")[1].split()[0])
    workdir = workdirs[signum]
    assert 50 < saved < 300 and checkpoint_steps(workdir)[-1] == saved, (line, saved)
    # The meta item records the step the checkpoint was saved at.
    assert f'"step": {saved}' in (workdir / "checkpoints" / str(saved) / "meta" / "metadata").read_text()


def test_a_second_ctrl_c_stops_at_once_without_saving():
  """The first Ctrl-C asks the loop to save and stop; the second raises
  KeyboardInterrupt at once (the program's one line, status 130)."""
  # What was there before: Python's handler, or SIG_IGN for a job a shell started in the background.
  before = signal.getsignal(signal.SIGINT)
  with preemption.notice(checkpointer=None) as preempted:
    assert not preempted(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert preempted(2) and preempted.signal == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is before  # put back


@pytest.mark.slow
def test_eight_devices_end_to_end_match_one(tmp_path, mnist_data_dir, smoke_run_30_steps):
  one = smoke_run_30_steps  # the same command on one device
  eight = run(tmp_path / "eight", mnist_data_dir, "--config.train.num_steps=30", devices=8)
  assert eight.returncode == 0, eight.stderr[-3000:]
  assert "8 devices in the mesh" in eight.stderr
  a, b = load_checkpoint(one, 30), load_checkpoint(tmp_path / "eight", 30)
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5 * np.abs(a[key]).max(), err_msg=key)
  eval_one = [r for r in metrics.read(one / "metrics.jsonl") if r["split"] == "eval"]
  eval_eight = [r for r in metrics.read(tmp_path / "eight" / "metrics.jsonl") if r["split"] == "eval"]
  assert abs(eval_one[-1]["accuracy"] - eval_eight[-1]["accuracy"]) <= 2e-4


# The multi-process run is the 30-step smoke run of conftest.py, which it must match. (The local
# launcher's runs are tests/test_faults.py's, against a run of start_processes.)
SMALL = ["--config.train.num_steps=30"]


def assert_same_run(reference, other):
  a, b = load_checkpoint(reference, 30), load_checkpoint(other, 30)
  for key in a:
    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5 * np.abs(a[key]).max(), err_msg=key)
  last = lambda w: [r for r in metrics.read(w / "metrics.jsonl") if r["split"] == "eval"][-1]
  assert abs(last(reference)["accuracy"] - last(other)["accuracy"]) <= 2e-4


FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for srun: runs the command as local tasks with the variables srun sets.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < FAKE_SLURM_TASKS; i++)); do
  SLURM_JOB_ID=4242 SLURM_STEP_NODELIST=localhost SLURM_NTASKS=$FAKE_SLURM_TASKS \
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.slow
def test_slurm_script_runs_a_detected_multi_process_job(tmp_path, mnist_data_dir, smoke_run_30_steps):
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "srun").write_text(FAKE_SRUN)
  (fake_bin / "srun").chmod(0o755)
  (fake_bin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (fake_bin / "python").chmod(0o755)
  env = dict(environment(devices=1), PATH=f"{fake_bin}:{os.environ['PATH']}", FAKE_SLURM_TASKS="2",
             CONFIG="configs/default.py:smoke", RUN_NAME="smoke", RUNS_DIR=str(tmp_path / "runs"),
             SLURM_SUBMIT_DIR=str(REPO))
  result = subprocess.run(["bash", "launch/slurm.sbatch", f"--config.data.data_dir={mnist_data_dir}",
                           *SMALL], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "process 1 of 2" in result.stderr  # jax.distributed found the job from SLURM's variables
  assert_same_run(smoke_run_30_steps, tmp_path / "runs" / "smoke")


# --- Faults -------------------------------------------------------------------------


def test_corrupt_newest_checkpoint_is_skipped_and_a_changed_config_is_recorded(tmp_path, mnist_data_dir,
                                                                            smoke_run):
  """The rerun, with another learning rate, falls back from the unreadable
  checkpoint 60 to 30, names the changed fields, keeps config.json beside
  config.30.json, and drops what was logged after step 30 (from metrics.jsonl
  and TensorBoard alike) before logging it again: each step appears once."""
  workdir = pathlib.Path(shutil.copytree(smoke_run[0], tmp_path / "run"))  # a finished smoke run
  for blob in (workdir / "checkpoints" / "60" / "model").rglob("d/*"):
    blob.write_bytes(b"garbage")
  resumed = run(workdir, mnist_data_dir, "--config.train.num_steps=90",
                "--config.train.learning_rate=0.05")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Checkpoint 60" in resumed.stderr and "unreadable" in resumed.stderr
  assert "Resumed from step 30" in resumed.stderr
  assert checkpoint_steps(workdir) == [30, 60, 90]
  set_aside = list((workdir / "checkpoints.unreadable").iterdir())
  assert len(set_aside) == 1 and set_aside[0].name.startswith("60-")  # kept for inspection

  assert "train.learning_rate: 0.1 → 0.05; train.num_steps: 60 → 90." in resumed.stderr
  assert "config.json is kept; this run's config, from step 30 on, is in config.30.json" in resumed.stderr
  kept = json.loads((workdir / "config.json").read_text())
  assert kept["train"]["learning_rate"] == 0.1 and kept["train"]["num_steps"] == 60
  assert json.loads((workdir / "config.30.json").read_text())["train"]["learning_rate"] == 0.05
  steps = [s for s, _ in tensorboard_scalars(workdir)["train/loss"]]
  assert sorted(steps) == list(range(10, 100, 10)), steps
  assert [r["step"] for r in metrics.read(workdir / "metrics.jsonl") if r["split"] == "train"] == \
      list(range(10, 100, 10))


def test_non_finite_energy_stops_and_keeps_the_last_good_checkpoint(tmp_path, mnist_data_dir,
                                                                    smoke_run_30_steps):
  workdir = pathlib.Path(shutil.copytree(smoke_run_30_steps, tmp_path / "run"))  # 30 steps done
  before = load_checkpoint(workdir, 30)
  diverging = run(workdir, mnist_data_dir, "--config.train.num_steps=60",
                  "--config.inference.lr=1e9")
  assert diverging.returncode == 1
  last_line = diverging.stderr.strip().splitlines()[-1]
  assert last_line.startswith("error: Non-finite energy at step 31"), last_line
  assert checkpoint_steps(workdir) == [30]
  after = load_checkpoint(workdir, 30)
  for key in before:
    np.testing.assert_array_equal(before[key], after[key])


# --- Real data ----------------------------------------------------------------------


@pytest.mark.slow
def test_one_epoch_of_real_mnist_learns_down_the_stack_in_order(tmp_path, mnist_data_dir):
  """μPC, width 128, H = 16, the paper's recipe, one epoch of real MNIST, one
  device: at least 93 % test accuracy (the reference library: 94.0 % at H = 8).

  The error reaches layer H−k only through k inference steps, each scaling it
  by about β/B, so no matrix may move more than the one above it (the readout
  aside). A lower matrix that moves while those above it do not is numerical
  noise: this run once caught XLA rounding the feed-forward start differently
  in two places, which moved the first hidden matrix by 1e-6.
  """
  done = run(tmp_path, mnist_data_dir, "--config.checkpoint_every_steps=10000",
             config="configs/mnist_depth.py:width=128,hidden_layers=16", timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  final = [r for r in metrics.read(tmp_path / "metrics.jsonl") if r["split"] == "eval"][-1]
  assert final["examples"] == 10_000 and final["accuracy"] >= 0.93, final["accuracy"]
  change = np.asarray(final["weight_change"])
  below_readout = change[:-1]
  assert below_readout[-1] > 1.0, change  # the top hidden matrices learn
  assert np.all(np.diff(below_readout) >= 0), change


def _role_rule(role, fan_in, fan_out, num_layers, alpha):
  """μPC's per-role (learning-rate, ε) factors, written out: entry η, ε/N_out;
  readout η, ε/N_in; hidden (residual and inner) η/√N · L^(α−1), ε/N^(3/2) · L^(−α)."""
  return {"entry": (1.0, 1.0 / fan_out), "readout": (1.0, 1.0 / fan_in),
          "residual": (fan_in ** -0.5 * num_layers ** (alpha - 1), fan_in ** -1.5 * num_layers ** -alpha),
          "inner": (fan_in ** -0.5 * num_layers ** (alpha - 1), fan_in ** -1.5 * num_layers ** -alpha)}[role]


# name -> (config.model, L, {param path: (role, fan_in, fan_out)}), on MNIST (784 inputs, 10 classes).
PER_ROLE_NETWORKS = {
    "dense": (dict(kind="dense", width=16, hidden_layers=3), 4,
              {"input_layer": ("entry", 784, 16), "hidden": ("residual", 16, 16),
               "readout": ("readout", 16, 10)}),
    "conv": (dict(kind="conv", width=4, stages=2, residual_layers=1), 5,
             {"entries/0": ("entry", 9, 4), "entries/1": ("entry", 36, 8),
              "stacks/0": ("residual", 36, 4), "stacks/1": ("residual", 72, 8),
              "head": ("readout", 8, 10)}),
    "transformer_block": (dict(kind="transformer", width=8, blocks=2, heads=2, pc_layer="block",
                               layer_norm=False), 4,
                          {"embed": ("entry", 49 + 16, 8), "attention_qkv": ("inner", 8, 24),
                           "attention_out": ("residual", 8, 8), "mlp_up": ("inner", 8, 32),
                           "mlp_down": ("residual", 32, 8), "head": ("readout", 8, 10)}),
}


@pytest.mark.parametrize("network", sorted(PER_ROLE_NETWORKS))
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("optimizer,weight_decay", [("adam", 0.0), ("adamw", 0.1)])
def test_per_role_optimizer_steps_by_the_rule(network, alpha, optimizer, weight_decay):
  """The first step of each weight, by hand: −η s_lr · g/(|g| + 1e-8 s_ε) − η λ W
  (Adam's bias-corrected first step; AdamW's decay λ/s_lr at η s_lr)."""
  model_fields, num_layers, roles = PER_ROLE_NETWORKS[network]
  config = load_config("configs/default.py")
  fields = dict(model_fields)
  config.model = kinds.model_config(fields.pop("kind"), depth_exponent=alpha, **fields)
  config.train.update(optimizer=optimizer, weight_decay=weight_decay, learning_rate=0.01,
                      optimizer_scaling="per_role")
  validation.validate_config(config, num_devices=1, num_processes=1)
  model = kinds.build(config.model, data.pipeline.SPECS["mnist"], 0)
  params = nnx.state(model, nnx.Param)
  tx = optimizers.weight_optimizer(config, num_steps=10, params=params)
  # The forms nnx.Optimizer hands the optimizer: the Param state, then pure arrays.
  pure = nnx.as_pure(params)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda w: (10.0 ** rng.uniform(-12, -6, w.shape)
                                  * rng.choice([-1, 1], w.shape)).astype(np.float32), pure)
  updates, _ = tx.update(grads, tx.init(params), pure)
  by_path = lambda tree: {"/".join(map(str, p)): np.asarray(v) for p, v in
                          nnx.traversals.flatten_mapping(nnx.to_pure_dict(tree)).items()}
  flat, grads, updates = by_path(pure), by_path(grads), by_path(updates)
  assert {p.rsplit("/", 1)[0] for p in flat} == set(roles)
  for path, g in grads.items():
    lr_scale, eps_scale = _role_rule(*roles[path.rsplit("/", 1)[0]], num_layers, alpha)
    adam = -0.01 * lr_scale * g / (np.abs(g) + 1e-8 * eps_scale)
    decay = -0.01 * weight_decay * flat[path]
    # Within 2e-5 of each term's size: optax's float32 bias correction (1 − b2)
    # is off by 1e-5, and the two terms may cancel.
    np.testing.assert_array_less(np.abs(updates[path] - adam - decay),
                                 2e-5 * (np.abs(adam) + np.abs(decay)) + 1e-15, err_msg=path)


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_warmup_then_the_schedule(lr_schedule):
  """SGD's step t is −η_t g: η t/w over the w warm-up steps, then η, or the
  cosine from η at w to 0 at the run's end."""
  config = load_config("configs/default.py")
  config.train.update(optimizer="sgd", learning_rate=0.5, warmup_steps=4, lr_schedule=lr_schedule)
  tx = optimizers.weight_optimizer(config, num_steps=10)
  state, g = tx.init(np.zeros(1, np.float32)), np.ones(1, np.float32)
  for t in range(10):
    update, state = tx.update(g, state)
    want = 0.5 * t / 4 if t < 4 else (
        0.5 if lr_schedule == "constant" else 0.25 * (1 + np.cos(np.pi * (t - 4) / 6)))
    np.testing.assert_allclose(float(update[0]), -want, rtol=1e-6, atol=1e-7, err_msg=str(t))
  config.train.warmup_steps = 10
  with pytest.raises(UserError, match="warmup_steps = 10 must be below the run's 10 steps"):
    optimizers.weight_optimizer(config, num_steps=10)


def test_per_role_scaling_needs_each_weights_scale():
  class Plain(nnx.Module):  # a network of one's own, built without layer_options
    def __init__(self):
      self.kernel = nnx.Param(np.ones((2, 2), np.float32))

  config = load_config("configs/default.py", "optimizer_scaling=per_role")
  with pytest.raises(UserError, match="build the network's layers with "
                                                "Parameterization.layer_options"):
    optimizers.weight_optimizer(config, 10, nnx.state(Plain(), nnx.Param))
