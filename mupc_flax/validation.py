"""Validation and setup: a config checked, then the objects a run builds from it.

``validate_config`` refuses a bad config with one clear message before
anything is created: the ``engine`` and ``inference`` sections are checked by
``pc.Engine`` and ``pc.Inference`` themselves (``configuration.build``), the
network by its own factory (from shapes alone), and the rest of the run's
fields here.
"""

import math
from typing import get_args

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mupc_flax import configuration, data, pc, steps
from mupc_flax.errors import UserError
from mupc_flax.networks import kinds
from mupc_flax.optimizers import optimizer_argument


class TrainingError(UserError):
  """The run cannot start or go on; the message says why and what to do."""


# config.train's fields: how the weights learn, and how long.
TRAIN_FIELDS = ("algorithm", "loss", "batch_size", "num_epochs", "num_steps", "optimizer",
                "optimizer_eps", "learning_rate", "lr_schedule", "warmup_steps", "weight_decay",
                "optimizer_scaling")
_CHOICES = {
    "data.name": data.DATASETS,
    "train.algorithm": get_args(steps.Algorithm),
    "train.loss": tuple(pc.LOSSES),
    "train.lr_schedule": ("constant", "cosine"),
    "train.optimizer_scaling": ("none", "per_role"),
}
_POSITIVE = ("train.batch_size", "train.num_epochs", "train.learning_rate", "log_every_steps",
             "eval_batch_size", "keep_checkpoints", "checkpoint_every_steps")
_NON_NEGATIVE = ("train.num_steps", "train.optimizer_eps", "train.weight_decay",
                 "train.warmup_steps", "eval_every_steps", "data.prefetch")


def field(config, dotted: str):
  """``config``'s field at a dotted path, e.g. "train.batch_size"."""
  for part in dotted.split("."):
    config = config[part]
  return config


def validate_config(config, num_devices: int, num_processes: int) -> None:
  """Raises TrainingError (a UserError) with one clear message for the first bad field."""
  configuration.check_section(config.train, TRAIN_FIELDS, "train")
  for name, choices in _CHOICES.items():
    if field(config, name) not in choices:
      raise TrainingError(f"config.{name} = {field(config, name)!r} is not one of {list(choices)}.")
  for name in _POSITIVE:
    if not field(config, name) > 0:
      raise TrainingError(f"config.{name} must be positive, got {field(config, name)!r}.")
  for name in _NON_NEGATIVE:
    if not field(config, name) >= 0:
      raise TrainingError(f"config.{name} must be non-negative, got {field(config, name)!r}.")
  train = config.train
  if not callable(getattr(optax, train.optimizer, None)):
    raise TrainingError(f"config.train.optimizer = {train.optimizer!r} is not an optax "
                        "optimizer (e.g. adam, sgd, adamw).")
  for name, argument, example in (("optimizer_eps", "eps", "adam"),
                                  ("weight_decay", "weight_decay", "adamw")):
    if train[name] and optimizer_argument(train.optimizer, argument) is None:
      raise TrainingError(f"config.train.{name}: optax.{train.optimizer} takes no {argument}; "
                          f"set it to 0 or choose an optimizer that does (e.g. {example}).")
  inference_of(config)  # pc.Engine's and pc.Inference's own checks
  try:
    kinds.check_fields(config.model)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  if config.data.name in data.TEXT_DATASETS:
    context = config.data.get("context")
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
      raise TrainingError(f"config.data.context (the characters a network sees) must be a positive "
                          f"integer for {config.data.name}, got {context!r}.")
    windows = config.data.get("eval_windows", 0)
    if not isinstance(windows, int) or isinstance(windows, bool) or windows < 0:
      raise TrainingError(f"config.data.eval_windows (the test windows evaluated; 0: all) must be "
                          f"a non-negative integer, got {windows!r}.")
  # The network's own refusals, from shapes alone (no weights drawn, no data read).
  nnx.eval_shape(lambda: build_model(config, data.spec_of(config.data)))
  if config.data.augment and config.data.name != "cifar10":
    raise TrainingError("config.data.augment is the CIFAR-10 augmentation; set it only for cifar10.")
  for name in ("train.batch_size", "eval_batch_size"):
    size = field(config, name)
    if size % num_devices or size % num_processes:
      raise TrainingError(
          f"config.{name} = {size} must be divisible by the number of devices ({num_devices}) "
          f"and of processes ({num_processes}); use a multiple of "
          f"{math.lcm(num_devices, num_processes)}.")


def engine_of(config) -> pc.Engine:
  """The ``pc.Engine`` of ``config.engine``."""
  return configuration.build(pc.Engine, config.engine, "engine")


def inference_of(config) -> pc.Inference:
  """The ``pc.Inference`` of ``config.inference``, on the engine of ``config.engine``."""
  return configuration.build(pc.Inference, config.inference, "inference", engine=engine_of(config))


def build_model(config, spec: data.pipeline.DatasetSpec) -> pc.Network:
  """The network ``config.model`` describes, for inputs and classes of ``spec``.

  A value or shape the network cannot take (e.g. patches that do not tile
  the images), or an engine choice that does not fit it, raises
  TrainingError naming it.
  """
  what = f"config.model ({config.model.kind}) cannot be built for {config.data.name} ({spec.describe()})"
  text = isinstance(spec, data.TextSpec)
  try:
    model = kinds.build(config.model, spec, config.seed)
  except (ValueError, TypeError) as e:
    raise TrainingError(f"{what}: {e}") from None
  except AttributeError as e:
    if not text:
      raise
    raise TrainingError(f"{what}: the network reads images ({e}); choose causal_transformer for "
                        "text.") from None
  # The outputs must be shaped as the targets: [B, C] for images, [B, T, V] for text.
  inputs = jax.ShapeDtypeStruct((1, spec.input_size), jnp.int32 if text else jnp.float32)
  outputs = jax.eval_shape(lambda x: pc.predict(model, x), inputs).shape
  targets = (1, spec.context, spec.num_classes) if text else (1, spec.num_classes)
  if outputs != targets:
    raise TrainingError(f"{what}: its outputs are {list(outputs)} for a batch of 1, the targets "
                        f"{list(targets)}" + ("; choose a network that predicts every position "
                                              "(causal_transformer)." if text else "."))
  try:
    pc.plan(engine_of(config), model, jnp.zeros((1, spec.input_size)))
  except ValueError as e:
    raise TrainingError(f"config.engine does not fit config.model ({config.model.kind}): "
                        f"{e}") from None
  return model


def load_splits(config) -> tuple[data.Split, data.Split]:
  """The (train, test) splits of ``config.data``, prepared on first use
  (atomically, so concurrent processes are safe)."""
  data_dir = config.data.data_dir or data.default_data_dir()
  data.prepare(config.data.name, data_dir, manual_dir=config.data.manual_dir or None,
               url=config.data.download_url or None)
  return (data.open_split(config.data, "train", data_dir, training=True),
          data.open_split(config.data, "test", data_dir, training=False))
