"""TensorFlow-free preparation of mnist, fashion_mnist and cifar10 as TFDS datasets.

tfds' own builders for these need TensorFlow to prepare. The builders here
subclass them (same name, version, features and record keys, hence the same
files as tfds would write) but parse the source files with Python's
``gzip``/``tarfile``/``pickle`` and encode PNGs with Pillow. The result is the
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
import gzip
import hashlib
import io
import math
import os
import pathlib
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.image_classification import cifar as tfds_cifar
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from mupc_flax.errors import UserError, check_writable_dir


class DataError(UserError):
  """A dataset cannot be prepared or read; the message says what to do."""


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
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

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
}
"""Each dataset's official download location, published SHA-256 checksums and the
environment variable naming a local folder with its files."""


def check_name(name: str) -> None:
  if name not in SOURCES:
    raise DataError(f"Unknown dataset {name!r}; choose one of {sorted(SOURCES)}.")


# --- Parsing the source files -------------------------------------------------


def _corrupt(path: pathlib.Path, why: str) -> DataError:
  return DataError(f"{path} is corrupt or truncated ({why}). Delete it and download it again "
                   "(or prepare without a local folder to download the official copy).")


def read_idx(path: pathlib.Path, trailing_shape: tuple[int, ...]) -> np.ndarray:
  """Reads a gzipped big-endian idx file of uint8: [n, *trailing_shape]."""
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise _corrupt(path, f"gzip: {e}") from None
  ndim = 1 + len(trailing_shape)
  header = 4 + 4 * ndim
  if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
    raise _corrupt(path, f"not an idx file of {ndim}-D uint8 data")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  if shape[1:] != trailing_shape:
    raise _corrupt(path, f"items of shape {shape[1:]}, expected {trailing_shape}")
  if len(data) != header + math.prod(shape):
    raise _corrupt(path, f"{len(data) - header} data bytes, the header promises {math.prod(shape)}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx_split(images_path: pathlib.Path, labels_path: pathlib.Path
                   ) -> tuple[np.ndarray, np.ndarray]:
  """MNIST-format images [n, 28, 28] and labels [n] (uint8), checked against each other."""
  images, labels = read_idx(images_path, (28, 28)), read_idx(labels_path, ())
  if len(images) != len(labels):
    raise _corrupt(labels_path, f"{len(labels)} labels for {len(images)} images in {images_path.name}")
  if labels.size and labels.max() > 9:
    raise _corrupt(labels_path, "labels outside 0…9")
  return images, labels


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles the CIFAR batches (dicts, lists, NumPy arrays) and nothing else,
  so a malicious file cannot run code."""

  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"),
              ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 store bytes

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
  """One pickled CIFAR-10 batch -> images [n, 32, 32, 3] uint8, labels [n]."""
  try:
    batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    pixels = np.asarray(batch[b"data"], np.uint8)
    labels = np.asarray(batch[b"labels"], np.int64)
  except Exception as e:  # Any parse failure means the same thing to the user.
    raise _corrupt(pathlib.Path(where), f"not a CIFAR-10 python batch: {e}") from None
  if pixels.ndim != 2 or pixels.shape[1] != 3072 or labels.shape != (pixels.shape[0],):
    raise _corrupt(pathlib.Path(where), f"data {pixels.shape}, labels {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise _corrupt(pathlib.Path(where), "labels outside 0…9")
  return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar10(folder: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
  """CIFAR-10 from ``folder``: the python tarball, or its extracted batch folder.

  Returns split -> (images, labels, label names).
  """
  members: dict[str, bytes] = {}
  archive = folder / CIFAR10_ARCHIVE
  if archive.exists():
    try:
      with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
          if member.isfile() and member.name.startswith(CIFAR10_FOLDER + "/"):
            members[member.name.split("/", 1)[1]] = tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
      raise _corrupt(archive, f"tar.gz: {e}") from None
  else:
    extracted = folder / CIFAR10_FOLDER
    for name in CIFAR10_BATCHES["train"] + CIFAR10_BATCHES["test"] + ["batches.meta"]:
      if (extracted / name).exists():
        members[name] = (extracted / name).read_bytes()
  where = archive if archive.exists() else folder / CIFAR10_FOLDER
  needed = CIFAR10_BATCHES["train"] + CIFAR10_BATCHES["test"] + ["batches.meta"]
  missing = [n for n in needed if n not in members]
  if missing:
    raise _corrupt(where, f"missing {missing}")
  try:
    meta = _ArrayUnpickler(io.BytesIO(members["batches.meta"]), encoding="bytes").load()
    names = [n.decode() for n in meta[b"label_names"]]
  except Exception as e:
    raise _corrupt(where, f"batches.meta: {e}") from None
  splits = {}
  for split, batch_names in CIFAR10_BATCHES.items():
    parts = [read_cifar_batch(members[n], f"{where}:{n}") for n in batch_names]
    splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                     names)
  return splits


def png(image: np.ndarray) -> bytes:
  """PNG bytes of an [H, W, C] uint8 image (Pillow; tfds would need TensorFlow)."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="png")
  return buffer.getvalue()


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


BUILDERS = {"mnist": MNIST, "fashion_mnist": FashionMNIST, "cifar10": Cifar10}


# --- Preparation --------------------------------------------------------------


def dataset_dir(name: str, data_dir: str | os.PathLike) -> pathlib.Path:
  """``<data_dir>/<name>/<version>``, where the prepared dataset lives."""
  check_name(name)
  return pathlib.Path(data_dir) / name / str(BUILDERS[name].VERSION)


def is_prepared(name: str, data_dir: str | os.PathLike) -> bool:
  """Whether dataset ``name`` is prepared in ``data_dir`` (its version folder is complete)."""
  # Only a complete preparation is ever renamed into place.
  return (dataset_dir(name, data_dir) / "dataset_info.json").exists()


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
                    f"holds {_required_files(name)}, or unset it to download them.")
  if name == "cifar10" and (folder / CIFAR10_FOLDER).is_dir():
    return folder
  missing = [f for f in _required_files(name) if not (folder / f).is_file()]
  if missing:
    raise DataError(
        f"The folder {folder} (from {source}) "
        f"lacks {missing} for {name}. Put the official files {_required_files(name)}"
        + (f" (or the extracted {CIFAR10_FOLDER}/ folder)" if name == "cifar10" else "")
        + f" there, or unset it to download them from {SOURCES[name].url}.")
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
    name: "mnist", "fashion_mnist" or "cifar10".
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
