"""Runs ``python -m <program> ...`` as a fork of one process that has already
imported the programs' libraries (JAX, Flax, Orbax, grain, tfds: about two
seconds a program), for the tests that run a program many times.

A child is a program run as a fresh interpreter would run it: its own argv,
environment, current directory and standard streams, the program's module
executed as ``__main__`` (runpy), and an ordinary interpreter exit (atexit
handlers, threads joined) with the program's exit status. Only what the
libraries read from the environment *at import* is the server's: a client
sends here only runs whose environment differs from the server's in
``LATE_VARIABLES``, which are read when used (``programs.run_program``).

The protocol, one JSON line each way: the client sends
``{"argv": [...], "env": {...}, "cwd": ..., "stdout": path, "stderr": path}``;
the server answers ``{"pid": n}`` once the child runs, then
``{"returncode": n}`` when it has ended. The server forks from its only
thread (its one other thread is OpenBLAS's idle pool, which handles forks),
and no JAX backend exists in it before the fork.
"""

import json
import os
import runpy
import sys

# Read when a program uses them, never at import: XLA reads its flags when the
# backend starts; the MUPC_ paths when data is loaded. pytest names the running
# test in PYTEST_CURRENT_TEST, which no program reads: were it in the key, every
# test would start a server of its own (4 s, against 0.6 s for a forked run).
LATE_VARIABLES = frozenset({"XLA_FLAGS", "MUPC_MNIST_DIR", "MUPC_SHAKESPEARE_DIR",
                            "PYTEST_CURRENT_TEST"})

# The programs' libraries, not the programs: a program module defines its flags
# when it runs, so it must not be imported here (it would define them twice).
LIBRARIES = ("jax", "flax.nnx", "optax", "orbax.checkpoint", "grain", "tensorflow_datasets",
             "ml_collections.config_flags", "matplotlib.pyplot", "mupc_flax.train",
             "mupc_flax.checkpointing", "mupc_flax.cluster", "mupc_flax.cli", "mupc_flax.data",
             "mupc_flax.variants", "mupc_flax.validation", "mupc_flax.metrics")


def _answer(message: dict) -> None:
  os.write(1, (json.dumps(message) + "\n").encode())


def serve() -> dict:
  """Answers requests until stdin closes (then exits); returns a request only
  in the child forked for it, with the child's streams, environment and
  directory already in place."""
  import importlib
  import matplotlib
  matplotlib.use("Agg")  # as mupc_flax.plots selects it, before pyplot
  for name in LIBRARIES:
    importlib.import_module(name)
  _answer({"ready": True})
  while line := sys.stdin.readline():
    request = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      for fd, path, mode in ((0, os.devnull, os.O_RDONLY),
                             (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                             (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, mode, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
      os.environ.clear()
      os.environ.update(request["env"])
      os.chdir(request["cwd"])
      sys.path[0] = os.getcwd()  # as `python -m` puts the current directory first
      return request
    _answer({"pid": pid})
    _, status = os.waitpid(pid, 0)
    _answer({"returncode": os.waitstatus_to_exitcode(status)})
  sys.exit(0)


if __name__ == "__main__":
  argv = serve()["argv"]
  assert argv[0] == "-m", argv
  sys.argv = argv[1:]  # runpy sets sys.argv[0] to the module's file, as `python -m` does
  runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
