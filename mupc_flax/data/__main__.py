"""Prepares a dataset without TensorFlow.

    python -m mupc_flax.data prepare --dataset=mnist [--manual_dir=FOLDER] [--data_dir=DIR]

Without ``--manual_dir`` (or the dataset's environment variable, e.g.
``MUPC_MNIST_DIR``) the official files are downloaded and their SHA-256 checked.
"""

from absl import app, flags, logging

from mupc_flax import cli, data

_DATASET = flags.DEFINE_enum("dataset", None, list(data.DATASETS), "Dataset to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (default: $TFDS_DATA_DIR "
                                "or ~/tensorflow_datasets).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the official source files.")
_URL = flags.DEFINE_string("url", None, "Mirror of the official download URL.")

_USAGE = ("usage: python -m mupc_flax.data prepare --dataset=NAME [--manual_dir=FOLDER] "
          "[--data_dir=DIR]")


def main(argv):
  if argv[1:] != ["prepare"]:
    raise app.UsageError(f"{_USAGE} (got {argv[1:] or 'no command'}).")
  if _DATASET.value is None:
    raise app.UsageError(f"--dataset is required, one of {list(data.DATASETS)}; {_USAGE}.")
  logging.set_verbosity(logging.INFO)
  data_dir = (cli.resolve_path(_DATA_DIR.value, "--data_dir") if _DATA_DIR.value is not None
              else data.default_data_dir())
  manual_dir = _MANUAL_DIR.value and cli.resolve_path(_MANUAL_DIR.value, "--manual_dir")
  path = data.prepare(_DATASET.value, data_dir, manual_dir=manual_dir, url=_URL.value)
  print(f"{_DATASET.value} is ready in {path}")


if __name__ == "__main__":
  cli.run(main)
