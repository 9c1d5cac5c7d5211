"""TensorFlow-free preparation of the datasets as TFDS datasets: the images
(mnist, fashion_mnist, cifar10) here, the texts (shakespeare,
tiny_shakespeare) in ``text``.

tfds' own builders for these need TensorFlow to prepare. The builders here
subclass them (same name, version, features and record keys, hence the same
files as tfds would write) but parse the source files with Python's
``gzip``/``tarfile``/``pickle`` and encode PNGs with Pillow (``source_files``). The result is the
standard TFDS layout (``<data_dir>/<name>/<version>/`` with ArrayRecord shards
and ``dataset_info.json``), which ``tfds.data_source(name, data_dir=…)`` reads.

Sources, in order: a local folder (``manual_dir`` or the dataset's environment
variable, e.g. ``MUPC_MNIST_DIR``), else a download of the official files with
their SHA-256 checked. Preparation happens in a private temporary folder
inside ``data_dir`` and is published by one atomic rename, so a failed or
interrupted run never leaves anything that looks like a dataset.
"""

import contextlib
import dataclasses
import hashlib
import io
import os
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.request

import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.image_classification import cifar as tfds_cifar
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from mupc_flax.data import text
from mupc_flax.data.source_files import (CIFAR10_ARCHIVE, CIFAR10_FOLDER, DataError, png, read_cifar10,
                                         read_idx_split)
from mupc_flax.errors import check_writable_dir


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a dataset's files come from.

  Attributes:
    url: base URL of the official files (the same tfds uses; mirrors may be
      given with ``prepare(url=…)``).
    sha256: file name -> SHA-256 of the file as published.
    env_var: environment variable naming a local folder with the files.
  """

  url: str
  sha256: dict[str, str]
  env_var: str


MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SOURCES: dict[str, Source] = {
    "mnist": Source(
        url="https://storage.googleapis.com/cvdf-datasets/mnist/",
        sha256={
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        env_var="MUPC_MNIST_DIR",
    ),
    "fashion_mnist": Source(
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        sha256={
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        env_var="MUPC_FASHION_MNIST_DIR",
    ),
    "cifar10": Source(
        url="https://www.cs.toronto.edu/~kriz/",
        sha256={CIFAR10_ARCHIVE: "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
        env_var="MUPC_CIFAR10_DIR",
    ),
    # The offline archive only (../shared/data/shakespeare): there is no official download.
    "shakespeare": Source(
        url="",
        sha256={text.SHAKESPEARE_ARCHIVE:
                "ea55d2777fa227ec6daffd7196455aedd1aaf48edbdafd6ae94bfc1c82dd77e3"},
        env_var="MUPC_SHAKESPEARE_DIR",
    ),
    "tiny_shakespeare": Source(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/",
        sha256={text.TINY_SHAKESPEARE_FILE:
                "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"},
        env_var="MUPC_TINY_SHAKESPEARE_DIR",
    ),
}
"""Each dataset's official download location, published SHA-256 checksums and the
environment variable naming a local folder with its files."""


def check_name(name: str) -> None:
  if name not in SOURCES:
    raise DataError(f"Unknown dataset {name!r}; choose one of {sorted(SOURCES)}.")


# --- TFDS builders ------------------------------------------------------------

_INSTRUCTIONS = "Use `python -m mupc_flax.data prepare`, which supplies the source folder."


class _IdxSplits:
  """MNIST-format splits read from the manual folder with Python's gzip."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  def _split_generators(self, dl_manager):
    folder = pathlib.Path(dl_manager.manual_dir)
    return {split: self._generate_examples(folder / images, folder / labels)
            for split, (images, labels) in MNIST_FILES.items()}

  def _generate_examples(self, images_path, labels_path):
    images, labels = read_idx_split(images_path, labels_path)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": png(image[..., None]), "label": int(label)}


class MNIST(_IdxSplits, tfds_mnist.MNIST, skip_registration=True):
  """tfds' ``mnist`` 3.0.1, prepared without TensorFlow."""


class FashionMNIST(_IdxSplits, tfds_mnist.FashionMNIST, skip_registration=True):
  """tfds' ``fashion_mnist`` 3.0.1, prepared without TensorFlow."""


class Cifar10(tfds_cifar.Cifar10, skip_registration=True):
  """tfds' ``cifar10`` 3.0.2 (same features, ids and keys), from the python batches."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  def _split_generators(self, dl_manager):
    splits = read_cifar10(pathlib.Path(dl_manager.manual_dir))
    self.info.features["label"].names = splits["train"][2]
    return {split: self._generate_examples(f"{split}_", images, labels)
            for split, (images, labels, _) in splits.items()}

  def _generate_examples(self, prefix, images, labels):
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"id": f"{prefix}{index:05d}", "image": png(image), "label": int(label)}


BUILDERS = {"mnist": MNIST, "fashion_mnist": FashionMNIST, "cifar10": Cifar10} | text.BUILDERS


# --- Preparation --------------------------------------------------------------


def dataset_dir(name: str, data_dir: str | os.PathLike) -> pathlib.Path:
  """``<data_dir>/<name>/<version>``, where the prepared dataset lives."""
  check_name(name)
  return pathlib.Path(data_dir) / name / str(BUILDERS[name].VERSION)


def is_prepared(name: str, data_dir: str | os.PathLike) -> bool:
  """Whether dataset ``name`` is prepared in ``data_dir`` (its version folder is complete)."""
  # Only a complete preparation is ever renamed into place.
  return (dataset_dir(name, data_dir) / "dataset_info.json").exists()


def check_prepared(name: str, data_dir: str | os.PathLike) -> None:
  """DataError with the command to run unless dataset ``name`` is prepared in ``data_dir``."""
  check_name(name)
  if not is_prepared(name, data_dir):
    raise DataError(f"Dataset {name} is not prepared in {data_dir}. Run `python -m mupc_flax.data "
                    f"prepare --dataset={name} --data_dir={data_dir}` (add --manual_dir=FOLDER "
                    "offline).")


def _required_files(name: str) -> list[str]:
  return list(SOURCES[name].sha256)


def _local_folder(name: str, manual_dir: str | os.PathLike | None) -> pathlib.Path | None:
  folder = manual_dir or os.environ.get(SOURCES[name].env_var)
  if not folder:
    return None
  folder = pathlib.Path(folder).expanduser().absolute()
  source = "manual_dir" if manual_dir else SOURCES[name].env_var
  if not folder.is_dir():
    raise DataError(f"The folder {folder} (from {source}) does not exist. Give the folder that "
                    f"holds {_required_files(name)}" + (", or unset it to download them." if
                                                        SOURCES[name].url else "."))
  if name == "cifar10" and (folder / CIFAR10_FOLDER).is_dir():
    return folder
  missing = [f for f in _required_files(name) if not (folder / f).is_file()]
  if missing:
    raise DataError(
        f"The folder {folder} (from {source}) "
        f"lacks {missing} for {name}. Put the official files {_required_files(name)}"
        + (f" (or the extracted {CIFAR10_FOLDER}/ folder)" if name == "cifar10" else "")
        + (f" there, or unset it to download them from {SOURCES[name].url}." if SOURCES[name].url
           else " there."))
  return folder


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def download(name: str, folder: pathlib.Path, url: str | None = None, timeout: float = 60.0) -> None:
  """Downloads the official files of ``name`` into ``folder``, checking SHA-256."""
  source = SOURCES[name]
  base = url or source.url
  if not base:
    raise DataError(f"{name} has no download: give the folder that holds {_required_files(name)} "
                    f"as --manual_dir (config.data.manual_dir) or set {source.env_var}.")
  for file_name, expected in source.sha256.items():
    target = folder / file_name
    address = base.rstrip("/") + "/" + file_name
    logging.info("Downloading %s", address)
    try:
      with urllib.request.urlopen(address, timeout=timeout) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError) as e:
      raise DataError(
          f"Could not download {address} ({e}). If this machine is offline, put "
          f"{_required_files(name)} in a folder and pass it as manual_dir "
          f"(or set {source.env_var}).") from None
    found = _sha256(target)
    if found != expected:
      raise DataError(f"Checksum mismatch for {address}: SHA-256 {found}, expected {expected}. "
                      "The download is corrupt or the server sends another file; try again, or "
                      "use a verified local copy via manual_dir.")


def prepare(name: str, data_dir: str | os.PathLike, *, manual_dir: str | os.PathLike | None = None,
            url: str | None = None) -> pathlib.Path:
  """Prepares dataset ``name`` in ``data_dir`` unless it is there already.

  Args:
    name: a key of ``SOURCES`` (mnist, fashion_mnist, cifar10, shakespeare,
      tiny_shakespeare).
    data_dir: the TFDS data directory.
    manual_dir: a folder with the official source files; default the
      dataset's environment variable, else download.
    url: a mirror of the official base URL for downloads.

  Returns:
    The prepared dataset's folder.
  """
  check_name(name)
  target = dataset_dir(name, data_dir)
  if is_prepared(name, data_dir):
    return target
  data_dir = pathlib.Path(data_dir)
  check_writable_dir(data_dir, "The data directory")
  created = not data_dir.exists()
  data_dir.mkdir(parents=True, exist_ok=True)
  try:
    _prepare_into(name, data_dir, target, manual_dir, url)
  except OSError as e:  # e.g. the disk filled up while writing
    raise DataError(f"Preparing {name} in {data_dir} failed ({e.strerror or e}); nothing was "
                    "published. Fix the cause (e.g. free disk space) and run it again.") from e
  finally:
    if created and not any(data_dir.iterdir()):
      data_dir.rmdir()  # leave no trace of a failed first preparation
  logging.info("Prepared %s in %s", name, target)
  return target


def _prepare_into(name, data_dir, target, manual_dir, url):
  with tempfile.TemporaryDirectory(dir=data_dir, prefix=f".{name}-incomplete-") as tmp:
    tmp = pathlib.Path(tmp)
    folder = _local_folder(name, manual_dir)
    if folder is None:
      folder = tmp / "downloads"
      folder.mkdir()
      download(name, folder, url)
    logging.info("Preparing %s from %s", name, folder)
    builder = BUILDERS[name](data_dir=tmp / "prepared", file_format="array_record")
    # tfds prints "Downloading and preparing dataset Unknown size …" to stdout
    # although the files are local by now: the log line above says what happens.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_dir=tmp / "tfds_downloads",
                                   download_config=tfds.download.DownloadConfig(manual_dir=folder))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
      os.rename(tmp / "prepared" / name / target.name, target)
    except OSError:
      if not is_prepared(name, data_dir):  # not merely another process that won the race
        raise
