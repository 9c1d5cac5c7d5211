"""The edge of the command-line programs: flags in, paths resolved, failures out as one line.

Each program's ``__main__`` calls ``cli.run(main)`` instead of ``app.run``.
Whatever fails, from parsing the flags and loading the config file to the
last checkpoint, the program exits non-zero with one line on stderr,
``error: <what is wrong and what to do>``, and no traceback; ``--traceback``
prints it too. A program that has joined a multi-process run calls
``exit_at_once_on_failure``: its failures then end the process right after
that line (``exit_now``), as a watchdog thread's do. Paths from the user go
through ``resolve_path`` once, here, so the library sees absolute paths
whatever the current directory.
"""

import logging as py_logging
import os
import pathlib
import re
import sys
import threading
import traceback
from typing import Callable

from absl import app, flags, logging

from mupc_flax import configuration
from mupc_flax.errors import UserError

_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an error, also print the Python traceback.")

# One error line per process: whichever thread reports first (exit_now) ends the process.
_ENDING = threading.Lock()
_exit_at_once = False

# Libraries whose INFO lines would drown the program's own; their warnings stay.
# asyncio reports Orbax's failed background writes again at exit.
_LIBRARIES = ("orbax", "grain", "tensorflow_datasets", "array_record", "asyncio")


def resolve_path(path: str | os.PathLike, name: str) -> pathlib.Path:
  """``path`` with ``~`` expanded, made absolute against the current directory.

  Args:
    path: what the user gave.
    name: how the error names it, e.g. "--workdir".
  """
  if not str(path).strip():
    raise UserError(f"{name} is empty; give a directory, e.g. {name}=runs/mnist.")
  return pathlib.Path(os.path.abspath(os.path.expanduser(path)))


def resolve_data_paths(config) -> None:
  """Makes ``config.data.data_dir`` and ``manual_dir``, where given, absolute."""
  for field, name in (("data_dir", "--config.data.data_dir"), ("manual_dir", "--config.data.manual_dir")):
    if config.data[field]:
      config.data[field] = str(resolve_path(config.data[field], name))


def run(main: Callable[[list[str]], None]) -> None:
  """``absl.app.run(main)``, with every failure reported as one ``error:`` line."""
  app.run(lambda argv: _report_failures(main, argv), flags_parser=_parse_flags)


# Lines every run would start with that say nothing about it: (file, message start).
_NOISE = (
    ("/jax/_src/xla_bridge.py", "Unable to initialize backend"),  # e.g. 'tpu': no libtpu.so
    ("/tensorflow_datasets/", "OpenCV is not installed"),  # PIL decodes the images instead
)


def _quiet_libraries(record: py_logging.LogRecord) -> bool:
  """Console filter: library INFO lines go; library warnings stay, without
  tracebacks; library errors go, since every one that matters reaches the
  program as an exception and is reported in its one line. Lines of
  ``_NOISE`` go too; ``--traceback`` keeps everything."""
  if _TRACEBACK.value:
    return True
  if any(path in record.pathname and str(record.msg).startswith(start) for path, start in _NOISE):
    return False
  if not any(f"/{name}/" in record.pathname for name in _LIBRARIES):
    return True
  record.exc_info, record.exc_text = None, None
  return record.levelno == py_logging.WARNING


def exit_at_once_on_failure() -> None:
  """From now on a failure ends the process right after its error line,
  without exit handlers. In a multi-process run, JAX's exit handler waits at
  a barrier for every process, which a failed or lost process never reaches."""
  global _exit_at_once
  _exit_at_once = True


def exit_now(message: str, code: int = 1) -> None:
  """Prints ``error: message`` and ends the process at once, from any thread.
  A second caller (another thread failing at the same time) never returns."""
  _ENDING.acquire()
  sys.stderr.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(code)


def _fail(message: str, show_traceback: bool, code: int = 1):
  if show_traceback and sys.exc_info()[0] is not None:  # a refusal before any exception has none
    traceback.print_exc()
  if _exit_at_once:
    exit_now(message, code)
  sys.stderr.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _background_failure(exc_type, exc, tb, thread=None) -> None:
  """For exceptions that library callbacks and threads print on their own
  (e.g. Tensorstore writes still failing after a failed save was reported):
  a debug line, or the traceback under --traceback."""
  if _TRACEBACK.value:
    traceback.print_exception(exc_type, exc, tb)
  else:
    logging.debug("In the background%s: %s: %s", f" ({thread.name})" if thread else "",
                  exc_type.__name__, exc)


def _report_failures(main, argv):
  logging.get_absl_handler().addFilter(_quiet_libraries)
  sys.excepthook = _background_failure  # the main thread's own failures are caught below
  threading.excepthook = lambda args: _background_failure(args.exc_type, args.exc_value,
                                                          args.exc_traceback, args.thread)
  sys.unraisablehook = lambda args: _background_failure(args.exc_type, args.exc_value,
                                                        args.exc_traceback)
  try:
    return main(argv)
  except KeyboardInterrupt:
    _fail("interrupted, without saving. Rerun the same command to continue (a training run "
          "resumes from its newest complete checkpoint).", _TRACEBACK.value, code=130)
  except (UserError, app.UsageError) as e:
    _fail(str(e), _TRACEBACK.value)
  except Exception as e:  # Not foreseen: still one line, with the way to see more.
    _fail(_describe(e) + " (--traceback shows where)", _TRACEBACK.value)


def _describe(e: BaseException) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  if "RESOURCE_EXHAUSTED" in text:
    return (f"out of device memory ({text[:200]}); use a smaller train.batch_size, model.width or "
            "model.hidden_layers, or more devices")
  if isinstance(e, OSError) and e.strerror:
    return f"{e.filename or 'a file'}: {e.strerror}"
  return f"{type(e).__name__}: {text}"


def _config_argument(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags and loads the config file; any failure is one line."""
  show_traceback = "--traceback" in argv
  config = _config_argument(argv)
  if config is not None:
    path = config.split(":", 1)[0]
    if not os.path.isfile(path):
      _fail(f"--config: there is no config file {os.path.abspath(path)}; give its path, e.g. "
            "--config=configs/default.py (relative to the current directory).", show_traceback)
    configuration.make_importable(path)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # The config file runs inside flag parsing: anything can come out.
    _fail(_describe_flag_error(e, argv, config), show_traceback)


def _describe_flag_error(e: Exception, argv: list[str], config: str | None) -> str:
  """One line for a failure while parsing flags (which includes running the config file)."""
  cause = e
  while isinstance(cause, (KeyError, AttributeError)) and cause.args and isinstance(cause.args[0], Exception):
    cause = cause.args[0]
  text = str(cause.args[0]) if isinstance(cause, KeyError) and cause.args else str(cause)
  if isinstance(cause, (KeyError, AttributeError)):  # a --config.a.b override names no field
    field = re.match(r"'?([\w-]+)", text)
    field = field.group(1) if field else text
    override = next((a.split("=", 1)[0] for a in argv
                     if a.startswith("--config.") and f".{field}" in a.split("=", 1)[0]), "--config.*")
    moved = configuration.RENAMED.get(override.removeprefix("--config."))
    if moved:
      return f"{override} is now --config.{moved}; use that name."
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return (f"{override}: the config has no field {field!r}"
            + (f"; did you mean {hint.group(1)!r}?" if hint else "; see the config file for its fields."))
  if "Error whilst parsing config file" in text:  # get_config raised: its last line is the reason
    reason = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return f"the config {config.split(':', 1)[0]}: {reason}"
  if isinstance(e, flags.Error):
    return f"{text.splitlines()[0]} (--helpshort lists the flags)"
  where = f"the config file {config.split(':', 1)[0]}" if config else "parsing the flags"
  return f"{where} failed: {_describe(e)}"
