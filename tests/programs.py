"""Running the command-line programs in subprocesses, and reading what they wrote."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = pathlib.Path(__file__).resolve().parent.parent
# Slow enough per step (≈10 ms) that a run can be killed between checkpoints.
RESUMABLE = ["--config.model.width=256", "--config.model.hidden_layers=8",
             "--config.train.num_steps=300", "--config.checkpoint_every_steps=50",
             "--config.log_every_steps=10", "--config.eval_every_steps=100"]


def command(workdir, data_dir, *overrides, config="configs/default.py:smoke"):
  return [sys.executable, "-m", "mupc_flax.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *overrides]


def environment(devices=1):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run(workdir, data_dir, *overrides, devices=1, config="configs/default.py:smoke", timeout=300):
  return subprocess.run(command(workdir, data_dir, *overrides, config=config), cwd=REPO,
                        env=environment(devices), capture_output=True, text=True, timeout=timeout)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(workdir, data_dir, *overrides, count=2, logs):
  """The program as ``count`` cooperating processes of one run (one device each),
  started; process i writes its console to ``logs/<i>.log``."""
  logs = pathlib.Path(logs)
  logs.mkdir(parents=True, exist_ok=True)
  port = free_port()
  processes = []
  for i in range(count):
    with open(logs / f"{i}.log", "w") as log:
      processes.append(subprocess.Popen(
          command(workdir, data_dir, *overrides, f"--coordinator_address=127.0.0.1:{port}",
                  f"--num_processes={count}", f"--process_id={i}"),
          cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=log))
  return processes


def wait_for(condition, timeout=120, what="the condition"):
  """Polls ``condition()`` every 10 ms until it is true; fails after ``timeout`` seconds."""
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      raise AssertionError(f"Timed out after {timeout} s waiting for {what}.")
    time.sleep(0.01)


def load_checkpoint(workdir, step, item="model"):
  """A saved item as {path: array} on this process's first device, whatever the
  topology it was saved from."""
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / item
  checkpointer = ocp.StandardCheckpointer()
  saved = checkpointer.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = checkpointer.restore(path, jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), saved))
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def checkpoint_steps(workdir):
  folder = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
