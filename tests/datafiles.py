"""Writers of dataset source files in the official formats, for tests.

No Fashion-MNIST or CIFAR-10 copy exists offline, so the tests write files
byte-compatible with the official ones: gzipped big-endian idx, and the
CIFAR-10 python pickles (a tarball of ``cifar-10-batches-py/``).
"""

import gzip
import hashlib
import io
import pathlib
import pickle
import struct
import tarfile

import numpy as np

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def write_mnist_like(folder: pathlib.Path, train: int, test: int, seed: int = 0) -> dict:
  """The four idx files with random images; returns {split: (images, labels)}."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  splits = {}
  for split, n, prefix in [("train", train, "train"), ("test", test, "t10k")]:
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    splits[split] = (images, labels)
  return splits


def cifar_batches(per_batch: int, seed: int = 0) -> dict[str, bytes]:
  """Pickled batches named as in cifar-10-batches-py/ (5 train, 1 test, meta)."""
  rng = np.random.default_rng(seed)
  files = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, per_batch)]
    files[name] = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                b"filenames": [b"x.png"] * per_batch}, protocol=2)
  files["batches.meta"] = pickle.dumps(
      {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": per_batch,
       b"num_vis": 3072}, protocol=2)
  return files


def cifar_images(files: dict[str, bytes], names: list[str]):
  """Images [n, 32, 32, 3] and labels of the named batches, decoded independently."""
  images, labels = [], []
  for name in names:
    batch = pickle.loads(files[name], encoding="bytes")
    images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels += batch[b"labels"]
  return np.concatenate(images), np.array(labels)


def write_cifar_tarball(folder: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / "cifar-10-python.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    for name, payload in files.items():
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return path


def sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()
