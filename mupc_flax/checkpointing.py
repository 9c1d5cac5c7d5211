"""A small wrapper around ``orbax.checkpoint.CheckpointManager``.

A checkpoint holds four items: ``model`` (weights and premultipliers),
``optimizer`` (its state and step count), ``data`` (the grain iterator state of
this process), and ``meta`` (JSON: the step, the data seed and the examples
seen; all randomness of training is the data order and augmentation, a pure
function of the seed and the position the iterator state records).
Saving is asynchronous. A save that fails in the background is reported by
the next ``check_saved`` (cheap: call it every step), by the next ``save``,
or by ``wait``, as a ``SaveError``; the checkpoints before it stay, and the
newest of them is what a rerun resumes from. Use the checkpointer as a
context manager: leaving it waits for the last save, and raises if it failed.
"""

import errno
import os
import pathlib
import time
from typing import Any

import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from absl import logging

from mupc_flax.errors import UserError


class WorkdirError(UserError):
  """The workdir holds checkpoints this run cannot continue."""


class SaveError(UserError):
  """A checkpoint could not be written."""


def directory(workdir: str | os.PathLike) -> pathlib.Path:
  """Where a run keeps its checkpoints: ``<workdir>/checkpoints``."""
  return pathlib.Path(workdir) / "checkpoints"


def newest_complete_step(folder: str | os.PathLike) -> int | None:
  """The newest step in ``folder`` whose save finished, read from disk; None
  if there is none. Orbax finalises a step by renaming its temporary folder
  (or, on object stores, by a commit file), so a save cut short is not counted."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return None
  steps = [int(p.name) for p in folder.iterdir()
           if p.name.isdigit() and ocp.step.is_checkpoint_finalized(p)]
  return max(steps, default=None)


def restore_model(folder: str | os.PathLike, model_state) -> tuple[Any, int] | None:
  """The model alone from the newest finished checkpoint in ``folder``, into
  the structure of ``model_state``: (model_state, its step), or None if
  there is none. It only reads (no checkpoint manager, which would clean up
  a save in progress): a run may go on training meanwhile. A checkpoint of
  another model, or one that cannot be read, is a WorkdirError."""
  step = newest_complete_step(folder)
  if step is None:
    return None
  path = pathlib.Path(folder).absolute() / str(step) / "model"
  checkpointer = ocp.StandardCheckpointer()
  try:
    saved = checkpointer.metadata(path).item_metadata
    saved, wanted = _shapes(getattr(saved, "tree", saved)), _shapes(model_state)
    if saved == wanted:
      restored = checkpointer.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                         model_state))
  except Exception as e:
    raise WorkdirError(f"Checkpoint {step} in {folder} is unreadable ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}).") from None
  if saved != wanted:
    raise WorkdirError(f"Checkpoint {step} in {folder} holds another model than its workdir's "
                       "config describes; was the config record edited?")
  return restored, step


def _name(key) -> str:
  """A path entry as plain text: list indices saved as '0' and live as 0 agree."""
  for field in ("key", "idx", "name"):
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def _shapes(tree) -> dict[str, tuple]:
  """Array path -> shape, for live NNX states and for Orbax metadata trees alike."""
  shapes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    names = [_name(k) for k in path]
    shapes["/".join(names[:-1] if names[-1] == "value" else names)] = tuple(getattr(leaf, "shape", ()))
  return shapes


# The operating system's reasons a save fails for, as its messages word them.
_SAVE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO)


def _os_reason(cause: BaseException) -> str | None:
  """The operating system's reason for ``cause`` (an OSError's, or one that
  Tensorstore's long messages quote anywhere in the exception chain)."""
  chain = []
  while cause is not None and cause not in chain:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  for e in chain:
    if isinstance(e, OSError) and e.strerror:
      return e.strerror
  text = " ".join(str(e) for e in chain)
  return next((os.strerror(code) for code in _SAVE_ERRNOS if os.strerror(code) in text), None)


class Checkpointer:
  """Saves and restores training state in ``directory``, keeping the newest ``keep``."""

  def __init__(self, directory: str | os.PathLike, keep: int):
    self.directory = os.path.abspath(directory)  # Orbax writes only to absolute paths
    self._pending: int | None = None  # the step whose save may still fail
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True,
            cleanup_tmp_directories=True),  # what a failed or killed save left behind
        item_handlers={"model": ocp.StandardCheckpointHandler(),
                       "optimizer": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, model_state, opt_state, data_iterator, meta: dict) -> None:
    """Starts saving ``step`` in the background, once the previous save is
    known to have succeeded (SaveError if it did not)."""
    self.wait()
    self._pending = step
    try:
      self._manager.save(step, args=ocp.args.Composite(
          model=ocp.args.StandardSave(model_state),
          optimizer=ocp.args.StandardSave(opt_state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:
      raise self._save_error(e) from e

  def check_saved(self) -> None:
    """Without blocking: raises SaveError if the last save has finished and failed."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()  # finished, so this returns at once

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises SaveError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(e) from e
    self._pending = None

  def _save_error(self, cause: Exception) -> SaveError:
    step, self._pending = self._pending, None
    # From disk: Orbax's own list already lacks the steps this save was to replace.
    kept = [s for s in self._manager.all_steps(read=True) if s != step]
    reason = _os_reason(cause)
    if reason is None:
      reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
      reason = reason if len(reason) <= 160 else "…" + reason.rsplit(": ", 1)[-1][-160:]
    return SaveError(
        f"Saving the checkpoint of step {step} in {self.directory} failed ({reason}). "
        "The newest complete checkpoint is "
        f"{f'step {max(kept)}' if kept else 'none'}: fix the cause (e.g. free disk space) and "
        "rerun the same command to resume from it.")

  def check_compatible(self, step: int, model_state) -> None:
    """Refuses a workdir whose checkpoints hold a model of another shape."""
    saved = self._manager.item_metadata(step)["model"]
    saved, wanted = _shapes(getattr(saved, "tree", saved)), _shapes(model_state)
    if saved != wanted:
      diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
      details = ", ".join(f"{k}: saved {saved.get(k)} vs now {wanted.get(k)}" for k in diff[:4])
      raise WorkdirError(
          f"The workdir {os.path.dirname(self.directory)} holds checkpoints of a different model "
          f"({details}). Use another --workdir, or delete this one to start over.")

  def restore_latest(self, model_state, opt_state, data_iterator) -> tuple[Any, Any, dict] | None:
    """Restores the newest readable checkpoint into the given structures.

    ``model_state`` and ``opt_state`` give shapes, dtypes and shardings (their
    values are not used); ``data_iterator`` is restored in place. An unreadable
    checkpoint is skipped with a warning in favour of the one before it.
    Returns (model_state, opt_state, meta), or None if there is none.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    unreadable = []
    for step in steps:
      try:
        self.check_compatible(step, model_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(abstract(model_state)),
            optimizer=ocp.args.StandardRestore(abstract(opt_state)),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore()))
      except WorkdirError:
        raise
      except Exception as e:  # Any failure to read means: try the previous one.
        logging.warning("Checkpoint %d in %s is unreadable (%s: %s); falling back to an older one.",
                        step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
        unreadable.append(step)
        continue
      self._set_aside(unreadable)
      return restored["model"], restored["optimizer"], restored["meta"]
    raise WorkdirError(f"No checkpoint in {self.directory} is readable ({steps}); delete the "
                       "directory to start over.")

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable checkpoints to ``<directory>.unreadable/`` (kept for
    inspection), so the resumed run can save those steps again."""
    if not steps:
      return
    quarantine = self.directory + ".unreadable"
    if jax.process_index() == 0:
      os.makedirs(quarantine, exist_ok=True)
      for step in steps:
        target = os.path.join(quarantine, f"{step}-{int(time.time())}")
        os.rename(os.path.join(self.directory, str(step)), target)
        logging.warning("Moved unreadable checkpoint %d to %s.", step, target)
    multihost_utils.sync_global_devices("mupc_flax: unreadable checkpoints set aside")
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """Whether the run must save and stop after ``step`` (call it after every step).

    JAX's preemption service (multi-process runs) turns a SIGTERM to any
    process into one step that every process agrees on: the one after the
    furthest step any process had reported (``cluster.join`` reports the
    step a run resumes from, so that a notice before the first step counts).
    """
    return self._manager.reached_preemption(step)

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is None:
      self.wait()
      self._manager.close()
      return
    try:  # Already failing: finish the save in flight, but report the first error.
      self._manager.close()
    except Exception as e:
      logging.warning("The checkpoint save in flight failed too (%s: %s).", type(e).__name__, e)
