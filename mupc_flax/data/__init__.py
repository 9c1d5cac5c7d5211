"""Datasets: reading the source files (``source_files``), TF-free TFDS preparation
(``builders``; the texts' in ``text``) and grain pipelines (``pipeline``)."""

import os

from mupc_flax.data import pipeline, text
from mupc_flax.data.builders import SOURCES, DataError, is_prepared, prepare
from mupc_flax.data.pipeline import (SPECS, Split, TextSplit, eval_batches, num_eval_batches,
                                     train_dataset)
from mupc_flax.data.text import TextSpec

DATASETS = tuple(sorted(SOURCES))
"""The dataset names the project prepares: ``cifar10``, ``fashion_mnist``, ``mnist``,
``shakespeare``, ``tiny_shakespeare``."""
TEXT_DATASETS = tuple(sorted(text.BUILDERS))
"""The text datasets (``text``): their examples are windows of characters."""


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (tfds' own default)."""
  return os.path.abspath(os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))


def spec_of(data_config) -> "pipeline.DatasetSpec | TextSpec":
  """The spec of ``config.data``: the images' shape and constants, or the
  text's vocabulary with the window ``config.data.context``."""
  if data_config.name in TEXT_DATASETS:
    return text.spec(data_config.name, data_config.context)
  return SPECS[data_config.name]


def open_split(data_config, split: str, data_dir: str, *, training: bool) -> "Split | TextSplit":
  """One split of the prepared dataset of ``config.data``: images (held in
  memory if ``in_memory``), or text windows (every start for training;
  for evaluation disjoint ones, at most ``eval_windows`` spread evenly)."""
  if data_config.name in TEXT_DATASETS:
    if training:
      return TextSplit(data_config.name, split, data_dir, data_config.context)
    return TextSplit(data_config.name, split, data_dir, data_config.context, disjoint=True,
                     max_windows=data_config.get("eval_windows") or None)
  return Split(data_config.name, split, data_dir, in_memory=data_config.in_memory)


__all__ = ["DATASETS", "SOURCES", "SPECS", "TEXT_DATASETS", "DataError", "Split", "TextSpec",
           "TextSplit", "default_data_dir", "eval_batches", "is_prepared", "num_eval_batches",
           "open_split", "prepare", "spec_of", "train_dataset"]
