"""CIFAR-10, 128 hidden layers, cross-entropy output, 20 epochs, batch 128 (MUPC.md).

    python -m mupc_flax.main --config=configs/cifar10_128.py --workdir=/tmp/mupc/cifar_128
    python -m mupc_flax.main --config=configs/cifar10_128.py:bp --workdir=/tmp/mupc/cifar_128_bp

Training images get the paper's augmentation: random crop 32 (padding 4),
horizontal flip and rotation up to 10°.
"""

from configs import default
from mupc_flax import variants


BP_LEARNING_RATE = 1e-2


def cifar10_recipe():
  """The base config with the paper's CIFAR-10 data and training fields."""
  config = default.base_config()
  config.data.name = "cifar10"
  config.data.augment = True
  config.train.loss = "ce"
  config.train.batch_size = 128
  config.train.num_epochs = 20
  config.train.learning_rate = 0.1
  config.inference.lr = 0.01
  return config


def get_config(arg: str | None = None):
  config = cifar10_recipe()
  config.model.hidden_layers = 128
  return variants.apply(config, arg, rates=variants.Rates(bp=BP_LEARNING_RATE))
