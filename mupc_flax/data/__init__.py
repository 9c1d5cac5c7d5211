"""Datasets: reading the source files (``source_files``), TF-free TFDS preparation
(``builders``) and grain pipelines (``pipeline``)."""

import os

from mupc_flax.data.builders import SOURCES, DataError, is_prepared, prepare
from mupc_flax.data.pipeline import SPECS, Split, eval_batches, num_eval_batches, train_dataset

DATASETS = tuple(sorted(SOURCES))
"""The dataset names the project prepares: ``cifar10``, ``fashion_mnist``, ``mnist``."""


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (tfds' own default)."""
  return os.path.abspath(os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))


__all__ = ["DATASETS", "SOURCES", "SPECS", "DataError", "Split", "default_data_dir",
           "eval_batches", "is_prepared", "num_eval_batches", "prepare", "train_dataset"]
