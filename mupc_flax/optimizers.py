"""The weights' optimizer that ``config.train`` describes, through optax."""

import inspect

import jax
import optax
from flax import nnx

from mupc_flax.errors import UserError


def optimizer_argument(name: str, argument: str):
  """The default of optax.``name``'s ``argument``, or None if it takes none."""
  parameter = inspect.signature(getattr(optax, name)).parameters.get(argument)
  return None if parameter is None else parameter.default


def weight_optimizer(config, num_steps: int, params=None) -> optax.GradientTransformation:
  """The weights' optax optimizer ``config.train`` describes.

  ``optimizer`` at ``learning_rate`` η: raised linearly from 0 over
  ``warmup_steps``, then constant or decayed to 0 at ``num_steps`` (cosine);
  ``optimizer_eps`` as its ε where that is set, ``weight_decay`` λ as its
  (decoupled) weight decay. Under ``optimizer_scaling = "per_role"`` each
  weight of ``params`` (``nnx.state(model, nnx.Param)``) gets η times its
  ``lr_scale`` and ε times its ``eps_scale`` (the metadata
  ``Parameterization.layer_options`` gives it), and λ / ``lr_scale``, so
  that every weight decays by the same fraction η·λ per step.
  """
  train = config.train
  eta = train.learning_rate
  if train.warmup_steps >= num_steps:
    raise UserError(f"config.train.warmup_steps = {train.warmup_steps} must be below the run's "
                        f"{num_steps} steps.")
  if train.lr_schedule == "cosine":  # from η down to 0 at the last step
    schedule = optax.warmup_cosine_decay_schedule(0.0, eta, train.warmup_steps, num_steps)
  elif train.warmup_steps:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, eta, train.warmup_steps),
                                     optax.constant_schedule(eta)], [train.warmup_steps])
  else:
    schedule = eta
  default_eps = optimizer_argument(train.optimizer, "eps")

  def optimizer(lr_scale: float = 1.0, eps_scale: float = 1.0) -> optax.GradientTransformation:
    kwargs = {}
    if default_eps is not None and (train.optimizer_eps or eps_scale != 1.0):
      kwargs["eps"] = (train.optimizer_eps or default_eps) * eps_scale
    if train.weight_decay:
      kwargs["weight_decay"] = train.weight_decay / lr_scale
    lr = (lambda step: lr_scale * schedule(step)) if callable(schedule) else lr_scale * schedule
    return getattr(optax, train.optimizer)(lr, **kwargs)

  if train.optimizer_scaling == "none":
    return optimizer()
  if params is None:
    raise ValueError("weight_optimizer needs the weights (params) for optimizer_scaling = "
                     "'per_role'.")

  def scale_of(variable) -> tuple[float, float]:
    metadata = variable.get_metadata()
    if "lr_scale" not in metadata:
      raise UserError("config.train.optimizer_scaling = 'per_role' needs every weight's "
                          "optimizer scale: build the network's layers with "
                          "Parameterization.layer_options (or nnx.Param metadata lr_scale, "
                          "eps_scale), or set optimizer_scaling = 'none'.")
    return metadata["lr_scale"], metadata["eps_scale"]

  is_variable = lambda x: isinstance(x, nnx.Variable)
  scales = {scale_of(v) for v in jax.tree.leaves(params, is_leaf=is_variable)}
  label = {scale: f"lr×{scale[0]:.6g},eps×{scale[1]:.6g}" for scale in sorted(scales)}
  labels = jax.tree.map(lambda v: label[scale_of(v)], params, is_leaf=is_variable)
  return optax.multi_transform({label[scale]: optimizer(*scale) for scale in label}, labels)
