"""Text datasets: Shakespeare's works as TFDS datasets of characters, and their vocabularies.

Two datasets, prepared without TensorFlow into the standard TFDS layout:

- ``shakespeare`` (1.0.0, this project's): the 42 plays and poems of the
  offline archive ``shakespeare_gutenberg.tar.gz`` (``--manual_dir`` or
  ``MUPC_SHAKESPEARE_DIR``; it has no download). One example per work and
  split, ``{"title", "text"}``. The test split is **the last tenth of every
  work** (cut at a line start), the train split the first nine tenths, so no
  training window overlaps a test character, and both splits hold every work.
- ``tiny_shakespeare`` (tfds' name, version 1.0.0 and splits: the first 90 %
  of ``input.txt`` train, the next 5 % validation, the last 5 % test), from
  a local ``input.txt`` or its download, checked by SHA-256.

Each has a fixed character vocabulary (``VOCABULARIES``), the sorted set of
its source's characters, stored with the prepared dataset (its metadata)
and checked when read: a source with another character is refused when it
is prepared, and the token id of a character is its index in the vocabulary.

A split is read (``pipeline.TextSplit``) as one array of token ids (the works joined in title
order). Training examples are the windows of ``context + 1`` characters at
every start (``stride=1``; the pipeline draws them in random order, an
epoch being every start once); evaluation's are disjoint (``stride =
context``), so each test character is predicted once. An example is
``x`` [context] int32 ids and ``y`` [context, V] float32, the one-hot next
characters.
"""

import dataclasses
import pathlib
import tarfile
import zlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.tiny_shakespeare import tiny_shakespeare_dataset_builder

from mupc_flax.data.source_files import DataError, corrupt

SHAKESPEARE_ARCHIVE = "shakespeare_gutenberg.tar.gz"
TINY_SHAKESPEARE_FILE = "input.txt"
TEST_FRACTION = 0.1  # of every work, its end (shakespeare)

VOCABULARIES = {
    "shakespeare": ("\n !\"&'()*,-./0123456789:;?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_"
                    "abcdefghijklmnopqrstuvwxyz{}"),
    "tiny_shakespeare": "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
}
"""Each text dataset's characters, sorted: the token id of a character is its index."""


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """A text dataset's vocabulary and the window a run reads.

  Attributes:
    vocabulary: the characters, sorted; V = len(vocabulary).
    context: T, the characters a network sees (a window is T + 1 long).
  """

  vocabulary: str
  context: int

  @property
  def num_classes(self) -> int:
    return len(self.vocabulary)

  @property
  def input_size(self) -> int:
    return self.context

  def describe(self) -> str:
    return f"windows of {self.context} characters"

  def encode(self, text: str) -> np.ndarray:
    """Token ids [len(text)] uint8; DataError naming a character outside the vocabulary."""
    unknown = sorted(set(text) - set(self.vocabulary))
    if unknown:
      raise DataError(f"{''.join(unknown)!r} {'is' if len(unknown) == 1 else 'are'} not in the "
                      f"vocabulary of {len(self.vocabulary)} characters; use only "
                      f"{self.vocabulary!r}.")
    codes = [ord(c) for c in self.vocabulary]
    lookup = np.zeros(max(codes) + 1, np.uint8)
    lookup[codes] = np.arange(len(codes))
    return lookup[np.frombuffer(text.encode("utf-32-le"), np.uint32)]

  def decode(self, ids) -> str:
    return "".join(self.vocabulary[i] for i in np.asarray(ids).ravel())


def spec(name: str, context: int) -> TextSpec:
  return TextSpec(VOCABULARIES[name], context)


# --- Reading the sources ------------------------------------------------------


def read_shakespeare(archive: pathlib.Path) -> dict[str, str]:
  """The works of the archive, title -> text (``hamlet`` for ``hamlet_gut.txt``)."""
  works = {}
  try:
    with tarfile.open(archive, "r:gz") as tar:
      for member in tar.getmembers():
        name = pathlib.PurePosixPath(member.name).name
        if member.isfile() and name.endswith("_gut.txt"):
          works[name.removesuffix("_gut.txt")] = tar.extractfile(member).read().decode("ascii")
  except (tarfile.TarError, OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
    raise corrupt(archive, f"{type(e).__name__}: {e}") from None
  if not works:
    raise corrupt(archive, "no *_gut.txt works in it")
  return works


def read_text(path: pathlib.Path) -> str:
  try:
    return path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise corrupt(path, f"not UTF-8 text: {e}") from None


def split_work(text: str) -> tuple[str, str]:
  """(train, test): the first nine tenths of a work and the rest, cut at a line start."""
  cut = text.rfind("\n", 0, int(len(text) * (1 - TEST_FRACTION))) + 1
  return text[:cut], text[cut:]


def _checked(name: str, text: str, where: pathlib.Path) -> str:
  try:
    spec(name, 1).encode(text)
  except DataError as e:
    raise DataError(f"{where} does not hold {name}'s text: {e}") from None
  return text


# --- TFDS builders ------------------------------------------------------------

_INSTRUCTIONS = "Use `python -m mupc_flax.data prepare`, which supplies the source folder."


def _metadata(name: str) -> tfds.core.MetadataDict:
  return tfds.core.MetadataDict(vocabulary=VOCABULARIES[name])


class Shakespeare(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """``shakespeare`` 1.0.0: every work, its first nine tenths train, the rest test."""

  name = "shakespeare"
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description="Shakespeare's 42 plays and poems (Open Shakespeare, "
        "Gutenberg texts), by work; test: the last tenth of each work.",
        features=tfds.features.FeaturesDict({"title": tfds.features.Text(),
                                             "text": tfds.features.Text()}),
        metadata=_metadata("shakespeare"))

  def _split_generators(self, dl_manager):
    archive = pathlib.Path(dl_manager.manual_dir) / SHAKESPEARE_ARCHIVE
    works = {title: split_work(_checked("shakespeare", text, archive))
             for title, text in read_shakespeare(archive).items()}
    return {split: self._generate_examples({t: parts[i] for t, parts in works.items()})
            for i, split in enumerate(("train", "test"))}

  def _generate_examples(self, works):
    for title, text in sorted(works.items()):
      yield title, {"title": title, "text": text}


class TinyShakespeare(tiny_shakespeare_dataset_builder.Builder, skip_registration=True):
  """tfds' ``tiny_shakespeare`` 1.0.0 (same splits and features), read with plain Python."""

  name = "tiny_shakespeare"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description="Karpathy's Tiny Shakespeare (char-rnn's input.txt).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        homepage="https://github.com/karpathy/char-rnn/blob/master/data/tinyshakespeare/input.txt",
        metadata=_metadata("tiny_shakespeare"))

  def _split_generators(self, dl_manager):
    path = pathlib.Path(dl_manager.manual_dir) / TINY_SHAKESPEARE_FILE
    text = _checked("tiny_shakespeare", read_text(path), path)
    i = int(len(text) * 0.9)  # tfds' 90/5/5
    train, rest = text[:i], text[i:]
    i = int(len(rest) * 0.5)
    return {split: self._generate_examples(split, part)
            for split, part in (("train", train), ("validation", rest[:i]), ("test", rest[i:]))}


BUILDERS = {"shakespeare": Shakespeare, "tiny_shakespeare": TinyShakespeare}
