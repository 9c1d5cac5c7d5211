"""Test setup: eight emulated CPU devices, before JAX initialises its backend."""

import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
# Compiling is most of this process's test time, and its programs are tiny and run a
# few steps: XLA skips its costly optimisations here (about 30% less CPU time). The
# programs the tests start run hundreds of steps, so they compile as a user's do.
jax.config.update("jax_disable_most_optimizations", True)
sys.path.insert(0, os.path.dirname(__file__))  # for the oracles module

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402


def shared_folder(tmp_path_factory, name) -> pathlib.Path:
  """A folder every process of this session shares: this one's, or under
  pytest-xdist (``-n 2``) the one all workers' temporary folders are in."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  folder = root / name
  folder.mkdir(exist_ok=True)
  return folder


@contextlib.contextmanager
def shared_lock(folder):
  """Held by one process of the session at a time (xdist workers take turns)."""
  with open(pathlib.Path(folder) / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory):
  """Real MNIST prepared offline from ``MUPC_MNIST_DIR`` (CI: ../shared/data/mnist),
  once per session (xdist workers share it)."""
  folder = os.environ.get("MUPC_MNIST_DIR")
  if not folder:
    pytest.skip("MUPC_MNIST_DIR is unset: point it at the folder with the four MNIST idx .gz "
                "files to run the real-data tests.")
  from mupc_flax import data
  root = shared_folder(tmp_path_factory, "tfds_real_shared")
  data_dir = root / "tfds"
  with shared_lock(root):  # the first worker prepares; the others find it prepared
    data.prepare("mnist", data_dir, manual_dir=folder)
  return data_dir


@pytest.fixture(scope="session")
def shakespeare_data_dir(tmp_path_factory):
  """The ``shakespeare`` dataset prepared offline from ``MUPC_SHAKESPEARE_DIR``,
  else ../shared/data/shakespeare beside the repository (CI has it), once
  per session."""
  folder = os.environ.get("MUPC_SHAKESPEARE_DIR") or str(
      pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare")
  if not (pathlib.Path(folder) / "shakespeare_gutenberg.tar.gz").is_file():
    pytest.skip(f"No shakespeare_gutenberg.tar.gz in {folder}: set MUPC_SHAKESPEARE_DIR to the "
                "folder that holds it to run the text tests.")
  from mupc_flax import data
  root = shared_folder(tmp_path_factory, "tfds_text_shared")
  data_dir = root / "tfds"
  with shared_lock(root):
    data.prepare("shakespeare", data_dir, manual_dir=folder)
  return data_dir


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for this session: the programs the tests
  run in subprocesses (through the environment: most compile the same small
  steps) and this process itself, whose tests build fresh models and steps that
  compile the same programs again and again. Compiling is most of the tests'
  time; a cached executable is the one the compiler would have produced."""
  from jax.experimental.compilation_cache import compilation_cache

  folder = str(shared_folder(tmp_path_factory, "jax_cache"))  # xdist workers share it too
  saved_env = {key: os.environ.get(key) for key in
               ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
  saved_config = {key: getattr(jax.config, key) for key in
                  ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  # JAX read its environment when this process imported it, above: set its config.
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()  # in case anything compiled (without a cache) before
  yield
  for key, value in saved_env.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  for key, value in saved_config.items():
    jax.config.update(key, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="session", autouse=True)
def decoded_data_cache(tmp_path_factory):
  """The decoded splits' cache in this session's folder, not the user's: every
  run in a subprocess after the first loads MNIST from it."""
  saved = os.environ.get("MUPC_CACHE_DIR")
  # Written by replacing a finished file: xdist workers share it safely.
  os.environ["MUPC_CACHE_DIR"] = str(shared_folder(tmp_path_factory, "decoded_splits"))
  yield
  if saved is None:
    os.environ.pop("MUPC_CACHE_DIR")
  else:
    os.environ["MUPC_CACHE_DIR"] = saved


def _finished_run(tmp_path_factory, data_dir, name, *overrides):
  """(workdir, the finished process) of the smoke config with ``overrides``,
  run once per session: xdist workers take the first one's, recorded beside it."""
  from programs import run
  root = shared_folder(tmp_path_factory, name)
  workdir, record = root / "workdir", root / "process.json"
  with shared_lock(root):
    if not record.exists():
      result = run(workdir, data_dir, *overrides)
      assert result.returncode == 0, result.stderr[-3000:]
      record.write_text(json.dumps(dict(args=result.args, returncode=result.returncode,
                                        stdout=result.stdout, stderr=result.stderr)))
  return workdir, subprocess.CompletedProcess(**json.loads(record.read_text()))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, mnist_data_dir, smoke_run_30_steps):
  """The smoke config's run as it stands (60 steps, one device): (workdir, the
  finished process). Tests only read it; one that runs on in a workdir copies it.

  It runs after the 30-step run, whose programs are the same: they come from the
  shared compilation cache, so that its first logged window measures steps, not
  compiles, whatever ran before (test_train checks the first window's throughput;
  run first on a cold cache, the eval and logging compiles fell into it)."""
  del smoke_run_30_steps  # run first: it fills the compilation cache
  return _finished_run(tmp_path_factory, mnist_data_dir, "smoke_run")


@pytest.fixture(scope="session")
def smoke_run_30_steps(tmp_path_factory, mnist_data_dir):
  """The smoke run cut to 30 steps (one device): its workdir, to read or to copy."""
  return _finished_run(tmp_path_factory, mnist_data_dir, "smoke_run_30", "--config.train.num_steps=30")[0]
