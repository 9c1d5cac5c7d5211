"""Fashion-MNIST, 128 hidden layers, 15 epochs (MUPC.md: ≈ 89 % test accuracy with μPC).

    python -m mupc_flax.main --config=configs/fashion_mnist_128.py --workdir=/tmp/mupc/fmnist_128
    python -m mupc_flax.main --config=configs/fashion_mnist_128.py:bp --workdir=/tmp/mupc/fmnist_128_bp
"""

from configs import default
from mupc_flax import variants


def get_config(arg: str | None = None):
  config = default.base_config()
  config.data.name = "fashion_mnist"
  config.model.hidden_layers = 128
  config.train.num_epochs = 15
  config.train.learning_rate = 0.05
  config.inference.lr = 0.5
  return variants.apply(config, arg, rates=variants.Rates(bp=5e-3))
