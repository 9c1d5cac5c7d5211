"""grain input pipelines over ``tfds.data_source``.

grain iterates over batch numbers; each batch's example indices come from a
per-epoch permutation, and the examples are read (from memory, or decoded
from the ArrayRecord files) and preprocessed with vectorised NumPy. The batches are defined globally: one seed gives the
same sequence of global batches whatever the number of processes, and each
process reads only its own contiguous rows of each batch. The iterator state
is a grain state, saved in checkpoints with ``grain.checkpoint``.

Batches are dicts of NumPy arrays: ``x`` [b, H·W·C] float32 (normalised,
flattened), ``y`` [b, 10] float32 (one-hot) and, for evaluation, ``mask`` [b]
float32 (1 for real examples, 0 for padding). b is the per-process batch.
A text split (``TextSplit``) gives windows instead: ``x`` [b, T] int32
token ids and ``y`` [b, T, V] one-hot next characters; the pipelines read
any split through its ``examples(indices)`` and ``len``.

A split read into memory is decoded once per machine: the arrays are kept in
``cache_dir()`` under a key of the prepared files' names, sizes and times, so
every later run (and every process of a job) loads them in a fraction of a
second instead of decoding each PNG again (MNIST: 10 s on a 2-core CPU).
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import tempfile
import zipfile
from typing import Iterator

from absl import logging
import grain
import numpy as np
import tensorflow_datasets as tfds

from mupc_flax.data import builders, text


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Shape and the paper's normalisation constants (per channel) of a dataset."""

  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int = 10

  @property
  def input_size(self) -> int:
    return math.prod(self.image_shape)

  def describe(self) -> str:
    return f"{'×'.join(map(str, self.image_shape))} images"


_FOREVER = 2**62  # batches; grain's range dataset is lazy

SPECS = {
    "mnist": DatasetSpec((28, 28, 1), (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetSpec((28, 28, 1), (0.5,), (0.5,)),
    "cifar10": DatasetSpec((32, 32, 3), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
"""Each dataset's image shape [H, W, C] and the per-channel mean and standard deviation
its images are normalised with (the paper's constants)."""


class Split:
  """One split of a prepared dataset, read by index.

  With ``in_memory`` the split is held as arrays (MNIST's train split: 47 MB),
  decoded once per machine and then loaded from ``cache_dir()``, and every
  read is a NumPy gather; otherwise each read decodes its examples from the
  ArrayRecord files.
  """

  def __init__(self, name: str, split: str, data_dir: str, in_memory: bool = True):
    builders.check_prepared(name, data_dir)
    self.spec = SPECS[name]
    self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    self._arrays = None
    if in_memory:
      cached = cache_path(name, split, data_dir)
      self._arrays = _load_decoded(cached, len(self._source), self.spec.image_shape)
      if self._arrays is None:
        self._arrays = self._decode(np.arange(len(self._source)))
        _save_decoded(cached, self._arrays)

  def __len__(self) -> int:
    return len(self._source)

  def _decode(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(indices),) + self.spec.image_shape, np.uint8)
    labels = np.empty(len(indices), np.int64)
    for start in range(0, len(indices), 4096):
      chunk = indices[start:start + 4096]
      for i, example in enumerate(self._source.__getitems__(chunk.tolist()), start):
        images[i], labels[i] = example["image"], example["label"]
    return images, labels

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images [b, H, W, C] uint8 and labels [b] int64 at ``indices``."""
    if self._arrays is not None:
      return self._arrays[0][indices], self._arrays[1][indices]
    return self._decode(np.asarray(indices))

  def examples(self, indices: np.ndarray, augment_rng: np.random.Generator | None = None
               ) -> dict[str, np.ndarray]:
    """The preprocessed examples at ``indices`` (``preprocess``), augmented
    for CIFAR-10 training (``augment_cifar``) when given a generator."""
    images, labels = self.read(indices)
    if augment_rng is not None:
      images = augment_cifar(images, augment_rng)
    return preprocess(images, labels, self.spec)


class TextSplit:
  """One split of a prepared text dataset as windows of ``context + 1`` characters.

  A window at every start (training), or with ``disjoint`` windows that do
  not overlap (evaluation: a start every ``context`` characters), at most
  ``max_windows`` of them spread evenly over the split (a start every
  max(context, ⌊(N − context − 1)/(max_windows − 1)⌋) of its N characters).
  ``len`` is the number of windows.
  """

  def __init__(self, name: str, split: str, data_dir, context: int, *, disjoint: bool = False,
               max_windows: int | None = None):
    self.spec = text.spec(name, context)
    builders.check_prepared(name, data_dir)
    folder = builders.dataset_dir(name, data_dir)
    try:
      stored = json.loads((folder / "metadata.json").read_text())["vocabulary"]
    except (OSError, ValueError, KeyError):
      stored = None
    if stored != self.spec.vocabulary:
      raise builders.DataError(f"{folder} was prepared with another vocabulary (or none); "
                               f"delete it and prepare {name} again.")
    source = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    examples = [source[i] for i in range(len(source))]
    examples.sort(key=lambda e: e.get("title", b""))
    self.tokens = self.spec.encode("".join(e["text"].decode("utf-8") for e in examples))
    if len(self.tokens) < context + 1:
      raise builders.DataError(f"The {split} split of {name} has {len(self.tokens)} characters, "
                               f"fewer than one window of context + 1 = {context + 1}; choose a "
                               "smaller config.data.context.")
    self.context, self.stride, self.max_windows = context, context if disjoint else 1, None
    if disjoint and max_windows:
      spread = (len(self.tokens) - context - 1) // max(max_windows - 1, 1)
      self.stride, self.max_windows = max(context, spread), max_windows

  def __len__(self) -> int:
    count = (len(self.tokens) - self.context - 1) // self.stride + 1
    return min(count, self.max_windows) if self.max_windows else count

  def windows(self, indices) -> np.ndarray:
    """The windows [b, context + 1] of token ids at window numbers ``indices``."""
    starts = np.asarray(indices, np.int64) * self.stride
    return self.tokens[starts[:, None] + np.arange(self.context + 1)]

  def examples(self, indices, augment_rng=None) -> dict[str, np.ndarray]:
    """x [b, T] int32 ids and y [b, T, V] float32 one-hot next characters."""
    del augment_rng  # text has no augmentation
    windows = self.windows(indices)
    return {"x": windows[:, :-1].astype(np.int32),
            "y": np.eye(self.spec.num_classes, dtype=np.float32)[windows[:, 1:]]}


def cache_dir() -> pathlib.Path:
  """``$MUPC_CACHE_DIR``, else ``$XDG_CACHE_HOME/mupc_flax``, else ``~/.cache/mupc_flax``."""
  if os.environ.get("MUPC_CACHE_DIR"):
    return pathlib.Path(os.environ["MUPC_CACHE_DIR"])
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "mupc_flax"


def cache_path(name: str, split: str, data_dir: str | os.PathLike) -> pathlib.Path:
  """The decoded arrays' file for one split of one prepared dataset: a new
  preparation (new files, sizes or times) gets a new key, never stale arrays."""
  folder = builders.dataset_dir(name, data_dir).resolve()
  files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
  key = hashlib.sha256(repr((str(folder), split, files)).encode()).hexdigest()[:20]
  return cache_dir() / f"{name}-{key}.npz"


def _load_decoded(path: pathlib.Path, count: int, image_shape: tuple[int, ...]
                  ) -> tuple[np.ndarray, np.ndarray] | None:
  """The cached (images, labels), or None where the file is missing, unreadable
  or not ``count`` examples of ``image_shape``: the split is then decoded again."""
  try:
    with np.load(path) as arrays:
      images, labels = arrays["images"], arrays["labels"]
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
    return None
  if (images.shape != (count,) + tuple(image_shape) or images.dtype != np.uint8
      or labels.shape != (count,) or labels.dtype != np.int64):
    return None
  return images, labels


def _save_decoded(path: pathlib.Path, arrays: tuple[np.ndarray, np.ndarray]) -> None:
  """Writes the arrays whole or not at all (a temporary file renamed into
  place: processes that decode the same split at once each write a complete
  file). A cache that cannot be written only costs the next run the decoding."""
  temporary = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    with os.fdopen(descriptor, "wb") as file:
      np.savez(file, images=arrays[0], labels=arrays[1])
    os.replace(temporary, path)
  except OSError as error:
    logging.info("The decoded split was not cached in %s (%s).", path.parent, error)
    if temporary is not None and os.path.exists(temporary):
      os.remove(temporary)


def preprocess(images: np.ndarray, labels: np.ndarray, spec: DatasetSpec) -> dict[str, np.ndarray]:
  """Normalise per channel, flatten and one-hot: x [b, D], y [b, C] float32."""
  x = (images.astype(np.float32) / 255.0 - np.float32(spec.mean)) / np.float32(spec.std)
  return {"x": x.reshape(len(images), -1),
          "y": np.eye(spec.num_classes, dtype=np.float32)[labels]}


# --- CIFAR-10 training augmentation ------------------------------------------


def random_crop(images: np.ndarray, offsets: np.ndarray, pad: int = 4) -> np.ndarray:
  """Zero-pads by ``pad`` and crops back to size at ``offsets`` [b, 2] (0…2·pad)."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = offsets[:, 0, None] + np.arange(h)
  cols = offsets[:, 1, None] + np.arange(w)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def rotate(images: np.ndarray, degrees: np.ndarray) -> np.ndarray:
  """Rotates each image counter-clockwise about its centre (nearest pixel, zero fill)."""
  b, h, w, _ = images.shape
  theta = np.deg2rad(degrees)[:, None, None]
  cy, cx = (h - 1) / 2, (w - 1) / 2
  yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
  # Inverse map: the output pixel (y, x) reads the input at the point rotated back.
  src_x = np.cos(theta) * xx - np.sin(theta) * yy + cx
  src_y = np.sin(theta) * xx + np.cos(theta) * yy + cy
  src_y, src_x = np.rint(src_y).astype(np.int64), np.rint(src_x).astype(np.int64)
  inside = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
  out = images[np.arange(b)[:, None, None], np.clip(src_y, 0, h - 1), np.clip(src_x, 0, w - 1)]
  return np.where(inside[..., None], out, 0).astype(images.dtype)


def augment_cifar(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The paper's CIFAR-10 training augmentation on uint8 images [b, 32, 32, 3]:
  random crop 32 with padding 4, horizontal flip (p = 0.5), rotation in ±10°."""
  b = len(images)
  images = random_crop(images, rng.integers(0, 9, size=(b, 2)))
  flip = rng.random(b) < 0.5
  images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  return rotate(images, rng.uniform(-10.0, 10.0, size=b))


# --- Pipelines ----------------------------------------------------------------


def _local_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if global_batch_size % process_count:
    raise builders.DataError(
        f"The global batch size {global_batch_size} is not divisible by the number of "
        f"processes ({process_count}); choose a multiple of {process_count}.")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def train_dataset(split: "Split | TextSplit", *, global_batch_size: int, seed: int,
                  num_batches: int | None = None, augment: bool = False, process_index: int = 0,
                  process_count: int = 1, prefetch: int = 2) -> grain.IterDataset:
  """Shuffled training batches for this process, reshuffled every epoch.

  Epoch e visits the examples in the order of a permutation seeded by
  (seed, e); batches run on across epoch boundaries. grain iterates over
  batch numbers (its checkpointable state), so a batch costs one vectorised
  gather. ``num_batches=None`` never ends.
  """
  rows = _local_rows(global_batch_size, process_index, process_count)
  permutation = functools.lru_cache(maxsize=2)(
      lambda epoch: np.random.default_rng([seed, epoch]).permutation(len(split)))

  def load(batch_index):
    positions = np.arange(batch_index * global_batch_size,
                          (batch_index + 1) * global_batch_size)[rows]
    epochs, offsets = np.divmod(positions, len(split))
    indices = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):
      indices[epochs == epoch] = permutation(int(epoch))[offsets[epochs == epoch]]
    # A generator per batch (and process): reproducible after a restore.
    return split.examples(indices, np.random.default_rng([seed, batch_index, process_index, 1])
                          if augment else None)

  ds = grain.MapDataset.range(num_batches if num_batches is not None else _FOREVER).map(load)
  # A background thread prepares the next batches while the device computes.
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0,
                                              prefetch_buffer_size=prefetch))


def num_eval_batches(split: Split, global_batch_size: int) -> int:
  """The number of global batches ``eval_batches`` yields: ⌈len(split) / global_batch_size⌉."""
  return math.ceil(len(split) / global_batch_size)


def eval_batches(split: "Split | TextSplit", *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every example of the split exactly once, in order.

  The last global batch is padded (mask 0) to full size, so every process
  runs the same number of steps with the same shapes.
  """
  rows = _local_rows(global_batch_size, process_index, process_count)

  def load(batch_index):
    positions = np.arange(batch_index * global_batch_size, (batch_index + 1) * global_batch_size)[rows]
    real = positions < len(split)
    batch = split.examples(np.where(real, positions, 0))
    batch["mask"] = real.astype(np.float32)
    return batch

  ds = grain.MapDataset.range(num_eval_batches(split, global_batch_size)).map(load)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
