"""Network kinds: what a config's ``model.kind`` names, and how it is built.

A kind is a factory ``make(spec, *, rngs, **fields) -> PCNetwork`` (``spec``:
the dataset's ``DatasetSpec``, with ``input_size``, ``image_shape`` and
``num_classes``), whose keyword arguments with defaults are the kind's config
fields, plus the kind's ``smoke`` shape (the ``:smoke`` variant) and
``depth_field`` (what a depth sweep sets). ``config.model`` holds ``kind``
and exactly those fields; the factory validates their values.

``model.kind`` is a built-in name (``BUILT_IN``) or ``"module:attribute"``
for any importable module: a ``NetworkKind``, or a plain factory function.
"""

import dataclasses
import importlib
import inspect
from typing import TYPE_CHECKING, Any, Callable

from flax import nnx

if TYPE_CHECKING:  # imported where a config is made: the engine runs without ml_collections
  import ml_collections

# The built-in kinds, each the ``KIND`` of its module.
BUILT_IN = {"dense": "mupc_flax.networks.dense", "conv": "mupc_flax.networks.conv",
            "transformer": "mupc_flax.networks.transformer",
            "causal_transformer": "mupc_flax.networks.causal_transformer"}


@dataclasses.dataclass(frozen=True)
class NetworkKind:
  """A network factory with its config fields' smoke shape and depth field."""

  make: Callable[..., Any]
  smoke: dict = dataclasses.field(default_factory=dict)
  depth_field: str | None = None

  @property
  def fields(self) -> dict:
    """The config fields and their defaults: ``make``'s keyword arguments
    with defaults (``rngs`` aside)."""
    return {name: p.default for name, p in inspect.signature(self.make).parameters.items()
            if p.default is not inspect.Parameter.empty and name != "rngs"}

  @property
  def required(self) -> tuple[str, ...]:
    """Keyword arguments of ``make`` without a default (``rngs`` aside)."""
    return tuple(name for name, p in inspect.signature(self.make).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "rngs"
                 and p.default is inspect.Parameter.empty)


def get(kind: str) -> NetworkKind:
  """The ``NetworkKind`` that ``kind`` names; ValueError with what to do."""
  if not isinstance(kind, str):
    raise ValueError(f"model.kind must be a string, got {kind!r}.")
  if kind in BUILT_IN:
    module_name, attribute = BUILT_IN[kind], "KIND"
  elif ":" in kind:
    module_name, attribute = kind.split(":", 1)
  else:
    raise ValueError(f"Unknown network kind {kind!r}; choose one of {list(BUILT_IN)} or name a "
                     "factory of your own as 'module:function' (e.g. "
                     "'my_networks.mixer:make_network').")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"Cannot import {module_name!r} for model.kind {kind!r} ({e}); run from the "
                     "folder that holds it or add that folder to PYTHONPATH.") from None
  found = getattr(module, attribute, None)
  if isinstance(found, NetworkKind):
    return found
  if callable(found):
    return NetworkKind(make=found)
  raise ValueError(f"{module_name!r} has no network factory {attribute!r} (model.kind {kind!r}).")


def model_config(kind: str, **fields) -> "ml_collections.ConfigDict":
  """``config.model`` for ``kind``: its fields at their defaults, then ``fields``."""
  network = get(kind)
  defaults = network.fields
  unknown = sorted(set(fields) - set(defaults) - set(network.required))
  if unknown:
    raise ValueError(f"The {kind} network takes no field {unknown[0]!r}; its fields are "
                     f"{sorted(defaults)}.")
  import ml_collections

  return ml_collections.ConfigDict(dict(kind=kind, **defaults) | fields)


def check_fields(model: "ml_collections.ConfigDict") -> NetworkKind:
  """The kind of ``config.model``; ValueError naming a field it does not
  take, or one it needs that is missing."""
  network = get(model.kind)
  takes = set(network.fields) | set(network.required)
  for name in model:
    if name != "kind" and name not in takes:
      raise ValueError(f"config.model.{name} is not a field of the {model.kind} network (its "
                       f"fields: {', '.join(sorted(takes))}); remove it or choose another kind.")
  missing = [name for name in network.required if name not in model]
  if missing:
    raise ValueError(f"config.model needs {missing[0]!r} for the {model.kind} network.")
  return network


def build(model: "ml_collections.ConfigDict", spec, seed: int):
  """The network ``config.model`` describes, for a dataset of ``spec``;
  the factory's ValueError for a value or shape it cannot take."""
  network = check_fields(model)
  fields = {name: value for name, value in model.items() if name != "kind"}
  fields = {name: tuple(v) if isinstance(v, list) else v for name, v in fields.items()}
  return network.make(spec, rngs=nnx.Rngs(seed), **fields)


def hidden_layers(model: "ml_collections.ConfigDict", spec) -> int:
  """H of the network ``config.model`` describes, from its shapes alone (no weights drawn)."""
  network = nnx.eval_shape(lambda: build(model, spec, 0))
  return sum(network.stage_layers)
