"""MNIST depth sweep, one point (MUPC.md, Fig. 1): 1 epoch, N = 512, T = H, batch 64.

    python -m mupc_flax.main --config=configs/mnist_depth.py:hidden_layers=32 --workdir=/tmp/mupc/d32
    python -m mupc_flax.main --config=configs/mnist_depth.py:hidden_layers=32,bp --workdir=/tmp/mupc/d32_bp
    python -m mupc_flax.main --config=configs/mnist_depth.py:hidden_layers=32,sp --workdir=/tmp/mupc/d32_sp

The paper sweeps H ∈ {8, 16, 32, 64, 128}; η = 0.1 and β = 0.5 for ReLU (β = 1.0
for linear and tanh); BP uses 1e-2 (1e-3 for linear networks).
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.base_config()
  overrides = dict(item.split("=", 1) for item in (arg or "").split(",") if "=" in item)
  activation = overrides.get("activation", config.model.activation)
  if activation in ("linear", "tanh"):
    config.train.inference_lr = 1.0
  # Explicit overrides in ``arg`` are applied last, so they win.
  return default.apply_arg(config, arg, bp_learning_rate=1e-3 if activation == "linear" else 1e-2)
