"""A workdir's own records: the lock that keeps one run in it, and the config
each stretch of its checkpoints was trained with.

A workdir holds ``config.json`` (the first run's config), a
``config.<step>.json`` for each resume that changed the config, from that
step on, ``metrics.jsonl``, TensorBoard event files and the checkpoints.
Records written under the older config layout (``train.inference_lr``, …)
are read in the current one (``configuration.upgrade_record``).
"""

import contextlib
import fcntl
import json
import pathlib

from absl import logging

from mupc_flax import checkpointing, configuration, pc
from mupc_flax.errors import UserError

# The config sections that are the engine's dataclasses.
SECTIONS = {"engine": pc.Engine, "inference": pc.Inference}

@contextlib.contextmanager
def exclusive(workdir: pathlib.Path):
  """Holds a lock on ``workdir`` for the run (process 0 takes it for all), so
  that a second run started on the same workdir stops at once instead of
  interleaving its checkpoints and metrics with this one's."""
  with open(workdir / ".lock", "w") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise UserError(f"Another run is using the workdir {workdir}; wait for it to end, or "
                          "use another --workdir.") from None
    except OSError as e:  # some network filesystems have no locks
      logging.warning("Cannot lock the workdir %s (%s); make sure no other run uses it.",
                      workdir, e.strerror)
    yield


def _flatten(tree: dict, prefix: str = "") -> dict:
  """A nested dict as {"a.b": leaf}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out |= _flatten(value, f"{prefix}{key}.")
    else:
      out[prefix + key] = value
  return out


def _config_records(workdir: pathlib.Path) -> dict[int, pathlib.Path]:
  """The config records of a workdir by the step they start at: config.json
  (step 0) and the config.<step>.json of resumes that changed the config."""
  records = {0: workdir / "config.json"} if (workdir / "config.json").exists() else {}
  for path in workdir.glob("config.*.json"):
    if path.name.split(".")[1].isdigit():
      records[int(path.name.split(".")[1])] = path
  return records


def newest_config(workdir: pathlib.Path):
  """The config of the newest stretch of ``workdir``'s run (an
  ``ml_collections.ConfigDict``); UserError if it holds no run."""
  import ml_collections  # imported where a config is read: the engine runs without it

  records = _config_records(workdir)
  if not records:
    raise UserError(f"{workdir} holds no training run (no config.json); give the --workdir of "
                    "one.")
  path = records[max(records)]
  try:
    flat = configuration.upgrade_record(_flatten(json.loads(path.read_text())), SECTIONS)
  except (OSError, ValueError) as e:
    raise UserError(f"Cannot read {path} ({e}); the workdir's config record is damaged.") from None
  config = ml_collections.ConfigDict()
  for key, value in flat.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    node[name] = value
  return config


def record_config(config, workdir: pathlib.Path, start_step: int) -> None:
  """Writes this run's config, keeping the record of how each checkpoint was trained.

  A fresh run writes ``config.json``. A resumed run compares its config with
  the newest record up to ``start_step``; if they differ, it logs each changed
  field and writes its own as ``config.<start_step>.json`` beside the records
  it keeps (``config.json`` stays the first run's).
  """
  text = config.to_json_best_effort(indent=2)
  records = {step: path for step, path in _config_records(workdir).items() if step <= start_step}
  if start_step == 0 or not records:
    (workdir / "config.json").write_text(text)
    return
  previous_path = records[max(records)]
  try:
    previous = configuration.upgrade_record(
        _flatten(json.loads(previous_path.read_text())), SECTIONS)
  except (OSError, ValueError) as e:
    previous = {}
    logging.warning("Cannot read %s (%s); not comparing the config with it.", previous_path, e)
  current = _flatten(json.loads(text))
  changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
  if not changed:
    return
  target = workdir / f"config.{start_step}.json"
  target.write_text(text)
  logging.warning(
      "The config differs from %s, which trained the checkpoints up to step %d: %s. %s is kept; "
      "this run's config, from step %d on, is in %s.", previous_path.name, start_step,
      "; ".join(f"{k}: {previous.get(k, '(none)')!r} → {current.get(k, '(none)')!r}" for k in changed),
      previous_path.name, start_step, target.name)


def is_empty_run(workdir: pathlib.Path) -> bool:
  """Whether a workdir holds neither a checkpoint nor a logged metric."""
  log = workdir / "metrics.jsonl"
  return (checkpointing.newest_complete_step(checkpointing.directory(workdir)) is None
          and not (log.exists() and log.stat().st_size))
