"""Failures the user can fix, and the check of a directory before work starts.

Every error the library raises on bad input or a broken environment is a
``UserError``: its message is one sentence that says what is wrong and what
to do. The command-line programs print it as one line, without a traceback.
"""

import os
import pathlib
import tempfile


class UserError(Exception):
  """A failure the user can fix; the message says what is wrong and what to do."""


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
  """Raises UserError unless ``path`` is a directory this process can write
  in, or can be created as one. Creates nothing.

  Args:
    path: the directory.
    what: how the message names it, e.g. "The workdir" or "The data directory".
  """
  path = pathlib.Path(path).absolute()
  existing = next(p for p in (path, *path.parents) if p.exists())
  if not existing.is_dir():
    where = "is a file" if existing == path else f"is inside {existing}, which is a file"
    raise UserError(f"{what} {path} {where}, not a directory; choose another path.")
  try:
    # Tried, not asked (os.access): root, read-only mounts and ACLs all answer truthfully.
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise UserError(f"{what} {path} cannot be written ({existing}: {e.strerror}); choose a "
                    "directory you can write to.") from None
