"""Convolutional μPC on CIFAR-10: cross-entropy, batch 128, the paper's augmentation.

    python -m mupc_flax.main --config=configs/cifar10_conv.py --workdir=runs/cifar_conv
    python -m mupc_flax.main --config=configs/cifar10_conv.py:sp --workdir=runs/cifar_conv_sp
    python -m mupc_flax.main --config=configs/cifar10_conv.py:bp --workdir=runs/cifar_conv_bp

Three stages (32×32×32, 16×16×64, 8×8×128) of 8 residual 3×3 convolutions
each, 27 hidden layers, T = 27; η and β as the paper's CIFAR-10 runs (0.1,
0.01), 20 epochs. Meant for a GPU; ``:smoke`` runs a tiny one anywhere.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  config.data.name = "cifar10"
  config.data.augment = True
  config.model.kind = "conv"
  config.model.width = 32
  config.model.stages = 3
  config.model.residual_layers = 8
  config.train.loss = "ce"
  config.train.batch_size = 128
  config.train.num_epochs = 20
  config.train.learning_rate = 0.1
  config.train.inference_lr = 0.01
  return default.apply_arg(config, arg, bp_learning_rate=1e-2)
