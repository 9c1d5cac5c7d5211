"""The programs as a user meets them: README.md's command with relative paths
from another directory, a checkpoint save that fails mid-run, and one clear
line, with no traceback, for every failure a user can cause."""

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

import pytest

import datafiles
from mupc_flax import metrics
from programs import (REPO, RESUMABLE, checkpoint_steps, command, environment, run, run_program,
                      wait_for)

SHORT = ["--config.model.width=64", "--config.model.hidden_layers=4", "--config.train.num_steps=40",
         "--config.checkpoint_every_steps=20", "--config.eval_every_steps=40",
         "--config.log_every_steps=10", "--config.data.in_memory=False"]


def readme_main_command() -> tuple[dict[str, str], list[str]]:
  """The training command of README.md's first code block: its leading
  ``NAME=value`` environment and its argv (with this interpreter)."""
  text = (REPO / "README.md").read_text()
  block = re.search(r"```bash\n(.*?)```", text[text.index("## Two commands"):], re.S).group(1)
  words = shlex.split(next(part for part in block.split("&&") if "mupc_flax.main" in part))
  python = words.index("python")
  env = dict(word.split("=", 1) for word in words[:python])
  return env, [sys.executable, *words[python + 1:]]


@pytest.mark.slow
def test_readme_main_command_runs_from_another_directory_with_relative_paths(tmp_path):
  """The command exactly as README.md writes it (relative config, workdir and
  MNIST folder), run in a fresh directory laid out as the README assumes; it
  checkpoints, ends cleanly and, rerun with more steps, resumes."""
  mnist = os.environ.get("MUPC_MNIST_DIR")
  if not mnist:
    pytest.skip("MUPC_MNIST_DIR is unset: point it at the folder with the four MNIST idx .gz files.")
  project = tmp_path / "project"
  project.mkdir()
  (project / "configs").symlink_to(REPO / "configs")
  (tmp_path / "shared" / "data").mkdir(parents=True)
  (tmp_path / "shared" / "data" / "mnist").symlink_to(pathlib.Path(mnist).absolute())
  readme_env, argv = readme_main_command()
  assert readme_env == {"MUPC_MNIST_DIR": "../shared/data/mnist"}
  assert argv[-2:] == ["--config=configs/default.py", "--workdir=runs/mnist"]
  env = dict(environment(), **readme_env, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  del env["JAX_PLATFORMS"]  # as a user runs it: JAX looks for every backend

  first = subprocess.run(argv + SHORT, cwd=project, env=env, capture_output=True, text=True,
                         timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  workdir = project / "runs" / "mnist"
  assert f"workdir {workdir}" in first.stderr  # logged as the absolute path it resolved to
  assert "Traceback" not in first.stderr
  # No noise: the libtpu backend, tfds' OpenCV hint, a "download" of local files.
  for noise in ("libtpu", "OpenCV", "Downloading and preparing"):
    assert noise not in first.stdout + first.stderr, noise
  assert checkpoint_steps(workdir) == [20, 40]
  assert (tmp_path / "tfds" / "mnist" / "3.0.1" / "dataset_info.json").exists()  # from ../shared

  second = subprocess.run(argv + SHORT + ["--config.train.num_steps=60"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resumed from step 40 of 60" in second.stderr
  assert checkpoint_steps(workdir) == [20, 40, 60]


def stopped_between_saves(process, folder, after, timeout=240):
  """Stops ``process`` (SIGSTOP) once checkpoint ``after`` or a later one is
  complete and no save is under way (no temporary folder, every write done):
  the newest complete step. A stop that lands mid-save lets it finish first."""
  folder = pathlib.Path(folder)
  deadline = time.monotonic() + timeout
  while True:
    assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
    steps = checkpoint_steps(folder.parent)
    if steps and steps[-1] >= after and (folder / str(steps[-1]) / "_CHECKPOINT_METADATA").exists():
      process.send_signal(signal.SIGSTOP)
      wait_for(lambda: _state(process.pid) in "Tt", timeout=30, what="the process to stop")
      steps = checkpoint_steps(folder.parent)
      if not any(".orbax-checkpoint-tmp" in p.name for p in folder.iterdir()):
        return steps[-1]
      process.send_signal(signal.SIGCONT)  # mid-save: let it finish, and stop it again after
    time.sleep(0.005)


def _state(pid) -> str:
  """The process's state letter from /proc (T: stopped)."""
  return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.slow
def test_failed_save_stops_the_run_at_once_and_the_last_good_checkpoint_restores(
    tmp_path, mnist_data_dir):
  """After checkpoint 50, the process may no longer write files over 256 KiB
  (as a full disk or a quota would do); a checkpoint is about 2 MB. The limit
  comes while the process is stopped between two saves, so the next save is
  the one that fails: step 100, or a later one where this test saw 50 late."""
  args = [*RESUMABLE, "--config.keep_checkpoints=1"]
  process = subprocess.Popen(command(tmp_path, mnist_data_dir, *args), cwd=REPO,
                             env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  good = stopped_between_saves(process, tmp_path / "checkpoints", after=50)
  # Stopped, with no save under way: the limit is in place before the next save writes a byte,
  # however late this process saw checkpoint 50 (on a loaded machine the run may be further).
  failing = good + 50
  resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
  process.send_signal(signal.SIGCONT)
  _, stderr = process.communicate(timeout=240)

  assert process.returncode == 1, stderr[-3000:]
  assert "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf"error: Saving the checkpoint of step {failing} in \S+ failed \(.*File too large.*\)\. "
                      rf"The newest complete checkpoint is step {good}: .* rerun the same command .*", last), last
  logged = [r["step"] for r in metrics.read(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  assert failing <= max(logged) < failing + 50, logged  # stopped soon after the failed save, not at the next
  assert checkpoint_steps(tmp_path) == [good]  # keep_checkpoints=1, yet the failed save removed nothing

  resumed = run(tmp_path, mnist_data_dir, *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from step {good} of 300" in resumed.stderr
  assert checkpoint_steps(tmp_path) == [300]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["300"]  # no leftovers


# --- One line for every failure -----------------------------------------------------


@dataclasses.dataclass
class Setup:
  """What a failure case may use: its own folder, the prepared MNIST (or None)
  and a finished smoke run to copy."""

  folder: pathlib.Path
  data_dir: pathlib.Path | None
  trained: pathlib.Path | None
  env: dict = dataclasses.field(default_factory=dict)
  devices: int = 1

  @property
  def new_workdir(self) -> pathlib.Path:
    return self.folder / "new_run"

  def main(self, *flags, config="configs/default.py:smoke", workdir=None) -> list[str]:
    return [sys.executable, "-m", "mupc_flax.main", f"--config={config}",
            f"--workdir={workdir or self.new_workdir}",
            f"--config.data.data_dir={self.data_dir or self.folder / 'tfds'}",
            *flags]

  def copy_of_trained(self) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(self.trained, self.folder / "trained"))

  def file(self) -> pathlib.Path:
    path = self.folder / "a_file"
    path.write_text("not a directory")
    return path


def _program(module, *args):
  return [sys.executable, "-m", module, *args]


def _config_file(s: Setup, name: str, text: str) -> str:
  (s.folder / name).write_text(text)
  return str(s.folder / name)


def _dataset_folder(s: Setup, corrupt: bool) -> list[str]:
  source = s.folder / "source"
  source.mkdir()
  if corrupt:
    datafiles.write_mnist_like(source, train=10, test=10)
    (source / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
  s.env["MUPC_MNIST_DIR"] = str(source)
  s.data_dir = s.folder / "fresh_tfds"
  return s.main()


def _unreadable_checkpoints(s: Setup) -> list[str]:
  workdir = s.copy_of_trained()
  for blob in (workdir / "checkpoints").rglob("d/*"):
    blob.write_bytes(b"garbage")
  return s.main(workdir=workdir)


def _diverging(s: Setup) -> list[str]:
  return s.main("--config.train.learning_rate=1e4", "--config.inference.lr=1e4")


def _no_data_yet(s: Setup) -> None:
  """An unprepared data directory and an empty source folder: a run that got
  as far as loading the data would fail on them, with another message."""
  (s.folder / "empty").mkdir()
  s.env["MUPC_MNIST_DIR"] = str(s.folder / "empty")
  s.data_dir = s.folder / "unprepared"


def _refused_before_the_data(s: Setup, *flags) -> list[str]:
  _no_data_yet(s)
  return s.main(*flags, workdir=s.copy_of_trained())


def _batch_for_eight_devices(s: Setup) -> list[str]:
  s.devices = 8
  return s.main("--config.train.batch_size=30")


@dataclasses.dataclass
class Case:
  argv: Callable[[Setup], list[str]]
  message: str  # a regular expression the error line must match
  needs_data: bool = False
  no_new_workdir: bool = True  # the failed run must not have created its workdir
  after: Callable[[Setup], bool] = lambda s: True  # what else must hold afterwards


CASES = {
    # The config and its flags.
    "mistyped config field": Case(lambda s: s.main("--config.model.widht=3"),
                                  r"--config\.model\.widht: the config has no field 'widht'; did you mean 'width'\?"),
    "unknown variant": Case(lambda s: s.main(config="configs/default.py:smok"),
                            r"Unknown config variant 'smok'; did you mean 'smoke'\? Use smoke, sp, bp, "
                            r"deep, epc or name=value"),
    "unknown variant of a config with recipes": Case(
        lambda s: s.main(config="configs/mnist_transformer.py:adamv"),
        r"Unknown config variant 'adamv'; did you mean 'adamw'\? Use smoke, sp, bp, deep, epc, "
        r"adamw, limits or name=value"),
    "bad name=value": Case(lambda s: s.main(config="configs/default.py:width=abc"),
                           r"'width=abc': 'abc' is not a valid int"),
    "unknown name=value": Case(lambda s: s.main(config="configs/default.py:wdth=3"),
                               r"'wdth' is a field of none of config\.model"),
    "config file missing": Case(lambda s: s.main(config="configs/nope.py"),
                                r"there is no config file \S+/configs/nope\.py; give its path"),
    "config file missing, with --traceback": Case(
        lambda s: s.main("--traceback", config="configs/nope.py"), r"there is no config file \S+/configs/nope\.py"),
    "config file does not parse": Case(
        lambda s: s.main(config=_config_file(s, "broken.py", "def get_config(:\n")),
        r"the config file \S+broken\.py failed: SyntaxError"),
    "config file fails to run": Case(
        lambda s: s.main(config=_config_file(s, "raising.py", "def get_config():\n  return missing\n")),
        r"the config file \S+raising\.py failed: NameError: name 'missing' is not defined"),
    "invalid value": Case(lambda s: s.main("--config.model.width=0"), r"config\.model \(dense\) cannot be built for mnist \(28×28×1 images\): ResidualPCN needs width to be a positive integer, got 0\."),
    "batch not divisible": Case(_batch_for_eight_devices, r"divisible by the number of devices \(8\)"),
    "flag of the wrong type": Case(lambda s: s.main("--config.train.num_steps=abc"),
                                   r"--config\.train\.num_steps=abc: invalid literal for int"),
    "no workdir": Case(lambda s: s.main()[:4], r"Flag --workdir must have a value"),
    "empty workdir": Case(lambda s: s.main(workdir=" "), r"--workdir is empty"),
    "stray argument": Case(lambda s: s.main("extra"), r"Unexpected arguments \['extra'\]"),
    # Directories.
    "workdir is a file": Case(lambda s: s.main(workdir=s.file()), r"The workdir \S+a_file is a file, not a directory"),
    "workdir not writable": Case(lambda s: s.main(workdir="/sys/mupc_flax_test/run"),
                                 r"The workdir /sys/mupc_flax_test/run cannot be written"),
    "workdir under /proc": Case(lambda s: s.main(workdir="/proc/mupc_flax_test/run"),
                                r"The workdir /proc/mupc_flax_test/run cannot be written \(/proc is in the "
                                r"kernel's proc file system, which holds no files of yours\)"),
    "data dir not writable": Case(lambda s: s.main("--config.data.data_dir=/sys/mupc_flax_test/data"),
                                  r"The data directory /sys/mupc_flax_test/data cannot be written"),
    # Datasets.
    "dataset files missing": Case(lambda s: _dataset_folder(s, corrupt=False), r"lacks \['train-images-idx3-ubyte\.gz'"),
    "dataset files corrupt": Case(lambda s: _dataset_folder(s, corrupt=True),
                                  r"train-images-idx3-ubyte\.gz is corrupt or truncated"),
    # Runs and workdirs.
    # A fresh workdir of a run that saved and logged nothing is removed again.
    "diverged run": Case(_diverging, r"Non-finite .* at step \d+: training diverged\. No checkpoint "
                         r"was saved; lower train\.learning_rate", needs_data=True),
    "batch larger than the training split": Case(
        lambda s: s.main("--config.train.batch_size=100000"),
        r"config\.train\.batch_size = 100000 is larger than the training split \(60000 examples of "
        r"mnist\); use at most 60000\.", needs_data=True),
    # Refused before the data is loaded (it is not even prepared here).
    "workdir of another model": Case(
        lambda s: _refused_before_the_data(s, "--config.model.hidden_layers=6"),
        r"holds checkpoints of a different model \(\S+: saved \(3, 64, 64\) vs now \(5, 64, 64\),",
        needs_data=True, after=lambda s: checkpoint_steps(s.folder / "trained") == [30]),
    "no readable checkpoint": Case(_unreadable_checkpoints, r"No checkpoint in \S+ is readable", needs_data=True),
    "workdir in use": Case(_refused_before_the_data, r"Another run is using the workdir", needs_data=True),
    # The other programs.
    "prepare without a dataset": Case(lambda s: _program("mupc_flax.data", "prepare"), r"--dataset is required"),
    "prepare from a missing folder": Case(
        lambda s: _program("mupc_flax.data", "prepare", "--dataset=mnist", f"--data_dir={s.folder}",
                           f"--manual_dir={s.folder / 'nowhere'}"),
        r"The folder \S+nowhere \(from manual_dir\) does not exist"),
    "sweep into a file": Case(
        lambda s: _program("mupc_flax.sweep", "--config=configs/default.py:smoke", f"--workdir={s.file()}"),
        r"The sweep directory \S+ is a file"),
    "plots of a folder without a sweep": Case(lambda s: _program("mupc_flax.plots", "sweep", str(s.folder)),
                                              r"\S+ has no sweep\.json"),
    "plots with an unknown command": Case(lambda s: _program("mupc_flax.plots", "draw", "x"),
                                          r"usage: python -m mupc_flax\.plots sweep SWEEP_DIR"),
    "sample without a run": Case(
        lambda s: _program("mupc_flax.sample", f"--workdir={s.folder / 'none'}"),
        r"\S+none holds no training run \(no config\.json\); give the --workdir of one"),
    # Text.
    "text window of no characters": Case(
        lambda s: s.main("--config.data.context=0", config="configs/shakespeare.py:smoke"),
        r"config\.data\.context \(the characters a network sees\) must be a positive integer for "
        r"shakespeare, got 0"),
    "image network on text": Case(
        lambda s: s.main(config="configs/shakespeare.py:kind=dense,smoke"),
        r"config\.model \(dense\) cannot be built for shakespeare \(windows of 64 characters\): its "
        r"outputs are \[1, 84\] for a batch of 1, the targets \[1, 64, 84\]; choose a network that "
        r"predicts every position \(causal_transformer\)\."),
    "convolutional network on text": Case(
        lambda s: s.main(config="configs/shakespeare.py:kind=conv,smoke"),
        r"config\.model \(conv\) cannot be built for shakespeare \(windows of 64 characters\): the "
        r"network reads images \(.*\); choose causal_transformer for text\."),
    "negative evaluation windows": Case(
        lambda s: s.main("--config.data.eval_windows=-5", config="configs/shakespeare.py:smoke"),
        r"config\.data\.eval_windows \(the test windows evaluated; 0: all\) must be a non-negative "
        r"integer, got -5\."),
    "language network on images": Case(
        lambda s: s.main(config="configs/default.py:kind=causal_transformer,smoke"),
        r"config\.model \(causal_transformer\) cannot be built for mnist \(28×28×1 images\): the "
        r"causal transformer reads text"),
}


@pytest.fixture(scope="module")
def failures(request, tmp_path_factory):
  """Runs every case (three at a time): name -> (CompletedProcess, Setup)."""
  try:
    data_dir = request.getfixturevalue("mnist_data_dir")
  except pytest.skip.Exception:
    data_dir = None
  # A finished 30-step smoke run, which the cases copy (conftest.py; test_train reads it too).
  trained = request.getfixturevalue("smoke_run_30_steps") if data_dir is not None else None
  setups = {}
  for name, case in CASES.items():
    if case.needs_data and data_dir is None:
      continue
    setup = Setup(tmp_path_factory.mktemp("case"), data_dir, trained)
    setups[name] = (case.argv(setup), setup)
  with contextlib.ExitStack() as locks:
    if "workdir in use" in setups:  # this test process plays the other run
      lock = locks.enter_context(open(setups["workdir in use"][1].folder / "trained" / ".lock", "w"))
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def execute(name):
      argv, setup = setups[name]
      return run_program(argv, dict(environment(setup.devices), **setup.env))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      results = dict(zip(setups, pool.map(execute, setups)))
  return {name: (results[name], setups[name][1]) for name in setups}


@pytest.mark.parametrize("name", list(CASES))
def test_every_failure_is_one_clear_line(name, failures):
  if name not in failures:
    pytest.skip("needs real MNIST (MUPC_MNIST_DIR)")
  result, setup = failures[name]
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-3000:]
  assert "Traceback" not in output and "NoneType: None" not in output, output[-3000:]
  assert not re.search(r"^E\d{4} ", output, re.M), output[-3000:]  # no library error logs either
  errors = [line for line in output.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], output[-3000:]
  assert re.search(CASES[name].message, errors[0]), errors[0]
  if CASES[name].no_new_workdir:
    assert not setup.new_workdir.exists()
  assert CASES[name].after(setup)


def test_help_lists_the_variants_and_print_config_lists_the_fields():
  helped = run_program([sys.executable, "-m", "mupc_flax.main", "--help"], environment())
  assert "Traceback" not in helped.stderr, helped.stderr[-3000:]  # (absl's --help exits 1)
  for variant in ("smoke", "bp", "sp", "deep", "name=value", "--print_config", "~/tensorflow_datasets"):
    assert variant in helped.stdout, variant
  assert re.search(r"^  smoke: a tiny model", helped.stdout, re.M)
  printed = run_program([sys.executable, "-m", "mupc_flax.main", "--config=configs/default.py:smoke",
                         "--print_config"], environment())
  assert printed.returncode == 0, printed.stderr[-3000:]
  config = json.loads(printed.stdout)
  assert config["train"]["num_steps"] == 60 and config["model"]["width"] == 64


def test_plots_without_out_write_beside_their_input(tmp_path):
  run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
  run_dir.mkdir()
  elsewhere.mkdir()
  (run_dir / "metrics.jsonl").write_text(json.dumps(
      {"step": 10, "split": "eval", "pc_bp_cosines": [0.2, 0.6, 0.95]}) + "\n")
  result = run_program([sys.executable, "-m", "mupc_flax.plots", "cosines", str(run_dir)],
                       dict(environment(), PYTHONPATH=str(REPO)), cwd=elsewhere)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (run_dir / "cosines.png").is_file() and not list(elsewhere.iterdir())
