"""Dataset preparation without TensorFlow, and the grain pipelines."""

import collections
import functools
import http.server
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from mupc_flax import data
from mupc_flax.data import builders, pipeline, source_files
import datafiles
from programs import run_program

MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def image_counter(images, labels):
  return collections.Counter((np.asarray(i).tobytes(), int(l)) for i, l in zip(images, labels))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A prepared fashion_mnist-format dataset of 300 + 70 random images."""
  folder = tmp_path_factory.mktemp("fashion_src")
  splits = datafiles.write_mnist_like(folder, train=300, test=70)
  data_dir = tmp_path_factory.mktemp("tfds_small")
  data.prepare("fashion_mnist", data_dir, manual_dir=folder)
  return data_dir, splits


# --- Preparation ----------------------------------------------------------------


def test_real_mnist_prepared_offline(mnist_data_dir):
  train = tfds.data_source("mnist", split="train", data_dir=mnist_data_dir)
  test = tfds.data_source("mnist", split="test", data_dir=mnist_data_dir)
  assert len(train) == 60_000 and len(test) == 10_000
  split = data.Split("mnist", "test", mnist_data_dir)
  images, labels = split.read(np.arange(len(split)))
  assert np.bincount(labels, minlength=10).tolist() == MNIST_TEST_LABEL_COUNTS
  # Every decoded image equals the idx file's bytes, with its label.
  folder = pathlib.Path(os.environ["MUPC_MNIST_DIR"])
  idx_images, idx_labels = source_files.read_idx_split(folder / "t10k-images-idx3-ubyte.gz",
                                                   folder / "t10k-labels-idx1-ubyte.gz")
  assert images.shape == (10_000, 28, 28, 1) and images.dtype == np.uint8
  assert image_counter(images[..., 0], labels) == image_counter(idx_images, idx_labels)
  assert np.array_equal(test[0]["image"], images[0])


def test_small_dataset_is_read_back_exactly(small):
  data_dir, splits = small
  for split_name, (images, labels) in splits.items():
    source = tfds.data_source("fashion_mnist", split=split_name, data_dir=data_dir)
    assert len(source) == len(images)
    got = [source[i] for i in range(len(source))]
    assert image_counter([g["image"][..., 0] for g in got], [g["label"] for g in got]) == \
        image_counter(images, labels)
  info = (pathlib.Path(data_dir) / "fashion_mnist" / "3.0.1" / "dataset_info.json").read_text()
  assert '"fileFormat": "array_record"' in info


@pytest.mark.parametrize("layout", ["tarball", "extracted"])
def test_cifar10_from_python_batches(tmp_path, layout):
  files = datafiles.cifar_batches(per_batch=12)
  folder = tmp_path / "src"
  if layout == "tarball":
    datafiles.write_cifar_tarball(folder, files)
  else:
    (folder / "cifar-10-batches-py").mkdir(parents=True)
    for name, payload in files.items():
      (folder / "cifar-10-batches-py" / name).write_bytes(payload)
  data.prepare("cifar10", tmp_path / "tfds", manual_dir=folder)
  source = tfds.data_source("cifar10", split="train", data_dir=tmp_path / "tfds")
  examples = [source[i] for i in range(len(source))]
  images, labels = datafiles.cifar_images(files, [f"data_batch_{i}" for i in range(1, 6)])
  assert image_counter([e["image"] for e in examples], [e["label"] for e in examples]) == \
      image_counter(images, labels)
  # ids follow tfds' own builder: train_<position in the source files>.
  for e in examples:
    position = int(e["id"][len("train_"):])
    assert np.array_equal(e["image"], images[position]) and e["label"] == labels[position]
  # The features are tfds' official ones: compare with tfds' mock of cifar10.
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    mock = tfds.data_source("cifar10", split="train", data_dir=tmp_path / "elsewhere")[0]
  assert sorted(mock) == sorted(examples[0])
  for key in ("image", "label"):
    assert np.asarray(mock[key]).shape == np.asarray(examples[0][key]).shape
    assert np.asarray(mock[key]).dtype == np.asarray(examples[0][key]).dtype
  assert isinstance(examples[0]["id"], bytes)  # tfds reads Text features as bytes
  label_names = tfds.builder("cifar10", data_dir=tmp_path / "tfds").info.features["label"].names
  assert label_names == datafiles.CIFAR_NAMES


@pytest.fixture
def http_server(tmp_path):
  """Serves tmp_path/served on 127.0.0.1; yields (folder, base URL)."""
  folder = tmp_path / "served"
  folder.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
  server.shutdown()
  server.server_close()


def _serve(monkeypatch, name, folder, url, corrupt=None):
  sums = {f: datafiles.sha256(folder / f) for f in builders.SOURCES[name].sha256}
  if corrupt:
    sums[corrupt] = "0" * 64
  monkeypatch.setitem(builders.SOURCES, name,
                      builders.Source(url=url, sha256=sums, env_var="MUPC_TEST_UNSET_VARIABLE"))


def test_download_checks_checksums_and_prepares(tmp_path, http_server, monkeypatch):
  folder, url = http_server
  splits = datafiles.write_mnist_like(folder, train=40, test=10, seed=3)
  _serve(monkeypatch, "mnist", folder, url)
  data.prepare("mnist", tmp_path / "tfds")
  source = tfds.data_source("mnist", split="test", data_dir=tmp_path / "tfds")
  got = [source[i] for i in range(len(source))]
  assert image_counter([g["image"][..., 0] for g in got], [g["label"] for g in got]) == \
      image_counter(*splits["test"])
  assert [p.name for p in (tmp_path / "tfds").iterdir()] == ["mnist"]  # no downloads left over


def test_download_of_cifar10_tarball(tmp_path, http_server, monkeypatch):
  folder, url = http_server
  datafiles.write_cifar_tarball(folder, datafiles.cifar_batches(per_batch=4, seed=1))
  _serve(monkeypatch, "cifar10", folder, url)
  data.prepare("cifar10", tmp_path / "tfds")
  assert len(tfds.data_source("cifar10", split="test", data_dir=tmp_path / "tfds")) == 4


def test_wrong_checksum_fails_and_leaves_nothing(tmp_path, http_server, monkeypatch):
  folder, url = http_server
  datafiles.write_mnist_like(folder, train=20, test=5)
  _serve(monkeypatch, "mnist", folder, url, corrupt="t10k-labels-idx1-ubyte.gz")
  with pytest.raises(data.DataError, match="Checksum mismatch.*t10k-labels-idx1-ubyte.gz"):
    data.prepare("mnist", tmp_path / "fresh")
  assert not (tmp_path / "fresh").exists()
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("mine")
  with pytest.raises(data.DataError, match="Checksum mismatch"):
    data.prepare("mnist", existing)
  assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]


def test_unreachable_download_says_how_to_work_offline(tmp_path, monkeypatch):
  monkeypatch.setitem(builders.SOURCES, "mnist", builders.Source(
      url="http://127.0.0.1:9/", sha256=builders.SOURCES["mnist"].sha256, env_var="MUPC_TEST_UNSET"))
  with pytest.raises(data.DataError, match="Could not download.*manual_dir"):
    data.prepare("mnist", tmp_path / "tfds")
  assert not (tmp_path / "tfds").exists()


def test_killed_preparation_leaves_no_dataset(tmp_path):
  source = tmp_path / "src"
  datafiles.write_mnist_like(source, train=30, test=10)
  data_dir = tmp_path / "tfds"
  # Killed at the worst moment: every file written, just before publishing.
  script = ("import os, signal, sys\n"
            "from mupc_flax.data import builders\n"
            "os.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "builders.prepare('fashion_mnist', sys.argv[1], manual_dir=sys.argv[2])\n")
  result = subprocess.run([sys.executable, "-c", script, str(data_dir), str(source)],
                          capture_output=True)
  assert result.returncode == -9
  assert not data.is_prepared("fashion_mnist", data_dir)
  assert not (data_dir / "fashion_mnist" / "3.0.1").exists()
  with pytest.raises(data.DataError, match="not prepared.*mupc_flax.data prepare"):
    data.Split("fashion_mnist", "train", data_dir)
  data.prepare("fashion_mnist", data_dir, manual_dir=source)  # a later run recovers
  assert len(data.Split("fashion_mnist", "train", data_dir)) == 30


# --- Errors ----------------------------------------------------------------------


def test_unknown_dataset(tmp_path):
  with pytest.raises(data.DataError, match="Unknown dataset 'imagenet'.*cifar10"):
    data.prepare("imagenet", tmp_path)
  with pytest.raises(data.DataError, match="Unknown dataset"):
    data.Split("svhn", "train", tmp_path)


def test_missing_files_offline_says_which_and_where(tmp_path, monkeypatch):
  folder = tmp_path / "src"
  datafiles.write_mnist_like(folder, train=5, test=5)
  (folder / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(data.DataError, match=r"lacks \['t10k-labels-idx1-ubyte.gz'\]") as e:
    data.prepare("mnist", tmp_path / "tfds", manual_dir=folder)
  assert str(folder) in str(e.value) and "train-images-idx3-ubyte.gz" in str(e.value)
  monkeypatch.setenv("MUPC_CIFAR10_DIR", str(tmp_path / "nothing_here"))
  with pytest.raises(data.DataError, match="MUPC_CIFAR10_DIR.*cifar-10-python.tar.gz"):
    data.prepare("cifar10", tmp_path / "tfds")
  assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupt_source_files(tmp_path, damage):
  folder = tmp_path / "src"
  datafiles.write_mnist_like(folder, train=20, test=5)
  path = folder / "train-images-idx3-ubyte.gz"
  if damage == "truncate":
    path.write_bytes(path.read_bytes()[:-100])
  elif damage == "garbage":
    path.write_bytes(b"not a gzip file at all")
  else:
    datafiles.write_idx(path, np.zeros((20, 28, 27), np.uint8))
  with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz is corrupt or truncated"):
    data.prepare("fashion_mnist", tmp_path / "tfds", manual_dir=folder)
  assert not (tmp_path / "tfds").exists()


def test_corrupt_cifar_archive_and_malicious_pickle(tmp_path):
  files = datafiles.cifar_batches(per_batch=3)
  files["data_batch_2"] = (b"cos\nsystem\n(S'echo pwned'\ntR.")  # would run a shell command
  datafiles.write_cifar_tarball(tmp_path / "src", files)
  with pytest.raises(data.DataError, match="data_batch_2 is corrupt.*refusing to load"):
    data.prepare("cifar10", tmp_path / "tfds", manual_dir=tmp_path / "src")
  (tmp_path / "src" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08broken")
  with pytest.raises(data.DataError, match="cifar-10-python.tar.gz is corrupt"):
    data.prepare("cifar10", tmp_path / "tfds", manual_dir=tmp_path / "src")


def test_batch_not_divisible_across_processes(small):
  split = data.Split("fashion_mnist", "train", small[0])
  with pytest.raises(data.DataError, match="not divisible by the number of processes"):
    data.train_dataset(split, global_batch_size=10, seed=0, process_count=4)


def test_cli_prepares(tmp_path):
  """(Its errors, a missing folder among them, are test_cli's cases.)"""
  folder = tmp_path / "src"
  datafiles.write_mnist_like(folder, train=10, test=10)
  ok = run_program([sys.executable, "-m", "mupc_flax.data", "prepare", "--dataset=fashion_mnist",
                    f"--manual_dir={folder}", f"--data_dir={tmp_path}/d"], dict(os.environ))
  assert ok.returncode == 0, ok.stderr
  assert "fashion_mnist is ready" in ok.stdout
  assert data.is_prepared("fashion_mnist", tmp_path / "d")


# --- Pipelines -------------------------------------------------------------------


def test_preprocessing_uses_the_paper_constants():
  images = np.array([[[[0]], [[255]]]], np.uint8).reshape(1, 1, 2, 1)
  batch = pipeline.preprocess(images, np.array([3]), data.SPECS["mnist"])
  np.testing.assert_allclose(batch["x"], [[-0.1307 / 0.3081, (1 - 0.1307) / 0.3081]], rtol=1e-6)
  assert batch["y"].tolist() == [[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]]
  rgb = np.full((1, 2, 2, 3), 255, np.uint8)
  np.testing.assert_allclose(pipeline.preprocess(rgb, np.array([0]), data.SPECS["cifar10"])["x"],
                             np.ones((1, 12)))


def _batches(split, n, **kwargs):
  iterator = iter(data.train_dataset(split, global_batch_size=32, **kwargs))
  return [next(iterator) for _ in range(n)]


def test_train_pipeline_is_deterministic_and_reshuffles_per_epoch(small):
  split = data.Split("fashion_mnist", "train", small[0])
  a, b = _batches(split, 20, seed=7), _batches(split, 20, seed=7)
  for x, y in zip(a, b):
    assert np.array_equal(x["x"], y["x"]) and np.array_equal(x["y"], y["y"])
  c = _batches(split, 3, seed=8)
  assert not np.array_equal(a[0]["x"], c[0]["x"])
  assert a[0]["x"].shape == (32, 784) and a[0]["y"].shape == (32, 10)
  # Epochs: 300 examples, batches of 32 -> the first 9 batches are 288 distinct examples,
  # and epoch 2 is another order of the same examples.
  rows = lambda batches: [r.tobytes() for b in batches for r in b["x"]]
  first = rows(a[:9])
  assert len(set(first)) == 288
  epoch2 = rows(a)[300:600]
  assert sorted(epoch2) == sorted(rows(a)[:300]) and epoch2 != rows(a)[:300]


def test_in_memory_and_streaming_reads_agree(small):
  memory = data.Split("fashion_mnist", "train", small[0])
  streaming = data.Split("fashion_mnist", "train", small[0], in_memory=False)
  for x, y in zip(_batches(memory, 4, seed=1), _batches(streaming, 4, seed=1)):
    assert np.array_equal(x["x"], y["x"]) and np.array_equal(x["y"], y["y"])


def test_a_split_is_decoded_once_and_then_loaded_from_the_cache(small, tmp_path, monkeypatch):
  monkeypatch.setenv("MUPC_CACHE_DIR", str(tmp_path / "cache"))
  images, labels = small[1]["train"]
  expected = image_counter(images, labels)
  decoded = data.Split("fashion_mnist", "train", small[0])
  assert image_counter(*decoded.read(np.arange(300))) == expected
  (cached,) = (tmp_path / "cache").iterdir()
  assert cached == pipeline.cache_path("fashion_mnist", "train", small[0])
  assert cached != pipeline.cache_path("fashion_mnist", "test", small[0])

  def no_decoding(self, indices):
    raise AssertionError("decoded again")

  with monkeypatch.context() as patch:
    patch.setattr(pipeline.Split, "_decode", no_decoding)
    loaded = data.Split("fashion_mnist", "train", small[0])
  for a, b in zip(loaded.read(np.arange(300)), decoded.read(np.arange(300))):
    np.testing.assert_array_equal(a, b)

  # A damaged cache file (cut short, or another split's arrays) is decoded again and replaced.
  for damage in (cached.read_bytes()[:1000], b"not an npz file"):
    cached.write_bytes(damage)
    again = data.Split("fashion_mnist", "train", small[0])
    assert image_counter(*again.read(np.arange(300))) == expected
    assert pipeline._load_decoded(cached, 300, (28, 28, 1)) is not None
  np.savez(cached, images=images[:10], labels=labels[:10])
  assert image_counter(*data.Split("fashion_mnist", "train", small[0]).read(np.arange(300))) == expected

  # A cache folder that cannot be written costs only the decoding.
  monkeypatch.setenv("MUPC_CACHE_DIR", str(tmp_path / "a_file"))
  (tmp_path / "a_file").write_text("")
  assert image_counter(*data.Split("fashion_mnist", "train", small[0]).read(np.arange(300))) == expected


def test_a_new_preparation_gets_a_new_cache_key(tmp_path):
  source = tmp_path / "source"
  datafiles.write_mnist_like(source, train=20, test=10)
  data.prepare("fashion_mnist", tmp_path / "tfds", manual_dir=source)
  first = pipeline.cache_path("fashion_mnist", "train", tmp_path / "tfds")
  info = builders.dataset_dir("fashion_mnist", tmp_path / "tfds") / "dataset_info.json"
  os.utime(info, ns=(info.stat().st_atime_ns, info.stat().st_mtime_ns + 1))
  assert pipeline.cache_path("fashion_mnist", "train", tmp_path / "tfds") != first


def test_restored_iterator_continues_exactly(small):
  split = data.Split("fashion_mnist", "train", small[0])
  dataset = data.train_dataset(split, global_batch_size=32, seed=3)
  straight = iter(dataset)
  expected = [next(straight) for _ in range(15)]
  interrupted = iter(dataset)
  for _ in range(6):
    next(interrupted)
  state = interrupted.get_state()
  resumed = iter(data.train_dataset(split, global_batch_size=32, seed=3))
  resumed.set_state(state)
  for want in expected[6:]:
    got = next(resumed)
    assert np.array_equal(got["x"], want["x"]) and np.array_equal(got["y"], want["y"])


def test_processes_see_disjoint_shards_of_the_same_global_batches(small):
  split = data.Split("fashion_mnist", "train", small[0])
  whole = _batches(split, 9, seed=5)
  parts = [_batches(split, 9, seed=5, process_index=p, process_count=2) for p in range(2)]
  seen = []
  for b, (p0, p1) in enumerate(zip(*parts)):
    assert p0["x"].shape == (16, 784)
    assert np.array_equal(np.concatenate([p0["x"], p1["x"]]), whole[b]["x"])
    assert not set(map(bytes, p0["x"])) & set(map(bytes, p1["x"]))
    seen += [r.tobytes() for r in np.concatenate([p0["x"], p1["x"]])]
  all_rows = {r.tobytes() for r in pipeline.preprocess(*split.read(np.arange(300)), split.spec)["x"]}
  assert len(set(seen)) == 288 and set(seen) <= all_rows  # one epoch, nothing twice


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_covers_the_test_split_exactly_once(small, processes):
  split = data.Split("fashion_mnist", "test", small[0])  # 70 examples
  expected = pipeline.preprocess(*split.read(np.arange(70)), split.spec)
  seen = []
  counts = []
  for p in range(processes):
    batches = list(data.eval_batches(split, global_batch_size=32, process_index=p,
                                     process_count=processes))
    counts.append(len(batches))
    for batch in batches:
      assert batch["x"].shape == (32 // processes, 784)
      seen += [r.tobytes() for r, m in zip(batch["x"], batch["mask"]) if m]
  assert counts == [3] * processes  # every process runs the same number of eval steps
  assert sorted(seen) == sorted(r.tobytes() for r in expected["x"])


def test_rotation_and_crop_oracles():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(pipeline.rotate(images, np.zeros(3)), images)
  np.testing.assert_array_equal(pipeline.rotate(images, np.full(3, 90.0)), np.rot90(images, 1, axes=(1, 2)))
  np.testing.assert_array_equal(pipeline.random_crop(images, np.full((3, 2), 4)), images)
  shifted = pipeline.random_crop(images, np.array([[0, 8]] * 3))  # up 4 rows of zeros, left by 4
  np.testing.assert_array_equal(shifted[:, 4:, :28], images[:, :28, 4:])
  assert not shifted[:, :4].any() and not shifted[:, :, 28:].any()
  # Pillow's nearest-neighbour rotation about the centre is an independent oracle
  # (the two differ only where a sample point falls on a rounding tie).
  for degrees in (7.0, -9.5, 3.3):
    ours = pipeline.rotate(images, np.full(3, degrees))
    theirs = np.stack([np.asarray(PIL.Image.fromarray(i).rotate(degrees, resample=PIL.Image.NEAREST))
                       for i in images])
    assert np.mean(ours == theirs) > 0.995
    assert np.mean(ours == images) < 0.5  # it did turn (the centre stays)


def test_cifar_augmentation_in_the_pipeline(tmp_path):
  datafiles.write_cifar_tarball(tmp_path / "src", datafiles.cifar_batches(per_batch=8))
  data.prepare("cifar10", tmp_path / "tfds", manual_dir=tmp_path / "src")
  split = data.Split("cifar10", "train", tmp_path / "tfds")
  plain = _batches(split, 2, seed=0)
  augmented = _batches(split, 2, seed=0, augment=True)
  again = _batches(split, 2, seed=0, augment=True)
  for p, a, b in zip(plain, augmented, again):
    assert np.array_equal(p["y"], a["y"])  # same examples, same labels
    assert not np.array_equal(p["x"], a["x"])
    assert np.array_equal(a["x"], b["x"])  # augmentation is seeded
    assert a["x"].shape == (32, 3072)
