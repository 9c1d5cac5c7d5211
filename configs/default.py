"""Default configuration: μPC on MNIST, the paper's 1-epoch recipe (N = 512, H = 8).

    python -m mupc_flax.main --config=configs/default.py --workdir=/tmp/mupc/default
    python -m mupc_flax.main --config=configs/default.py:smoke --workdir=/tmp/mupc/smoke
    python -m mupc_flax.main --config=configs/default.py --workdir=/tmp/mupc/d16 \\
        --config.model.hidden_layers=16

The text after ':' is a comma-separated list of variants and overrides:
  smoke             a tiny model for 60 steps (seconds on a CPU)
  sp                standard PC (η = 1e-2, β = 1e-2), the paper's Fig. 1 baseline
  bp                the same network trained by backprop ("BP with Depth-μP" under μPC)
  deep              inference that reaches the bottom layers (docs/results.md, section 9):
                    heavy-ball momentum 0.9, T = 2H steps, β = B/4 (a per-sample step of
                    1/4) under the step guard, and BP's weight learning rate (unless the
                    config measured another) with a cosine decay
  epc               error-parameterised PC (Goemaere et al. 2025): inference on the errors,
                    T = 1 step of β = B/100 (a per-sample step of 0.01), the weight learning
                    rate of deep (BP's unless the config measured another) with a cosine
                    decay, and Adam's ε at 1e-12 (measured: docs/results.md, section 11)
  name=value        a field of config.model, config.engine, config.train or config.data by
                    its name, e.g. hidden_layers=32,width=256
"""

import difflib
from collections.abc import Callable, Mapping

import ml_collections
import optax

from mupc_flax import train
from mupc_flax.networks import kinds

# The paper's BP learning rate for this experiment (MUPC.md: 1e-2, 1e-3 for linear nets).
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


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # model initialisation and data order

  config.data = ml_collections.ConfigDict()
  config.data.name = "mnist"  # mnist | fashion_mnist | cifar10
  config.data.data_dir = ""  # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.manual_dir = ""  # "" -> $MUPC_<NAME>_DIR, else download the official files
  config.data.download_url = ""  # "" -> the official URL; else a mirror of it
  config.data.in_memory = True  # decode each split once into memory
  config.data.augment = False  # CIFAR-10 crop/flip/rotation for training
  config.data.prefetch = 2  # batches prepared ahead in a background thread

  # The network: ``kind`` names a built-in (dense | conv | transformer) or a
  # factory of your own ("module:function"); the other fields are the kind's
  # own (``mupc_flax.networks.kinds``), here the dense network's: N = width,
  # H = hidden_layers (L = H + 1 weight matrices), and activation (linear |
  # relu | tanh | gelu), parameterization (mupc | sp), depth_exponent (μPC's
  # residual branches scale as L^(−α); 0.5 the paper, 1 CompleteP) and
  # precision (float32 | tf32 | bfloat16, of the products).
  config.model = kinds.model_config("dense", width=512, hidden_layers=8)

  # How the engine computes: the same result at any setting, speed differs.
  config.engine = ml_collections.ConfigDict()
  config.engine.layout = "auto"  # auto | stacked | per_layer: how inference holds the layers
  config.engine.kernel = "xla"  # xla | pallas (the fused Pallas step; opt-in)

  config.train = ml_collections.ConfigDict()
  config.train.algorithm = "pc"  # pc | bp
  config.train.loss = "mse"  # mse | ce
  config.train.batch_size = 64  # global batch, split over all devices
  config.train.num_epochs = 1
  config.train.num_steps = 0  # > 0: train this many steps instead of num_epochs
  config.train.optimizer = "adam"  # an optax optimizer taking learning_rate
  # > 0: the optimizer's ε (Adam: 1e-8 by default). ePC's hidden gradients are
  # s × BP's (~2e-8 per entry at 512 × 16, s = 0.01): Adam's ε then damps them.
  config.train.optimizer_eps = 0.0
  config.train.learning_rate = 0.1  # η (weights)
  config.train.lr_schedule = "constant"  # constant | cosine (η decays to 0 over the run)
  config.train.warmup_steps = 0  # η rises linearly from 0 over these first steps
  config.train.weight_decay = 0.0  # λ, the optimizer's decoupled weight decay (e.g. adamw)
  # per_role: η and Adam's ε scaled per weight role with width and depth (μPC:
  # CompleteP's rules at α = 1, Depth-μP's at α = 1/2; parameterization.py).
  config.train.optimizer_scaling = "none"  # none | per_role
  config.train.inference_steps = 0  # T; 0 -> T = steps_per_layer × H
  config.train.steps_per_layer = 1  # T = steps_per_layer × H when inference_steps is 0
  config.train.inference_lr = 0.5  # β (activities), on the batch-mean energy
  config.train.inference_optimizer = "gd"  # gd | momentum | nesterov (on the activities)
  config.train.inference_momentum = 0.0  # μ of momentum and nesterov, in [0, 1)
  config.train.inference_tolerance = 0.0  # > 0: stop once ‖∂F/∂z‖ < this × its start (T: the cap)
  config.train.inference_method = "states"  # states (PC) | errors (ePC: inference on the errors)
  config.train.output_precision = 1.0  # γ, the weight of the output energy (1: the paper)
  config.train.inference_step_guard = 0  # > 0: power iterations estimating λ_max; β capped to stay stable
  config.train.schedule = "wavefront"  # wavefront | plain (same result); the errors method always runs plain
  config.train.phases = 8  # blocks of the wavefront schedule

  config.log_every_steps = 100
  config.eval_every_steps = 0  # 0 -> evaluate once per epoch and at the end
  config.eval_batch_size = 1000  # the whole test split is evaluated, the last batch padded
  config.log_hessian = False  # at each eval: activity-Hessian spectrum of one test example (small nets)
  config.log_gradient_agreement = True  # PC at each eval: per-layer PC–BP gradient cosine, and reach
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  return config


def _parse_value(item: str, current, value: str):
  """``value`` as the type of the field's current value."""
  if isinstance(current, bool):
    if value.lower() not in ("1", "true", "0", "false"):
      raise ValueError(f"Config argument {item!r}: give true or false.")
    return value.lower() in ("1", "true")
  try:
    return type(current)(value)
  except ValueError:
    raise ValueError(f"Config argument {item!r}: {value!r} is not a valid "
                     f"{type(current).__name__}.") from None


def _override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one ``name=value`` item to the field of that name."""
  name, value = item.split("=", 1)
  if name == "kind":  # another network: its own fields, at their defaults
    if config.model.kind != value:
      config.model = kinds.model_config(value)
    return
  sections = [s for s in (config.model, config.engine, config.train, config.data) if name in s]
  if len(sections) != 1:
    raise ValueError(f"Config argument {item!r}: {name!r} is not a field of config.model "
                     f"(the {config.model.kind} network), config.engine, config.train or "
                     "config.data.")
  sections[0][name] = _parse_value(item, sections[0][name], value)


# A config's own variant: sets its fields on the config and returns the weight
# learning rate that the bp, deep and epc variants then train at.
Recipe = Callable[[ml_collections.ConfigDict], float]


def apply_arg(config: ml_collections.ConfigDict, arg: str | None,
              bp_learning_rate: float = BP_LEARNING_RATE,
              deep_learning_rate: float | None = None,
              recipes: Mapping[str, Recipe] | None = None) -> ml_collections.ConfigDict:
  """Applies the variants and ``name=value`` overrides of a config argument.

  ``bp`` trains at ``bp_learning_rate``; ``deep`` at ``deep_learning_rate``
  where a config has measured one, else at ``bp_learning_rate``. A config's
  own ``recipes`` apply before the built-in variants, wherever they stand, and
  their learning rate replaces both (``adamw,bp`` is BP under that recipe).

  Overrides win over variants wherever they stand, and variants see them
  (``batch_size=128,deep`` sets β for a batch of 128).
  """
  recipes = recipes or {}
  items = list(filter(None, (arg or "").split(",")))
  # A new kind first: it resets config.model to that kind's fields.
  overrides = sorted((item for item in items if "=" in item), key=lambda i: not i.startswith("kind="))
  for item in overrides:
    _override(config, item)
  for item in items:
    if item in recipes:
      bp_learning_rate = deep_learning_rate = recipes[item](config)
  for item in items:
    if "=" in item or item in recipes:
      continue
    if item == "smoke":
      config.model.update(kinds.get(config.model.kind).smoke)
      config.train.num_steps = 60
      config.log_every_steps = 10
      config.eval_every_steps = 30
      config.checkpoint_every_steps = 30
    elif item == "sp":
      config.model.parameterization = "sp"
      config.train.learning_rate = 1e-2
      config.train.inference_lr = 1e-2
    elif item == "bp":
      config.train.algorithm = "bp"
      config.train.learning_rate = bp_learning_rate
    elif item == "epc":
      config.train.inference_method = "errors"
      config.train.inference_steps = EPC_STEPS
      config.train.inference_lr = EPC_STEP_PER_SAMPLE * config.train.batch_size
      config.train.learning_rate = deep_learning_rate or bp_learning_rate
      config.train.lr_schedule = "cosine"
      # Only an optimizer with an ε gets one (optimizer=sgd,epc stays valid).
      if (callable(getattr(optax, config.train.optimizer, None))
          and train.optimizer_argument(config.train.optimizer, "eps") is not None):
        config.train.optimizer_eps = EPC_OPTIMIZER_EPS
    elif item == "deep":
      config.train.inference_optimizer = "momentum"
      config.train.inference_momentum = DEEP_MOMENTUM
      config.train.steps_per_layer = DEEP_STEPS_PER_LAYER
      config.train.inference_lr = DEEP_STEP_PER_SAMPLE * config.train.batch_size
      config.train.inference_step_guard = STEP_GUARD_ITERATIONS
      config.train.learning_rate = deep_learning_rate or bp_learning_rate
      config.train.lr_schedule = "cosine"
    else:
      names = ("smoke", "sp", "bp", "deep", "epc", *recipes)
      close = difflib.get_close_matches(item, names, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else "."
      raise ValueError(f"Unknown config variant {item!r}{hint} Use {', '.join(names)} or "
                       "name=value.")
  for item in overrides:
    _override(config, item)
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return apply_arg(base_config(), arg)
