"""The package's shape: no import circle, and no file too long to read.

The import graph is read from the source (``ast``), every ``import`` and
``from … import`` at any depth (a lazy import inside a function closes a
circle as surely as one at the top). Importing ``a.b.c`` runs ``a`` and
``a.b`` first, so an edge to a module is also an edge to the packages above
it, except those above the importer itself (a module's own packages are
running already).
"""

import ast
import os
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mupc_flax"
MOST_LINES = 350


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def ancestors(name: str):
  while name:
    yield name
    name = name.rpartition(".")[0]


def imported(name: str, path: pathlib.Path) -> set[str]:
  """The package's modules that importing ``name`` runs, directly."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  targets = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
      targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
  edges = set()
  for target in targets:
    known = next((m for m in ancestors(target) if m in MODULES), None)
    for module in ancestors(known or ""):
      if module != name and module not in set(ancestors(name)):
        edges.add(module)
  return edges


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every circle a depth-first search meets, as [a, b, …, a]."""
  state, cycles = {}, []

  def visit(module, path):
    state[module] = "open"
    path.append(module)
    for other in sorted(graph[module]):
      if state.get(other) == "open":
        cycles.append(path[path.index(other):] + [other])
      elif other not in state:
        visit(other, path)
    path.pop()
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [])
  return cycles


def test_the_cycle_finder_finds_a_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert import_cycles(graph) == [["a", "b", "c", "a"]]
  assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_edges_include_the_packages_above_the_target():
  # mupc_flax.pc.energy imports mupc_flax.networks.protocol: that runs mupc_flax.networks too.
  edges = imported("mupc_flax.pc.energy", MODULES["mupc_flax.pc.energy"])
  assert {"mupc_flax.networks.protocol", "mupc_flax.networks", "mupc_flax.pc.forward"} <= edges
  assert "mupc_flax.pc" not in edges and "mupc_flax" not in edges


def test_no_import_circle():
  graph = {name: imported(name, path) for name, path in MODULES.items()}
  assert sum(map(len, graph.values())) > 100  # the graph is read, not empty
  assert import_cycles(graph) == []


def test_no_file_over_the_limit():
  lines = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
  assert len(lines) > 40 and max(lines.values()) > 100
  assert {name: n for name, n in lines.items() if n > MOST_LINES} == {}, "split these by concern"


def test_the_engine_and_the_gpu_suite_need_no_program_packages():
  """``import mupc_flax`` and the GPU suite's plan run with ml_collections,
  grain and tfds absent (the GPU image has none of them)."""
  blocked = ("ml_collections", "grain", "tensorflow_datasets")
  script = f"""
import sys
class Absent:
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in {blocked!r}:
      raise ImportError("absent: " + name)
sys.meta_path.insert(0, Absent())
import mupc_flax
sys.path.insert(0, "benchmarks")
import gpu_suite
sys.exit(gpu_suite.main(["--plan_only"]))
"""
  run = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(PACKAGE.parent)))
  assert run.returncode == 0, run.stderr[-2000:]
  assert "case" in run.stdout.lower()
