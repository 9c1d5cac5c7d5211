"""Prepares a dataset without TensorFlow.

    python -m mupc_flax.data prepare --dataset=mnist [--manual_dir=FOLDER] [--data_dir=DIR]

Without ``--manual_dir`` (or the dataset's environment variable, e.g.
``MUPC_MNIST_DIR``) the official files are downloaded and their SHA-256 checked.
"""

import sys

from absl import app, flags, logging

from mupc_flax import data

_DATASET = flags.DEFINE_enum("dataset", None, list(data.DATASETS), "Dataset to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: $TFDS_DATA_DIR "
                                "or ~/tensorflow_datasets).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the official source files.")
_URL = flags.DEFINE_string("url", None, "Mirror of the official download URL.")


def main(argv):
  if argv[1:] != ["prepare"]:
    raise app.UsageError("Usage: python -m mupc_flax.data prepare --dataset=NAME "
                         "[--manual_dir=FOLDER] [--data_dir=DIR]")
  if _DATASET.value is None:
    raise app.UsageError(f"--dataset is required; one of {list(data.DATASETS)}.")
  logging.set_verbosity(logging.INFO)
  try:
    path = data.prepare(_DATASET.value, _DATA_DIR.value or data.default_data_dir(),
                        manual_dir=_MANUAL_DIR.value, url=_URL.value)
  except data.DataError as e:
    sys.exit(f"error: {e}")
  print(f"{_DATASET.value} is ready in {path}")


if __name__ == "__main__":
  app.run(main)
