"""The documentation's commands run, and its API reference covers every exported name.

The convention: a command the README or a guide page (docs/*.md) shows as
runnable is a line of a ```bash block (``\\`` continues it, ``&&`` chains
commands, a leading ``VAR=value`` sets the environment). Every such command
that is ``python -m mupc_flax.<program>`` is run here at smoke size; every
other one must be in ``NOT_RUN``, with the reason it is not. Shell lines that
are not meant to be run as written go in ```text or ```console blocks.

- ``python -m mupc_flax.main --config=SPEC --workdir=W [--config.a.b=v …]``
  loads ``mupc_flax.configuration.load(SPEC + ",smoke" (":smoke" where SPEC
  has no ':'), ["a.b=v", …, "train.num_steps=2"])``, sets
  ``eval_every_steps = 0`` (evaluate once, at the end; a warm-up is cut to
  1 step) and validates it as the program does, before any compute. The first
  command on each offline dataset (MNIST, ``mnist_data_dir``: the README's;
  Shakespeare, ``shakespeare_data_dir``) then trains in this process
  (``mupc_flax.train.train_and_evaluate``); the others are only validated:
  training each would cost about 20 s of compiling here, and
  tests/test_conformance.py trains every network kind from the command line. Configs on datasets not available offline (cifar10,
  fashion_mnist) are only validated. ``--print_config`` only loads. A later
  command's workdir stands for its dataset's trained run.
- ``mupc_flax.sweep``: the first one runs in a subprocess with the first
  value of each of its lists, one worker, the smoke variant and 2 steps per
  point; the others' configs are loaded and validated.
- ``mupc_flax.plots`` runs in a subprocess on the workdirs the commands
  before it wrote (each workdir a command names stands for its run here).
- ``mupc_flax.data prepare`` runs in a subprocess on the offline MNIST files
  (``$MUPC_MNIST_DIR``) or the Shakespeare archive into the prepared data
  directory, which it finds prepared.
- ``mupc_flax.sample`` runs in a subprocess on the trained run its
  ``--workdir`` stands for, 20 characters.

docs/results.md and docs/benchmarks.md are records of measured runs: their
``python -m mupc_flax.main`` and ``mupc_flax.sweep`` configs are only loaded
and validated (most are GPU-sized), and their other lines (the studies,
timing scripts, shell loops) are not checked.

Cost, measured on a 2-core machine shared with other jobs: about 50 s for the
main commands (two trainings, about 20 s each, and the rest validated);
the sweep, plots, data and sample subprocesses add about 40 s.
"""

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import pathlib
import re
import shlex
import sys
import ast

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RECORDS = ("results.md", "benchmarks.md")  # docs/ pages that record measured runs
GUIDES = sorted(p for p in (REPO / "docs").glob("*.md") if p.name not in RECORDS)
# What the tests have files for: MUPC_MNIST_DIR, and MUPC_SHAKESPEARE_DIR (or ../shared).
OFFLINE_DATASETS = ("mnist", "shakespeare")

# Command prefixes the guide pages show but this test does not run, and why.
NOT_RUN = {
    ("python3", "-m", "venv"): "creates the environment these tests run in",
    (".", ".venv/bin/activate"): "activates the environment these tests run in",
    ("pip", "install"): "installs the environment these tests run in",
    ("python", "-m", "pytest"): "the test suite itself",
    ("python", "docs/"): "the studies behind docs/results.md: hours of ordinary training runs",
    ("python", "benchmarks/gpu_suite.py"): "the GPU suite, with its own tests",
    ("python", "benchmarks/"): "timing scripts: minutes of repeated steps; tests/test_kernels.py runs ptx_check.py",
    ("launch/local.sh",): "starts processes of mupc_flax.main; tests/test_faults.py and test_train.py run it",
    ("sbatch",): "needs a SLURM cluster",
}


@dataclasses.dataclass(frozen=True)
class Command:
  page: str  # the file it is shown in, relative to the repository
  env: tuple[tuple[str, str], ...]  # leading VAR=value assignments
  argv: tuple[str, ...]

  @property
  def program(self) -> str | None:
    """The mupc_flax program (``mupc_flax.main``, …) or None for another command."""
    if self.argv[:2] == ("python", "-m") and len(self.argv) > 2 and self.argv[2].startswith("mupc_flax."):
      return self.argv[2]
    return None

  def __str__(self):
    return " ".join([f"{k}={v}" for k, v in self.env] + [shlex.quote(a) for a in self.argv])


def bash_lines(markdown: str) -> list[str]:
  """The lines of the ```bash blocks, continuations (a trailing ``\\``) joined."""
  lines, block = [], None
  for line in markdown.splitlines():
    if line.startswith("```"):
      block = None if block is not None else line[3:].strip()
      continue
    if block == "bash":
      if lines and lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1].rstrip() + " " + line.strip()
      else:
        lines.append(line.strip())
  return [line for line in lines if line and not line.startswith("#")]


def commands(markdown: str, page: str = "") -> list[Command]:
  """Every command of the ```bash blocks: lines split at ``&&``, comments dropped."""
  found = []
  for line in bash_lines(markdown):
    tokens = shlex.split(line, comments=True)
    while tokens:
      cut = tokens.index("&&") if "&&" in tokens else len(tokens)
      segment, tokens = tokens[:cut], tokens[cut + 1:]
      env = []
      while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
        env.append(tuple(segment.pop(0).split("=", 1)))
      if segment:
        found.append(Command(page, tuple(env), tuple(segment)))
  return found


def page_commands(paths) -> list[Command]:
  return [c for p in paths for c in commands(p.read_text(), str(p.relative_to(REPO)))]


def guide_commands() -> list[Command]:
  return page_commands([README, *GUIDES])


def flags(command: Command) -> tuple[dict[str, str], list[str], list[str]]:
  """(--name=value flags, the --config.a.b=v overrides as "a.b=v", positional arguments)."""
  named, overrides, positional = {}, [], []
  for arg in command.argv[3:]:
    if arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    elif arg.startswith("--"):
      name, _, value = arg[2:].partition("=")
      named[name] = value
    else:
      positional.append(arg)
  return named, overrides, positional


def smoke(spec: str) -> str:
  return spec + (",smoke" if ":" in spec else ":smoke")


# --- the extractor, on a sample ------------------------------------------------------------

SAMPLE = """
Some text with `python -m mupc_flax.main --config=inline.py`, not a command.

```bash
python -m mupc_flax.main --config=configs/default.py:smoke --workdir=runs/a   # a comment
python -m mupc_flax.sweep --config=configs/mnist_depth.py --workdir=runs/s \\
    --widths=64,256
python3 -m venv .venv && . .venv/bin/activate && MUPC_MNIST_DIR=../m python -m mupc_flax.main --config=c.py --workdir=w
```

```text
sbatch launch/slurm.sbatch
```

```python
python = "not shell"
```
"""


def test_the_extractor_finds_the_commands_of_bash_blocks_only():
  found = commands(SAMPLE, "sample.md")
  assert [str(c) for c in found] == [
      "python -m mupc_flax.main --config=configs/default.py:smoke --workdir=runs/a",
      "python -m mupc_flax.sweep --config=configs/mnist_depth.py --workdir=runs/s --widths=64,256",
      "python3 -m venv .venv",
      ". .venv/bin/activate",
      "MUPC_MNIST_DIR=../m python -m mupc_flax.main --config=c.py --workdir=w",
  ]
  assert [c.program for c in found] == ["mupc_flax.main", "mupc_flax.sweep", None, None,
                                        "mupc_flax.main"]
  assert flags(found[4]) == ({"config": "c.py", "workdir": "w"}, [], [])
  assert smoke("configs/default.py") == "configs/default.py:smoke"
  assert smoke("configs/default.py:bp") == "configs/default.py:bp,smoke"


def test_every_command_shown_is_run_or_says_why_not():
  """Each command of the README and the guide pages is a mupc_flax program this
  test runs, or a NOT_RUN prefix; the list is printed (pytest -s)."""
  found = guide_commands()
  unknown = []
  for command in found:
    reason = next((why for prefix, why in NOT_RUN.items()
                   if command.argv[:len(prefix)] == prefix
                   or (prefix[-1].endswith("/") and len(command.argv) >= len(prefix)
                       and command.argv[:len(prefix) - 1] == prefix[:-1]
                       and command.argv[len(prefix) - 1].startswith(prefix[-1]))), None)
    if command.program:
      assert command.program in RUNNERS, f"{command.page}: no runner for {command.program}: {command}"
      print(f"run      {command.page}: {command}")
    elif reason:
      print(f"not run  {command.page}: {command}  ({reason})")
    else:
      unknown.append(f"{command.page}: {command}")
  assert not unknown, ("Commands in ```bash blocks that this test neither runs nor lists in "
                       f"NOT_RUN (show them in a ```text block, or add a reason): {unknown}")
  shown = {str(c) for c in found}
  # The README's two commands, as the README gives them.
  assert ("MUPC_MNIST_DIR=../shared/data/mnist python -m mupc_flax.main "
          "--config=configs/default.py --workdir=runs/mnist") in shown
  assert "python -m pytest -q -n 2" in shown


# --- running them ------------------------------------------------------------------------

def _validate(config) -> None:
  """The training program's config check, before any compute. It is
  ``validate_config(config, num_devices, num_processes)``: in
  ``mupc_flax.train`` before the split of train.py, then in
  ``mupc_flax.validation``."""
  import jax
  from mupc_flax import train
  validate = getattr(train, "validate_config", None)
  for module in ("mupc_flax.validation", "mupc_flax.train.validation"):
    if validate is None and importlib.util.find_spec(module) is not None:
      validate = importlib.import_module(module).validate_config
  validate(config, jax.device_count(), 1)


def _subprocess(argv, what):
  from programs import environment, run_program
  result = run_program([sys.executable, *argv], environment())
  assert result.returncode == 0, f"{what} failed:\n{result.stderr[-3000:]}"
  return result


class Runs:
  """The workdirs the commands name, each mapped to where its run went here."""

  def __init__(self, tmp_path, data_dirs: dict):
    self.tmp_path, self.data_dirs = tmp_path, data_dirs  # dataset name -> its data directory
    self.data_dir = data_dirs["mnist"]
    self.workdirs: dict[str, pathlib.Path] = {}
    self.trained: dict[str, pathlib.Path] = {}  # dataset -> its trained run
    self.sweep: pathlib.Path | None = None
    self.validated = 0

  def folder(self, name: str) -> pathlib.Path:
    self._count = getattr(self, "_count", 0) + 1
    return self.tmp_path / f"{self._count:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', name)[-40:]}"

  def workdir(self, named: str) -> pathlib.Path:
    assert named in self.workdirs, (f"{named} is not the --workdir of a command shown before "
                                    "this one: give it one, so that the page can be followed")
    return self.workdirs[named]


def run_main(command: Command, runs: Runs) -> None:
  from mupc_flax import configuration, train
  named, overrides, _ = flags(command)
  config = configuration.load(smoke(named["config"]), [*overrides, "train.num_steps=2"])
  config.eval_every_steps = 0  # once, at the end
  config.data.data_dir = str(runs.data_dirs.get(config.data.name, runs.data_dir))
  if "print_config" in named:
    return
  if config.train.warmup_steps >= 2:  # a warm-up longer than the run is refused
    config.train.warmup_steps = 1
  _validate(config)
  dataset = config.data.name
  if dataset not in runs.trained and dataset in runs.data_dirs:
    workdir = runs.folder(named["workdir"])
    result = train.train_and_evaluate(config, workdir)
    assert "accuracy" in result, f"{command}: {result}"
    runs.trained[dataset] = workdir
  else:
    runs.validated += 1
  # A later command's workdir stands for the trained run of its dataset (for plots, sample).
  if dataset in runs.trained:
    runs.workdirs[named["workdir"]] = runs.trained[dataset]


def run_sweep(command: Command, runs: Runs) -> None:
  named, overrides, _ = flags(command)
  if runs.sweep is not None:  # one sweep runs; the others' configs load and validate
    from mupc_flax import configuration
    _validate(configuration.load(smoke(named["config"]), overrides))
    runs.workdirs[named["workdir"]] = runs.sweep
    runs.validated += 1
    return
  workdir = runs.sweep = runs.folder(named["workdir"])
  argv = ["-m", "mupc_flax.sweep", f"--config={smoke(named['config'])}", f"--workdir={workdir}"]
  for name in ("learning_rates", "inference_lrs", "widths", "depths"):
    if name in named:
      argv.append(f"--{name}={named[name].split(',')[0]}")
  argv += [f"--config.{o}" for o in overrides]
  argv += ["--config.train.num_steps=2", "--config.eval_every_steps=0",
           f"--config.data.data_dir={runs.data_dir}"]
  _subprocess(argv, str(command))
  rows = json.loads((workdir / "sweep.json").read_text())
  assert rows and all(r["status"] in ("ok", "diverged") for r in rows), rows
  runs.workdirs[named["workdir"]] = workdir


def run_plots(command: Command, runs: Runs) -> None:
  named, _, positional = flags(command)
  kind, folders = positional[0], [runs.workdir(f) for f in positional[1:]]
  out = runs.folder("plot") / (named["out"] if "out" in named else f"{kind}.png")
  _subprocess(["-m", "mupc_flax.plots", kind, *map(str, folders), f"--out={out}"], str(command))
  assert out.stat().st_size > 0


def run_data(command: Command, runs: Runs) -> None:
  named, _, positional = flags(command)
  dataset = named["dataset"]
  assert positional == ["prepare"] and dataset in OFFLINE_DATASETS, command
  if dataset not in runs.data_dirs:
    return
  manual_dir = (os.environ["MUPC_MNIST_DIR"] if dataset == "mnist" else
                os.environ.get("MUPC_SHAKESPEARE_DIR") or REPO.parent / "shared/data/shakespeare")
  _subprocess(["-m", "mupc_flax.data", "prepare", f"--dataset={dataset}",
               f"--manual_dir={manual_dir}", f"--data_dir={runs.data_dirs[dataset]}"],
              str(command))


def run_sample(command: Command, runs: Runs) -> None:
  """On the run its --workdir stands for, 20 characters (whatever --length says)."""
  named, _, positional = flags(command)
  assert not positional, command
  if "shakespeare" not in runs.data_dirs:
    return
  argv = ["-m", "mupc_flax.sample", f"--workdir={runs.workdir(named['workdir'])}",
          "--length=20"] + [f"--{k}={v}" for k, v in named.items() if k not in ("workdir", "length")]
  printed = _subprocess(argv, str(command)).stdout
  assert printed.startswith(named.get("prompt", "\n")), printed


RUNNERS = {"mupc_flax.main": run_main, "mupc_flax.sweep": run_sweep,
           "mupc_flax.plots": run_plots, "mupc_flax.data": run_data,
           "mupc_flax.sample": run_sample}


def test_every_guide_command_runs_at_smoke_size(tmp_path, mnist_data_dir, request, monkeypatch):
  monkeypatch.chdir(REPO)  # the commands' paths are relative to the project root
  pytest.importorskip("mupc_flax.configuration", reason="the config loader of the new layout "
                      "(mupc_flax.configuration.load) is not in this checkout yet")
  try:  # without the Shakespeare archive its commands are validated only
    data_dirs = {"shakespeare": request.getfixturevalue("shakespeare_data_dir")}
  except pytest.skip.Exception:
    data_dirs = {}
  runs = Runs(tmp_path, {"mnist": mnist_data_dir} | data_dirs)
  order = ["mupc_flax.main", "mupc_flax.data", "mupc_flax.sweep", "mupc_flax.plots",
           "mupc_flax.sample"]
  todo = sorted((c for c in guide_commands() if c.program),
                key=lambda c: order.index(c.program))  # stable: page order within a program
  for command in todo:
    try:
      RUNNERS[command.program](command, runs)
    except Exception as e:
      raise AssertionError(f"{command.page}: {command}\n{type(e).__name__}: {e}") from e
  print(f"{len(todo)} commands: {len(runs.trained)} trainings, {runs.validated} configs "
        "validated only")


def test_the_records_configs_load_and_validate(monkeypatch):
  monkeypatch.chdir(REPO)
  """docs/results.md and docs/benchmarks.md: each mupc_flax.main and sweep
  config they show loads under the current config layout and validates."""
  configuration = pytest.importorskip("mupc_flax.configuration", reason="the config loader of the "
                                      "new layout (mupc_flax.configuration.load) is not in this "
                                      "checkout yet")
  checked = 0
  for command in page_commands([REPO / "docs" / name for name in RECORDS]):
    if command.program not in ("mupc_flax.main", "mupc_flax.sweep") or "$" in str(command):
      continue  # shell variables and loops: not a command to check as written
    named, overrides, _ = flags(command)
    config = configuration.load(named["config"], overrides)
    _validate(config)
    checked += 1
  assert checked >= 5


# --- the API reference -------------------------------------------------------------------

EXPORTERS = ("mupc_flax", "mupc_flax.pc", "mupc_flax.networks", "mupc_flax.data")


def reference_entries() -> list[str]:
  """The objects the API pages document: their ``::: path`` lines."""
  return [m.group(1) for page in sorted((REPO / "docs" / "api").glob("*.md"))
          for m in re.finditer(r"^::: *([\w.]+)", page.read_text(), re.M)]


def resolve(path: str):
  parts = path.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:cut]))
    except ImportError:
      continue
    for name in parts[cut:]:
      obj = getattr(obj, name)
    return obj
  raise ImportError(path)


def attribute_docstring(module_name: str, name: str) -> str:
  """The string literal after ``name = …`` where a module (or the one it imports
  the name from) assigns it: the docstring mkdocstrings shows for a constant."""
  module = importlib.import_module(module_name)
  tree = ast.parse(inspect.getsource(module))
  for node, after in zip(tree.body, tree.body[1:] + [None]):
    if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
      return attribute_docstring(node.module, name)
    targets = (node.targets if isinstance(node, ast.Assign) else
               [node.target] if isinstance(node, ast.AnnAssign) else [])
    if any(isinstance(t, ast.Name) and t.id == name for t in targets):
      if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
        return str(after.value.value)
      return ""
  return ""


def test_the_api_reference_documents_every_exported_name_with_a_docstring():
  documented = {}
  for path in reference_entries():
    try:
      documented[id(resolve(path))] = path
    except (ImportError, AttributeError) as e:
      raise AssertionError(f"docs/api names {path}, which does not exist") from e
  missing, empty = [], []
  for module_name in EXPORTERS:
    module = importlib.import_module(module_name)
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.isclass(obj) or inspect.isfunction(obj):
        doc = inspect.getdoc(obj)
        covered = id(obj) in documented  # under any name that exports it
      else:  # a constant or a type alias: the docstring after its assignment, by name
        doc = attribute_docstring(module_name, name)
        covered = any(path.rsplit(".", 1)[-1] == name and resolve(path) is obj
                      for path in documented.values())
      if not covered:
        missing.append(f"{module_name}.{name}")
      if not (doc or "").strip():
        empty.append(f"{module_name}.{name}")
  assert not missing, f"Exported but not in docs/api/*.md (add a ::: line): {missing}"
  assert not empty, f"Exported with an empty docstring: {empty}"


def test_mkdocs_config_lists_every_page_and_the_docs_extra():
  import tomllib
  nav = re.findall(r":\s*([\w/]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), re.M)
  pages = {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
  assert set(nav) == pages, set(nav) ^ pages
  extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  assert any(r.startswith("mkdocs-material") for r in extras["docs"])
  assert any(r.startswith("mkdocstrings[python]") for r in extras["docs"])
