"""Running the command-line programs in subprocesses, and reading what they wrote."""

import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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
  return run_program(command(workdir, data_dir, *overrides, config=config), environment(devices),
                     timeout=timeout)


def run_program(argv, env, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
  """``subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
  timeout=timeout)``; a ``python -m <program>`` run is a fork of a program
  server (tests/program_server.py) that has the libraries imported already,
  which saves starting them. Runs the server cannot stand for (another
  interpreter, or an environment that differs in what is read at import) start
  as processes of their own."""
  if argv[:2] != [sys.executable, "-m"]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  from program_server import LATE_VARIABLES
  key = frozenset((k, v) for k, v in env.items() if k not in LATE_VARIABLES)
  with _IDLE_LOCK:
    idle = _IDLE.setdefault(key, [])
    server = idle.pop() if idle else None
  server = server or _ProgramServer(env)
  try:
    return server.run(argv, env, cwd, timeout)
  finally:
    with _IDLE_LOCK:
      _IDLE[key].append(server)


_IDLE: dict[frozenset, list["_ProgramServer"]] = {}  # by environment; each serves one run at a time
_IDLE_LOCK = threading.Lock()


class _ProgramServer:
  """One tests/program_server.py process; it ends when this process does
  (its stdin closes)."""

  def __init__(self, env):
    self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "program_server.py")],
                                    cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    self.outputs = tempfile.TemporaryDirectory(prefix="program_server_")  # removed at exit
    self.pending = b""
    assert self._message(timeout=120) == {"ready": True}

  def _message(self, timeout) -> dict | None:
    """The server's next line, or None after ``timeout`` seconds (unbuffered
    reads: a buffered reader could hold a line that select() no longer sees)."""
    deadline = time.monotonic() + timeout
    while b"\n" not in self.pending:
      remaining = deadline - time.monotonic()
      if remaining <= 0 or not select.select([self.process.stdout], [], [], remaining)[0]:
        return None
      chunk = os.read(self.process.stdout.fileno(), 65536)
      assert chunk, f"the program server ended (exit {self.process.wait()})"
      self.pending += chunk
    line, self.pending = self.pending.split(b"\n", 1)
    return json.loads(line)

  def run(self, argv, env, cwd, timeout) -> subprocess.CompletedProcess:
    stdout, stderr = (pathlib.Path(self.outputs.name) / name for name in ("stdout", "stderr"))
    request = dict(argv=argv[1:], env=env, cwd=str(cwd), stdout=str(stdout), stderr=str(stderr))
    self.process.stdin.write((json.dumps(request) + "\n").encode())
    self.process.stdin.flush()
    pid = self._message(timeout=60)["pid"]
    ended = self._message(timeout)
    if ended is None:
      os.kill(pid, signal.SIGKILL)
      self._message(timeout=60)
      raise subprocess.TimeoutExpired(argv, timeout, stdout.read_text(), stderr.read_text())
    return subprocess.CompletedProcess(argv, ended["returncode"], stdout.read_text(),
                                       stderr.read_text())


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
