"""MNIST depth sweep, one point (MUPC.md, Fig. 1): 1 epoch, N = 512, T = H, batch 64.

    python -m mupc_flax.main --config=configs/mnist_depth.py:hidden_layers=32 --workdir=/tmp/mupc/d32
    python -m mupc_flax.main --config=configs/mnist_depth.py:hidden_layers=32,bp --workdir=/tmp/mupc/d32_bp
    python -m mupc_flax.main --config=configs/mnist_depth.py:hidden_layers=32,sp --workdir=/tmp/mupc/d32_sp

The paper sweeps H ∈ {8, 16, 32, 64, 128}; η = 0.1 and β = 0.5 for ReLU (β = 1.0
for linear and tanh); BP uses 1e-2 (1e-3 for linear networks).
"""

from configs import default
from mupc_flax import variants


def by_activation(config) -> variants.Rates:
  """β and BP's η for the activation the config ends up with (the paper's)."""
  if config.model.activation in ("linear", "tanh"):
    config.inference.lr = 1.0
  return variants.Rates(bp=1e-3 if config.model.activation == "linear" else 1e-2)


def get_config(arg: str | None = None):
  return variants.apply(default.base_config(), arg, rates=by_activation)
