"""Default configuration: μPC on MNIST, the paper's 1-epoch recipe (N = 512, H = 8).

    python -m mupc_flax.main --config=configs/default.py --workdir=runs/default
    python -m mupc_flax.main --config=configs/default.py:smoke --workdir=runs/smoke
    python -m mupc_flax.main --config=configs/default.py:hidden_layers=16,deep --workdir=runs/d16

The text after ':' chains the variants of ``mupc_flax.variants`` (smoke, sp,
bp, deep, epc; ``python -m mupc_flax.main --help`` lists them) and
``name=value`` overrides of any field. This file holds data only.
"""

import ml_collections

from mupc_flax import configuration, pc, variants
from mupc_flax.networks import kinds


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

  # How the engine computes, exactly pc.Engine's fields (layout, gradient_layout,
  # unroll, closed_form, kernel): the same result at any setting, speed differs.
  config.engine = configuration.section(pc.Engine)
  # Inference, exactly pc.Inference's fields: T = steps (None: steps_per_layer × H,
  # the paper's T = H), β = lr on the batch-mean energy (0.5: the paper's), the
  # optimiser (gd | momentum | nesterov) and momentum, method (states | errors),
  # schedule, phases, tolerance, step_guard and output_precision (γ).
  config.inference = configuration.section(pc.Inference)

  # The weights and the run.
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

  config.log_every_steps = 100
  config.eval_every_steps = 0  # 0 -> evaluate once per epoch and at the end
  config.eval_batch_size = 1000  # the whole test split is evaluated, the last batch padded
  config.log_hessian = False  # at each eval: activity-Hessian spectrum of one test example (small nets)
  config.log_gradient_agreement = True  # PC at each eval: per-layer PC–BP gradient cosine, and reach
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return variants.apply(base_config(), arg)
