"""Test setup: eight emulated CPU devices, before JAX initialises its backend."""

import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.dirname(__file__))  # for the oracles module

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory):
  """Real MNIST prepared offline from ``MUPC_MNIST_DIR`` (CI: ../shared/data/mnist)."""
  folder = os.environ.get("MUPC_MNIST_DIR")
  if not folder:
    pytest.skip("MUPC_MNIST_DIR is unset: point it at the folder with the four MNIST idx .gz "
                "files to run the real-data tests.")
  from mupc_flax import data
  data_dir = tmp_path_factory.mktemp("tfds_real")
  data.prepare("mnist", data_dir, manual_dir=folder)
  return data_dir


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """The programs the tests run in subprocesses share one persistent compilation
  cache: most compile the same small steps, and compiling is most of their time.
  (This process imported JAX above, so its own compilations are unaffected.)"""
  saved = {key: os.environ.get(key) for key in
           ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  yield
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
