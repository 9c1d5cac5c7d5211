"""Reading the datasets' source files: MNIST's idx files and CIFAR-10's
python batches, with Python's ``gzip``/``tarfile``/``pickle`` (no
TensorFlow), and PNG encoding with Pillow. A file that does not parse is a
``DataError`` naming it and what to do."""

import gzip
import io
import math
import pathlib
import pickle
import tarfile
import zlib

import numpy as np
import PIL.Image

from mupc_flax.errors import UserError

class DataError(UserError):
  """A dataset cannot be prepared or read; the message says what to do."""

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def corrupt(path: pathlib.Path, why: str) -> DataError:
  return DataError(f"{path} is corrupt or truncated ({why}). Delete it and download it again "
                   "(or prepare without a local folder to download the official copy).")


def read_idx(path: pathlib.Path, trailing_shape: tuple[int, ...]) -> np.ndarray:
  """Reads a gzipped big-endian idx file of uint8: [n, *trailing_shape]."""
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise corrupt(path, f"gzip: {e}") from None
  ndim = 1 + len(trailing_shape)
  header = 4 + 4 * ndim
  if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
    raise corrupt(path, f"not an idx file of {ndim}-D uint8 data")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  if shape[1:] != trailing_shape:
    raise corrupt(path, f"items of shape {shape[1:]}, expected {trailing_shape}")
  if len(data) != header + math.prod(shape):
    raise corrupt(path, f"{len(data) - header} data bytes, the header promises {math.prod(shape)}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_idx_split(images_path: pathlib.Path, labels_path: pathlib.Path
                   ) -> tuple[np.ndarray, np.ndarray]:
  """MNIST-format images [n, 28, 28] and labels [n] (uint8), checked against each other."""
  images, labels = read_idx(images_path, (28, 28)), read_idx(labels_path, ())
  if len(images) != len(labels):
    raise corrupt(labels_path, f"{len(labels)} labels for {len(images)} images in {images_path.name}")
  if labels.size and labels.max() > 9:
    raise corrupt(labels_path, "labels outside 0…9")
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
    raise corrupt(pathlib.Path(where), f"not a CIFAR-10 python batch: {e}") from None
  if pixels.ndim != 2 or pixels.shape[1] != 3072 or labels.shape != (pixels.shape[0],):
    raise corrupt(pathlib.Path(where), f"data {pixels.shape}, labels {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise corrupt(pathlib.Path(where), "labels outside 0…9")
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
      raise corrupt(archive, f"tar.gz: {e}") from None
  else:
    extracted = folder / CIFAR10_FOLDER
    for name in CIFAR10_BATCHES["train"] + CIFAR10_BATCHES["test"] + ["batches.meta"]:
      if (extracted / name).exists():
        members[name] = (extracted / name).read_bytes()
  where = archive if archive.exists() else folder / CIFAR10_FOLDER
  needed = CIFAR10_BATCHES["train"] + CIFAR10_BATCHES["test"] + ["batches.meta"]
  missing = [n for n in needed if n not in members]
  if missing:
    raise corrupt(where, f"missing {missing}")
  try:
    meta = _ArrayUnpickler(io.BytesIO(members["batches.meta"]), encoding="bytes").load()
    names = [n.decode() for n in meta[b"label_names"]]
  except Exception as e:
    raise corrupt(where, f"batches.meta: {e}") from None
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
