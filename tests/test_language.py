"""Language: per-token outputs in the engine, the text datasets and their
windows, the Shakespeare config and ``mupc_flax.sample``.

Oracles: NumPy's log-softmax and argmax per token, the works read again
from the archive with ``tarfile``, tfds' 90/5/5 cut written out, and the
sampler's greedy choice recomputed from the checkpoint's weights.
"""

import functools
import hashlib
import http.server
import os
import pathlib
import sys
import tarfile
import threading

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from flax import nnx

import mupc_flax as mf
from mupc_flax import data, metrics, pc
from mupc_flax.data import builders, text
from programs import environment, load_checkpoint, run, run_program

SMALL = dict(width=16, blocks=1, heads=2)


def _network(vocab=7, context=5, seed=0, **fields):
  return mf.CausalTransformerPCN(vocab, context, **(SMALL | fields), rngs=nnx.Rngs(seed))


def _tokens(seed, batch=6, vocab=7, context=5):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, vocab, (batch, context)).astype(np.int32)
  y = np.eye(vocab, dtype=np.float32)[rng.integers(0, vocab, (batch, context))]
  return x, y


def _numpy_metrics(outputs, y):
  """Per token: the mean cross-entropy and the accuracy, over samples and positions."""
  outputs = np.asarray(outputs, np.float64)
  log_softmax = outputs - outputs.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  ce = -(y * log_softmax).sum(-1)
  return ce.mean(), (outputs.argmax(-1) == y.argmax(-1)).mean()


# --- Per-token outputs in the engine -----------------------------------------------------------


def test_the_network_is_causal_and_predicts_every_position():
  net, (x, _) = _network(), _tokens(0)
  outputs = np.asarray(net(x))
  assert outputs.shape == (6, 5, 7)
  changed = x.copy()
  changed[:, 3:] = (changed[:, 3:] + 1) % 7
  after = np.asarray(net(changed))
  np.testing.assert_array_equal(after[:, :3], outputs[:, :3])  # the past cannot see the future
  assert np.abs(after[:, 3:] - outputs[:, 3:]).min() > 0


@pytest.mark.parametrize("algorithm", ["bp", "pc"])
def test_loss_and_accuracy_are_per_token(algorithm):
  """BP's and PC's logged loss and accuracy are NumPy's per-token means, and
  the energy's output term is the sum over positions (T × the loss)."""
  net, (x, y) = _network(), _tokens(1)
  ce, accuracy = _numpy_metrics(net(x), y)
  if algorithm == "bp":
    _, logged = nnx.jit(lambda n: pc.bp_gradients(n, x, y, loss="ce"))(net)
  else:
    inference = mf.Inference(steps=0, lr=0.1)
    _, logged = nnx.jit(lambda n: pc.pc_gradients(n, x, y, inference, loss="ce"))(net)
    np.testing.assert_allclose(logged["layer_energies"][-1], 5 * ce, rtol=1e-5)
  np.testing.assert_allclose(logged["loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(logged["accuracy"], accuracy, rtol=1e-6)


def test_the_eval_step_sums_per_token_metrics_over_unmasked_samples():
  net, (x, y) = _network(), _tokens(2, batch=8)
  mask = np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32)
  sums = mf.make_eval_step(net, mf.make_mesh(jax.devices()[:2]), loss="ce")(
      nnx.state(net), x, y, mask)
  kept = mask == 1
  ce, accuracy = _numpy_metrics(np.asarray(net(x))[kept], y[kept])
  assert float(sums["count"]) == kept.sum()
  np.testing.assert_allclose(sums["loss"] / sums["count"], ce, rtol=1e-5)
  np.testing.assert_allclose(sums["correct"] / sums["count"], accuracy, rtol=1e-6)


def test_bp_trains_the_network_to_copy_its_input():
  """A real task: the output at t must name the token at t (targets = inputs)."""
  net = _network(vocab=5, context=6, width=32, parameterization="sp")
  optimizer = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.Param)
  step = mf.make_train_step(net, optimizer, mf.make_mesh(jax.devices()[:1]), algorithm="bp",
                            loss="ce")
  state = (nnx.state(net), nnx.state(optimizer))
  rng = np.random.default_rng(0)
  for _ in range(150):
    x = rng.integers(0, 5, (32, 6)).astype(np.int32)
    *state, logged = step(*state, x, np.eye(5, dtype=np.float32)[x])
  assert float(logged["accuracy"]) > 0.95, logged


# --- The text datasets ------------------------------------------------------------------------


def _works(archive):
  with tarfile.open(archive) as tar:
    return {pathlib.Path(m.name).name.removesuffix("_gut.txt"): tar.extractfile(m).read().decode()
            for m in tar.getmembers() if m.name.endswith("_gut.txt")}


def test_shakespeare_holds_out_the_last_tenth_of_every_work(shakespeare_data_dir):
  archive = pathlib.Path(os.environ.get("MUPC_SHAKESPEARE_DIR") or pathlib.Path(
      __file__).resolve().parents[2] / "shared/data/shakespeare") / text.SHAKESPEARE_ARCHIVE
  works = _works(archive)
  assert len(works) == 42 and sum(map(len, works.values())) == 5_057_198
  train, test = ({e["title"].decode(): e["text"].decode() for e in (source[i] for i in range(len(source)))}
                 for source in (tfds.data_source("shakespeare", split=split,
                                                 data_dir=shakespeare_data_dir)
                                for split in ("train", "test")))
  for title, work in works.items():
    assert train[title] + test[title] == work, title  # split, not copied or reordered
    assert train[title].endswith("\n") and 0.09 < len(test[title]) / len(work) < 0.11, title
  assert set(data.TextSpec(text.VOCABULARIES["shakespeare"], 1).vocabulary) == set(
      "".join(works.values()))
  # The splits as windows: every start for training, disjoint ones spread for evaluation.
  split = data.TextSplit("shakespeare", "train", shakespeare_data_dir, 64)
  assert len(split) == sum(map(len, train.values())) - 64
  batch = split.examples(np.array([0, 1000]))
  joined = "".join(train[t] for t in sorted(train))
  spec = split.spec
  assert spec.decode(batch["x"][1]) == joined[1000:1064]
  assert spec.decode(batch["y"][1].argmax(-1)) == joined[1001:1065]
  evaluation = data.TextSplit("shakespeare", "test", shakespeare_data_dir, 64, disjoint=True,
                              max_windows=100)
  starts = np.arange(len(evaluation)) * evaluation.stride
  assert len(evaluation) == 100 and evaluation.stride >= 64
  assert starts[-1] + 65 <= len(evaluation.tokens) and starts[-1] > 0.95 * len(evaluation.tokens) - evaluation.stride


def _tiny_source(folder, text_body):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "input.txt").write_bytes(text_body)
  return folder


def test_tiny_shakespeare_has_tfds_splits_and_vocabulary(tmp_path):
  body = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40).encode()
  source = _tiny_source(tmp_path / "src", body)
  data.prepare("tiny_shakespeare", tmp_path / "tfds", manual_dir=source)
  folder = tmp_path / "tfds" / "tiny_shakespeare" / "1.0.0"
  assert (folder / "metadata.json").is_file()
  whole = body.decode()
  cut = int(len(whole) * 0.9)
  rest = whole[cut:]
  expected = {"train": whole[:cut], "validation": rest[:int(len(rest) * 0.5)],
              "test": rest[int(len(rest) * 0.5):]}
  for name, part in expected.items():
    split = data.TextSplit("tiny_shakespeare", name, tmp_path / "tfds", 8)
    assert split.spec.decode(split.tokens) == part, name
  assert len(text.VOCABULARIES["tiny_shakespeare"]) == 65


@pytest.mark.parametrize("damage, match", [
    (b"caf\xc3\xa9 au lait\n" * 20, "'é' is not in the vocabulary"),
    (b"\xff\xfe not text" * 20, "not UTF-8 text"),
])
def test_a_bad_text_source_is_one_clear_error_and_leaves_nothing(tmp_path, damage, match):
  source = _tiny_source(tmp_path / "src", damage)
  with pytest.raises(data.DataError, match=match):
    data.prepare("tiny_shakespeare", tmp_path / "tfds", manual_dir=source)
  assert not (tmp_path / "tfds").exists()


def test_a_bad_shakespeare_archive_is_one_clear_error(tmp_path):
  folder = tmp_path / "src"
  folder.mkdir()
  (folder / text.SHAKESPEARE_ARCHIVE).write_bytes(b"not a tar archive" * 10)
  with pytest.raises(data.DataError, match="corrupt or truncated"):
    data.prepare("shakespeare", tmp_path / "tfds", manual_dir=folder)
  with pytest.raises(data.DataError, match="shakespeare has no download.*MUPC_SHAKESPEARE_DIR"):
    with pytest.MonkeyPatch.context() as patch:
      patch.delenv("MUPC_SHAKESPEARE_DIR", raising=False)  # .ci/run sets it
      data.prepare("shakespeare", tmp_path / "tfds2")
  assert not (tmp_path / "tfds").exists() and not (tmp_path / "tfds2").exists()


def test_tiny_shakespeare_download_is_checked_by_sha256(tmp_path, monkeypatch):
  """A served input.txt with the wrong checksum is refused; the right one prepares."""
  served = _tiny_source(tmp_path / "served", b"ROMEO:\nO, she doth teach the torches.\n" * 30)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}/"
  try:
    monkeypatch.delenv("MUPC_TINY_SHAKESPEARE_DIR", raising=False)
    with pytest.raises(data.DataError, match="Checksum mismatch.*input.txt"):
      data.prepare("tiny_shakespeare", tmp_path / "refused", url=url)
    assert not (tmp_path / "refused").exists()
    digest = hashlib.sha256((served / "input.txt").read_bytes()).hexdigest()
    monkeypatch.setitem(builders.SOURCES, "tiny_shakespeare", builders.Source(
        url=url, sha256={"input.txt": digest}, env_var="MUPC_TINY_SHAKESPEARE_DIR"))
    data.prepare("tiny_shakespeare", tmp_path / "tfds")
    assert data.is_prepared("tiny_shakespeare", tmp_path / "tfds")
  finally:
    server.shutdown()
    server.server_close()


def test_the_window_pipeline_is_checkpointable(shakespeare_data_dir):
  split = data.TextSplit("shakespeare", "train", shakespeare_data_dir, 16)
  dataset = data.train_dataset(split, global_batch_size=8, seed=4)
  straight = iter(dataset)
  expected = [next(straight) for _ in range(6)]
  interrupted = iter(dataset)
  for _ in range(3):
    next(interrupted)
  resumed = iter(data.train_dataset(split, global_batch_size=8, seed=4))
  resumed.set_state(interrupted.get_state())
  for want in expected[3:]:
    got = next(resumed)
    assert got["x"].dtype == np.int32 and got["y"].shape == (8, 16, 84)
    np.testing.assert_array_equal(got["x"], want["x"])


# --- The program: train, evaluate in bits, sample ---------------------------------------------


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, shakespeare_data_dir):
  workdir = tmp_path_factory.mktemp("text") / "run"
  done = run(workdir, shakespeare_data_dir, "--config.train.num_steps=30",
             "--config.eval_every_steps=30", "--config.log_gradient_agreement=False",
             config="configs/shakespeare.py:smoke,epc")
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def _sample(workdir, *flags):
  return run_program([sys.executable, "-m", "mupc_flax.sample", f"--workdir={workdir}", *flags],
                     environment())


def _restored(workdir, step):
  """The smoke causal transformer with the weights of ``workdir``'s checkpoint ``step``."""
  net = mf.CausalTransformerPCN(84, 64, **SMALL, rngs=nnx.Rngs(0))
  saved = load_checkpoint(workdir, step)
  # The saved tree holds each variable under its path (and, for some, a field below it).
  weight = lambda path: next(v for k, v in saved.items() if k.startswith(jax.tree_util.keystr(path)))
  nnx.update(net, jax.tree_util.tree_map_with_path(lambda path, _: weight(path),
                                                   nnx.to_pure_dict(nnx.state(net))))
  return net


def test_evaluation_logs_the_test_loss_per_character_in_nats_and_bits(text_run,
                                                                      shakespeare_data_dir):
  """The logged loss is NumPy's cross-entropy of the final weights on the
  2,048 evaluation windows, per character; bits are that over ln 2."""
  final = [r for r in metrics.read(text_run / "metrics.jsonl") if r["split"] == "eval"][-1]
  split = data.TextSplit("shakespeare", "test", shakespeare_data_dir, 64, disjoint=True,
                         max_windows=2048)
  batch = split.examples(np.arange(len(split)))
  ce, accuracy = _numpy_metrics(_restored(text_run, 30)(batch["x"]), batch["y"])
  assert final["examples"] == 2048
  np.testing.assert_allclose(final["loss"], ce, rtol=1e-4)
  np.testing.assert_allclose(final["accuracy"], accuracy, atol=1e-6)
  np.testing.assert_allclose(final["bits_per_character"], ce / np.log(2), rtol=1e-4)


def test_greedy_sampling_follows_the_checkpoints_predictions(text_run):
  """τ = 0: each character is the argmax of the restored weights' prediction at
  the last position of the window (recomputed here from the checkpoint)."""
  done = _sample(text_run, "--prompt=ROMEO:", "--length=12", "--temperature=0")
  assert done.returncode == 0, done.stderr[-2000:]
  printed = done.stdout.removesuffix("\n")
  assert printed.startswith("ROMEO:") and len(printed) == len("ROMEO:") + 12
  spec = data.TextSpec(text.VOCABULARIES["shakespeare"], 64)
  net = _restored(text_run, 30)
  ids = list(spec.encode("ROMEO:"))
  for _ in range(12):
    window = np.pad(ids, (0, 64 - len(ids)))[None]
    ids.append(int(np.argmax(np.asarray(net(window))[0, len(ids) - 1])))
  assert printed == spec.decode(ids)


@pytest.mark.parametrize("flags, message", [
    (["--prompt=ROMÉO"], "--prompt: 'É' is not in the vocabulary"),
    (["--length=-1"], "--length must be 0 or more"),
])
def test_sampling_refuses_bad_input_in_one_line(text_run, flags, message):
  done = _sample(text_run, *flags)
  assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(
      f"error: {message}"), done.stderr[-1500:]
  assert "Traceback" not in done.stderr


def test_sampling_a_run_of_images_says_it_is_not_text(smoke_run):
  done = _sample(smoke_run[0])
  assert done.returncode == 1 and "not text" in done.stderr.splitlines()[-1], done.stderr[-1500:]
