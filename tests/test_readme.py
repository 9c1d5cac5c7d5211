"""The README's notebook example runs as written."""

import importlib.metadata
import pathlib
import re
import tomllib

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_example_trains():
  text = README.read_text()
  section = text[text.index("## Quick start"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert len(code.strip().splitlines()) <= 20
  namespace = {}
  exec(compile(code, str(README), "exec"), namespace)
  # Run again, as a notebook cell is: the loop keeps training the same modules.
  loop = re.search(r"^for step in .*\n(?:  .*\n)+", code, re.M).group(0)
  exec(compile(loop, str(README), "exec"), namespace)
  assert int(namespace["optimizer"].step[...]) == 40
  metrics, model, x, y, mf = (namespace[k] for k in ("metrics", "model", "x", "y", "mf"))
  assert float(metrics["loss"]) < 0.2  # 20 steps on one batch: the loss fell from ≈0.5
  assert model(x).shape == (64, 10)
  # nnx.update wrote the trained weights back: the model predicts its batch well.
  accuracy = np.mean(np.argmax(model(x), 1) == np.argmax(y, 1))
  assert accuracy > 0.9


def test_the_tensorboard_extra_installs_tensorboard():
  """``pip install -e '.[tensorboard]'``, as the README says, brings the viewer."""
  project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
  assert any(re.match(r"tensorboard\b", r) for r in project["optional-dependencies"]["tensorboard"])
  assert "pip install -e '.[tensorboard]'" in README.read_text()


def test_the_main_command_says_where_the_dataset_goes_and_the_version_is_known():
  text = README.read_text()
  first = text[text.index("## Two commands"):text.index("Run the tests")]
  assert "~/tensorflow_datasets" in first and "$TFDS_DATA_DIR" in first
  assert "--config.data.data_dir" in first
  import mupc_flax
  assert mupc_flax.__version__ == importlib.metadata.version("mupc_flax") != "0+unknown"


def test_the_readme_links_into_the_docs_resolve_and_it_stays_short():
  """README.md is the front page (GitHub's, and the site's through docs/hooks.py):
  its relative links name existing files, anchors included, and every guide page."""
  text = README.read_text()
  assert len(text.splitlines()) <= 200
  links = re.findall(r"\]\(([^)\s]+)\)", text)
  relative = [link for link in links if not re.match(r"[a-z]+://", link)]
  assert relative and all(link.startswith("docs/") for link in relative), relative
  for link in relative:
    path, _, anchor = link.partition("#")
    target = README.parent / path
    assert target.is_file(), link
    if anchor:  # the slug GitHub and mkdocs' toc both give a heading
      slugs = {re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", h.strip().lower()))
               for h in re.findall(r"^#+ (.*)$", target.read_text(), re.M)}
      assert anchor in slugs, link
  guides = {p.name for p in (README.parent / "docs").glob("*.md")} - {"index.md"}
  assert guides <= {pathlib.Path(link.partition("#")[0]).name for link in relative}, guides
  assert "pip install -e '.[docs]' && mkdocs serve" in text
  block = text[text.index("<!-- variants -->"):text.index("<!-- /variants -->")]
  names = re.findall(r"^- `([^`]+)`: ", block, re.M)
  assert names[:5] == ["smoke", "sp", "bp", "deep", "epc"] and names[-1] == "name=value"
