"""Configs: sections that are the engine's own arguments, the one loader, the renamed fields.

A config (``ml_collections.ConfigDict``) has the sections ``data``, ``model``,
``engine``, ``inference`` and ``train``, and a few top-level fields (seed,
logging, checkpoints). Two sections are not described by hand:
``config.engine`` holds exactly ``pc.Engine``'s fields and
``config.inference`` exactly ``pc.Inference``'s (its ``engine`` aside, which
is ``config.engine``), made by ``section`` from the dataclasses themselves, so
a field added to either is settable from a config with no other edit; the
program builds them with ``build``, which turns the dataclass's own check of
a value into one ``config.<section>.<field>: …`` line.

``load("configs/x.py:arg", ["train.num_steps=2"])`` is the loader of the
program (``--config``), the tests and the docs: the same parser
``ml_collections`` runs for ``--config``, then ``--config.*``-style overrides.
"""

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence

import ml_collections
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

from mupc_flax.errors import FieldError, UserError

# Fields of the config layout before ``config.inference`` existed (config.json
# records of old workdirs, old command lines) and where they are now.
RENAMED = {
    "train.inference_steps": "inference.steps",
    "train.steps_per_layer": "inference.steps_per_layer",
    "train.inference_lr": "inference.lr",
    "train.inference_optimizer": "inference.optimizer",
    "train.inference_momentum": "inference.momentum",
    "train.inference_tolerance": "inference.tolerance",
    "train.inference_method": "inference.method",
    "train.output_precision": "inference.output_precision",
    "train.inference_step_guard": "inference.step_guard",
    "train.schedule": "inference.schedule",
    "train.phases": "inference.phases",
}
# Old values that meant what None means now: inference_steps = 0 was T =
# steps_per_layer × H; schedule = "wavefront" ran the states on the wavefront
# and was ignored by the errors method, which is what None does.
_RENAMED_VALUES = {"train.inference_steps": {0: None}, "train.schedule": {"wavefront": None}}

# The sections a ``name=value`` override may name, in the order a bare name is looked up.
SECTIONS = ("model", "engine", "inference", "train", "data")


def _field_type(hint) -> type:
  """The config type of a dataclass field's annotation: int, float, bool or
  str (a ``Literal`` of strings), the first of a union that is one."""
  if typing.get_origin(hint) is typing.Literal:
    return type(typing.get_args(hint)[0])
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    for arg in typing.get_args(hint):
      if arg is not type(None):
        try:
          return _field_type(arg)
        except TypeError:
          continue
  if hint in (int, float, bool, str):
    return hint
  raise TypeError(f"{hint!r} is not a config type")


def section(spec: type, **values) -> ml_collections.ConfigDict:
  """A config section holding exactly the fields of the dataclass ``spec``,
  at their defaults, then ``values``.

  A field whose default is another dataclass (``Inference.engine``) is a
  section of its own and left out; one whose default is None becomes a
  typed placeholder (``--config.inference.steps=16`` still parses as an int).
  """
  hints = typing.get_type_hints(spec)
  out = ml_collections.ConfigDict()
  for field in dataclasses.fields(spec):
    default = field.default
    if dataclasses.is_dataclass(default) or default is dataclasses.MISSING:
      continue
    out[field.name] = (config_dict.placeholder(_field_type(hints[field.name])) if default is None
                       else default)
  out.update(values)
  return out


def check_section(config_section: ml_collections.ConfigDict, fields: Sequence[str],
                  name: str) -> None:
  """Raises UserError naming the first field of ``config.<name>`` that is not
  one of ``fields``: with its new place where it is a renamed one, else the
  closest field."""
  for key in config_section:
    if key in fields:
      continue
    moved = RENAMED.get(f"{name}.{key}")
    if moved:
      raise UserError(f"config.{name}.{key} is now config.{moved}; rename it in the config "
                      f"(--config.{moved}=…).")
    close = difflib.get_close_matches(key, fields, n=1)
    raise UserError(f"config.{name}.{key} is not a field of config.{name}"
                    + (f"; did you mean {close[0]!r}?" if close else f" (its fields: "
                       f"{', '.join(fields)})."))


def build(spec: type, config_section: ml_collections.ConfigDict, name: str, **others):
  """``spec(**config.<name>, **others)``; the dataclass's ``FieldError`` (or
  ValueError) as one UserError line ``config.<name>.<field>: …``."""
  check_section(config_section, [f.name for f in dataclasses.fields(spec)], name)
  try:
    return spec(**config_section.to_dict(), **others)
  except FieldError as e:
    raise UserError(f"config.{name}.{e.field}: {e}") from None
  except ValueError as e:
    raise UserError(f"config.{name}: {e}") from None


def upgrade_record(flat: Mapping[str, object], sections: Mapping[str, type]) -> dict:
  """A flattened config record ({"train.inference_lr": 0.5, …}) in the current
  layout: an older workdir's names mapped (``RENAMED``), and the fields of
  ``sections`` (name → dataclass, e.g. {"engine": pc.Engine}) that it had no
  field for at their defaults, which is what that run used."""
  if not any(key in RENAMED for key in flat):
    return dict(flat)
  out = {}
  for key, value in flat.items():
    if key in RENAMED:
      value = _RENAMED_VALUES.get(key, {}).get(value, value)
      key = RENAMED[key]
    out[key] = value
  for name, spec in sections.items():
    for key, value in section(spec).items():
      out.setdefault(f"{name}.{key}", value)
  return out


def parse_value(config_section: ml_collections.ConfigDict, field: str, value: str, item: str):
  """``value`` as the type of ``config_section.<field>``; ``none`` where the
  field is None now (a placeholder). ValueError naming ``item`` if it is not one."""
  kind = config_section.get_type(field)
  if value.lower() == "none" and config_section[field] is None:
    return None
  if kind is bool:
    if value.lower() not in ("1", "true", "0", "false"):
      raise ValueError(f"Config argument {item!r}: give true or false.")
    return value.lower() in ("1", "true")
  try:
    return kind(value)
  except ValueError:
    raise ValueError(f"Config argument {item!r}: {value!r} is not a valid {kind.__name__}.") from None


def _owner(config: ml_collections.ConfigDict, name: str, item: str) -> tuple[str, str]:
  """(section, field) that ``name`` ("field" or "section.field") of ``item`` sets."""
  value = item.split("=", 1)[1]
  if "." in name:
    where, field = name.split(".", 1)
    if where in SECTIONS and field in config[where]:
      return where, field
    moved = RENAMED.get(name)
    raise ValueError(f"Config argument {item!r}: " + (
        f"{name} is now {moved}; write {moved}={value}." if moved
        else f"the config has no field {name!r}."))
  owners = [s for s in SECTIONS if name in config[s]]
  if len(owners) == 1:
    return owners[0], name
  moved = RENAMED.get(f"train.{name}")
  if moved:
    raise ValueError(f"Config argument {item!r}: {name} is now config.{moved}; write "
                     f"{moved.split('.')[1]}={value} (or {moved}={value}).")
  if owners:
    raise ValueError(f"Config argument {item!r}: {name!r} is a field of config."
                     f"{' and config.'.join(owners)}; name its section, e.g. {owners[0]}.{item}.")
  raise ValueError(f"Config argument {item!r}: {name!r} is a field of none of config."
                   f"{', config.'.join(SECTIONS)} (config.model holds the {config.model.kind} "
                   "network's fields).")


def override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one ``name=value`` or ``section.name=value`` item; a bare name
  must be a field of exactly one of ``SECTIONS``."""
  where, field = _owner(config, item.split("=", 1)[0], item)
  config[where][field] = parse_value(config[where], field, item.split("=", 1)[1], item)


def make_importable(path: str | os.PathLike) -> None:
  """Lets a config file import its base as ``configs.default``: the folder
  above the file's own goes on the module path, from any directory."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of ``spec`` ("path/to/config.py" or "path:arg") with
  ``overrides`` ("section.field=value", as after ``--config.``) applied.

  The file is run by the parser ``--config`` uses (``get_config(arg)``);
  the result is locked, as for the program: an override of a field the
  config lacks fails.
  """
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    raise UserError(f"There is no config file {os.path.abspath(path)}.")
  make_importable(path)
  config = config_flags.ConfigFileFlagParser(name="config").parse(spec)
  for item in overrides:
    if "=" not in item or "." not in item.split("=", 1)[0]:
      raise ValueError(f"Config override {item!r}: write section.field=value.")
    override(config, item)
  return config
