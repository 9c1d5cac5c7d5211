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
