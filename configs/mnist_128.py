"""MNIST, 128 hidden layers, 5 epochs (MUPC.md: ≈ 98 % test accuracy with μPC).

    python -m mupc_flax.main --config=configs/mnist_128.py --workdir=/tmp/mupc/mnist_128
    python -m mupc_flax.main --config=configs/mnist_128.py:bp --workdir=/tmp/mupc/mnist_128_bp
"""

from configs import default
from mupc_flax import variants


def get_config(arg: str | None = None):
  config = default.base_config()
  config.model.hidden_layers = 128
  config.train.num_epochs = 5
  config.train.learning_rate = 0.1
  config.inference.lr = 0.5
  config.eval_every_steps = 0
  return variants.apply(config, arg, rates=variants.Rates(bp=5e-3))
