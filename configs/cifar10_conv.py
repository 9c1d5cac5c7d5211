"""Convolutional μPC on CIFAR-10: cross-entropy, batch 128, the paper's augmentation.

    python -m mupc_flax.main --config=configs/cifar10_conv.py --workdir=runs/cifar_conv
    python -m mupc_flax.main --config=configs/cifar10_conv.py:sp --workdir=runs/cifar_conv_sp
    python -m mupc_flax.main --config=configs/cifar10_conv.py:bp --workdir=runs/cifar_conv_bp

Three stages (32×32×32, 16×16×64, 8×8×128) of 8 residual 3×3 convolutions
each, 27 hidden layers, T = 27; η and β as the paper's CIFAR-10 runs (0.1,
0.01), 20 epochs. Meant for a GPU; ``:smoke`` runs a tiny one anywhere.
"""

from configs import cifar10_128
from mupc_flax import variants
from mupc_flax.networks import kinds


def get_config(arg: str | None = None):
  config = cifar10_128.cifar10_recipe()
  config.model = kinds.model_config("conv", width=32, stages=3, residual_layers=8)
  return variants.apply(config, arg, rates=variants.Rates(bp=cifar10_128.BP_LEARNING_RATE))
