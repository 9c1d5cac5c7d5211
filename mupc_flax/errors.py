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
    kernel = _kernel_file_system(existing)
    reason = (f"{existing} is in the kernel's {kernel} file system, which holds no files of yours"
              if kernel else f"{existing}: {e.strerror}")
    raise UserError(f"{what} {path} cannot be written ({reason}); choose a directory you can "
                    "write to.") from None


# File systems the kernel makes up (processes, devices, settings), never storage.
_KERNEL_FILE_SYSTEMS = ("proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs",
                        "tracefs", "securityfs", "configfs", "bpf", "pstore", "fusectl", "mqueue")


def _kernel_file_system(path: pathlib.Path) -> str | None:
  """The type of the kernel file system ``path`` is on (e.g. "proc"), from
  /proc/mounts; None for storage, or where that cannot be read."""
  try:
    mounts = [line.split()[1:3] for line in open("/proc/mounts")]
  except OSError:
    return None
  path = os.path.realpath(path)
  # The longest mount point that contains the path is the one it is on.
  on = [(len(point), kind) for point, kind in mounts
        if path == point or path.startswith(point.rstrip("/") + "/")]
  kind = max(on)[1] if on else None
  return kind if kind in _KERNEL_FILE_SYSTEMS else None


class FieldError(ValueError):
  """A value a dataclass of the engine (``pc.Inference``, ``pc.Engine``) cannot
  take; ``field`` names the field, so that a config can say where it was set."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field
