"""MNIST, 128 hidden layers, 5 epochs (MUPC.md: ≈ 98 % test accuracy with μPC).

    python -m mupc_flax.main --config=configs/mnist_128.py --workdir=/tmp/mupc/mnist_128
    python -m mupc_flax.main --config=configs/mnist_128.py:bp --workdir=/tmp/mupc/mnist_128_bp
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  config.model.hidden_layers = 128
  config.train.num_epochs = 5
  config.train.learning_rate = 0.1
  config.train.inference_lr = 0.5
  config.eval_every_steps = 0
  return default.apply_arg(config, arg, bp_learning_rate=5e-3)
