"""Transformer μPC on CIFAR-10: 64 tokens of 4×4 patches, cross-entropy, batch 128.

    python -m mupc_flax.main --config=configs/cifar10_transformer.py --workdir=runs/cifar_vit
    python -m mupc_flax.main --config=configs/cifar10_transformer.py:bp --workdir=runs/cifar_vit_bp

d = 128, 4 heads, 6 blocks (13 hidden layers of [B, 64, 128]), the paper's
CIFAR-10 recipe (η = 0.1, β = 0.01, augmentation, 20 epochs). Meant for a
GPU; ``:smoke`` runs a tiny one anywhere.
"""

from configs import cifar10_128, mnist_transformer
from mupc_flax import variants


def get_config(arg: str | None = None):
  config = mnist_transformer.transformer(cifar10_128.cifar10_recipe(), width=128, blocks=6,
                                         patch_size=4)
  return variants.apply(config, arg, rates=variants.Rates(bp=mnist_transformer.BP_LEARNING_RATE))
