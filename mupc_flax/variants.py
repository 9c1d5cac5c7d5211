"""The config variants: the words after ':' in ``--config=configs/x.py:…``.

The text after ':' is a comma-separated list of variants (``VARIANTS``, and a
config's own recipes) and ``name=value`` overrides, e.g.
``configs/default.py:smoke,bp`` or ``configs/default.py:hidden_layers=32,deep``.
A config file's ``get_config(arg)`` builds its base config and calls
``apply(config, arg, …)``; ``--help`` and the README list ``VARIANTS``.

Each variant is a function of the config and the weight learning rates the
config measured (``Rates``). ``bp``, ``deep`` and ``epc`` train at those; a
config's own recipe (e.g. the transformer's ``adamw``) sets its fields and
returns its η, which then replaces both (``adamw,bp`` is BP under that
recipe).
"""

import difflib
from collections.abc import Callable, Mapping
from typing import NamedTuple

import ml_collections
import optax

from mupc_flax import configuration, optimizers
from mupc_flax.networks import kinds

# The paper's BP learning rate for the MNIST experiments (MUPC.md: 1e-2, 1e-3 for linear nets).
BP_LEARNING_RATE = 1e-2
# The deep-inference recipe, measured in docs/results.md (section 9): heavy-ball
# momentum on the activities with this per-sample step β/B and this many steps
# per hidden layer; BP's weight learning rate (every layer now gets a
# BP-sized gradient, so Adam moves every layer), decayed to 0 by a cosine.
DEEP_MOMENTUM = 0.9
DEEP_STEP_PER_SAMPLE = 0.25
DEEP_STEPS_PER_LAYER = 2
# Error-parameterised PC: steps on the errors and the per-sample step β/B. One
# small step carries BP's gradient to every layer; larger steps or more of
# them move towards PC's equilibrium, further from BP (docs/results.md, section 11).
EPC_STEPS = 1
EPC_STEP_PER_SAMPLE = 0.01
# ePC's hidden gradients are s × BP's (~2e-8 per entry at 512 × 16), as small as
# Adam's default ε = 1e-8, which then damps them; at 1e-12 ePC moves every matrix
# as far as BP and gains 0.15–0.35 points (docs/results.md, section 11.2).
EPC_OPTIMIZER_EPS = 1e-12
# Power iterations of the step guard in the deep variant: β is capped so that the
# inference optimiser stays inside its stability bound (pc.Inference). Not in
# epc: its one small step is far inside the bound (β/B·λ_max ≤ 0.08 measured at
# 128 × 64), and the guard's Hessian–vector products cost 9× its step there.
STEP_GUARD_ITERATIONS = 5
# The smoke variant's run: steps, and the logging, evaluation and checkpoint interval.
SMOKE_STEPS, SMOKE_LOG_EVERY, SMOKE_EVAL_EVERY = 60, 10, 30


class Rates(NamedTuple):
  """The weight learning rates (η) a config measured: BP's, and deep
  inference's and ePC's where it measured one (None: BP's)."""

  bp: float = BP_LEARNING_RATE
  deep: float | None = None


class Variant(NamedTuple):
  """A named change of the config: ``apply(config, rates)`` and a line of help."""

  help: str
  apply: Callable[[ml_collections.ConfigDict, Rates], None]


def _smoke(config, rates):
  config.model.update(kinds.get(config.model.kind).smoke)
  config.train.num_steps = SMOKE_STEPS
  # A recipe's warm-up (e.g. 100 steps) would outlast the run.
  config.train.warmup_steps = min(config.train.warmup_steps, SMOKE_STEPS // 6)
  config.log_every_steps = SMOKE_LOG_EVERY
  config.eval_every_steps = config.checkpoint_every_steps = SMOKE_EVAL_EVERY


def _sp(config, rates):
  config.model.parameterization = "sp"
  config.train.learning_rate = 1e-2
  config.inference.lr = 1e-2


def _bp(config, rates):
  config.train.algorithm = "bp"
  config.train.learning_rate = rates.bp


def _positions(config) -> int:
  """The output positions of a sample: a text window's ``data.context``, else 1.

  A sample's output energy sums its positions' losses, so the signal that
  reaches an activity grows with them; the variants' per-sample inference
  steps are per position (β = s·B/T), which keeps ePC's step small.
  """
  return config.data.get("context", 1)


def _epc(config, rates):
  config.inference.update(method="errors", steps=EPC_STEPS,
                          lr=EPC_STEP_PER_SAMPLE * config.train.batch_size / _positions(config))
  config.train.update(learning_rate=rates.deep or rates.bp, lr_schedule="cosine")
  optimizer = config.train.optimizer
  if (callable(getattr(optax, optimizer, None))  # optimizer=sgd,epc stays valid
      and optimizers.optimizer_argument(optimizer, "eps") is not None):
    config.train.optimizer_eps = EPC_OPTIMIZER_EPS


def _deep(config, rates):
  config.inference.update(optimizer="momentum", momentum=DEEP_MOMENTUM,
                          steps_per_layer=DEEP_STEPS_PER_LAYER,
                          lr=DEEP_STEP_PER_SAMPLE * config.train.batch_size / _positions(config),
                          step_guard=STEP_GUARD_ITERATIONS)
  config.train.update(learning_rate=rates.deep or rates.bp, lr_schedule="cosine")


VARIANTS: dict[str, Variant] = {
    "smoke": Variant(f"a tiny model for {SMOKE_STEPS} steps (seconds on a CPU)", _smoke),
    "sp": Variant("standard PC (η = β = 1e-2), the paper's Fig. 1 baseline", _sp),
    "bp": Variant("the same network trained by backprop (under μPC: BP with Depth-μP), at the "
                  "config's BP learning rate", _bp),
    "deep": Variant(f"inference that reaches the bottom layers: heavy-ball momentum "
                    f"{DEEP_MOMENTUM}, T = {DEEP_STEPS_PER_LAYER}H, a per-sample step of "
                    f"{DEEP_STEP_PER_SAMPLE} (per position for text) under the step guard, BP's η "
                    "with a cosine decay "
                    "(docs/results.md, section 9)", _deep),
    "epc": Variant(f"error-parameterised PC: inference on the errors, T = {EPC_STEPS} step of "
                   f"{EPC_STEP_PER_SAMPLE} per sample (per position for text), BP's η with a "
                   f"cosine decay, Adam's ε at {EPC_OPTIMIZER_EPS:g} (docs/results.md, section 11)",
                   _epc),
}
OVERRIDE_HELP = ("a field by its name (hidden_layers=32,width=256), or by section where two "
                 "have it (inference.optimizer=momentum)")

# A config's own variant: sets its fields on the config and returns the weight
# learning rate that the bp, deep and epc variants then train at.
Recipe = Callable[[ml_collections.ConfigDict], float]


def help_lines() -> list[str]:
  """One line per variant, ``name: help``, then the override's."""
  return [f"{name}: {variant.help}" for name, variant in VARIANTS.items()] + [
      f"name=value: {OVERRIDE_HELP}"]


def apply(config: ml_collections.ConfigDict, arg: str | None, *,
          rates: Rates | Callable[[ml_collections.ConfigDict], Rates] = Rates(),
          recipes: Mapping[str, Recipe] | None = None) -> ml_collections.ConfigDict:
  """``config`` with the variants and ``name=value`` overrides of ``arg`` applied.

  ``rates``: the config's measured learning rates, or a function of the
  config (after the overrides) that returns them and may set fields that
  depend on others (e.g. β by activation). A config's own ``recipes`` apply
  before the built-in variants, wherever they stand, and their learning rate
  replaces ``rates``. Overrides win over
  variants wherever they stand, and variants see them (``batch_size=128,deep``
  sets β for a batch of 128); ``kind=…`` comes first, since it resets
  ``config.model`` to that kind's fields.
  """
  recipes = recipes or {}
  items = [item for item in (arg or "").split(",") if item]
  overrides = sorted((item for item in items if "=" in item),
                     key=lambda item: not item.startswith("kind="))
  for item in overrides:
    _override(config, item)
  if callable(rates):
    rates = rates(config)
  for item in items:
    if item in recipes:
      learning_rate = recipes[item](config)
      rates = Rates(learning_rate, learning_rate)
  for item in items:
    if "=" in item or item in recipes:
      continue
    if item not in VARIANTS:
      names = (*VARIANTS, *recipes)
      close = difflib.get_close_matches(item, names, n=1)
      raise ValueError(f"Unknown config variant {item!r}"
                       + (f"; did you mean {close[0]!r}?" if close else ".")
                       + f" Use {', '.join(names)} or name=value.")
    VARIANTS[item].apply(config, rates)
  for item in overrides:
    _override(config, item)
  return config


def _override(config: ml_collections.ConfigDict, item: str) -> None:
  name, value = item.split("=", 1)
  if name == "kind":  # another network: its own fields, at their defaults
    if config.model.kind != value:
      config.model = kinds.model_config(value)
    return
  configuration.override(config, item)
