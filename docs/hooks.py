"""mkdocs hook: the site's home page is README.md, with its links into docs/ made
relative to the site (``docs/training.md`` → ``training.md``). docs/index.md is a
placeholder for it, so that README.md stays the one front page (GitHub's and the site's)."""

import pathlib
import re


def on_page_markdown(markdown, page, config, files):
  if page.file.src_uri != "index.md":
    return markdown
  readme = pathlib.Path(config["config_file_path"]).parent / "README.md"
  return re.sub(r"\]\(docs/", "](", readme.read_text())
