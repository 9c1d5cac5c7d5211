"""Convolutional μPC on MNIST: one epoch, a depth sweep over the residual layers.

    python -m mupc_flax.main --config=configs/mnist_conv.py --workdir=runs/conv
    python -m mupc_flax.main --config=configs/mnist_conv.py:residual_layers=4 --workdir=runs/conv4
    python -m mupc_flax.main --config=configs/mnist_conv.py:residual_layers=4,sp --workdir=runs/conv4_sp
    python -m mupc_flax.main --config=configs/mnist_conv.py:residual_layers=4,bp --workdir=runs/conv4_bp
    python -m mupc_flax.main --config=configs/mnist_conv.py:residual_layers=4,deep --workdir=runs/conv4_deep

The network (``ConvResidualPCN``): a stride-2 3×3 stem to 16 channels at
14×14, then 3 stages (16 channels at 14×14, 32 at 7×7, 64 at 4×4) joined by
stride-2 convolutions, each with ``residual_layers`` residual 3×3
convolutions, global average pooling and a linear readout. With the default
6 per stage: 18 residual layers, H = 21 hidden layers and T = 21 inference
steps. The paper's MNIST recipe otherwise: η = 0.1, β = 0.5, batch 64, MSE.
The strided stem keeps one epoch to minutes on a CPU (stem_stride=1 keeps
28×28, about 4× the work).
"""

from configs import default
from mupc_flax import variants
from mupc_flax.networks import kinds

# The deep recipe's weight learning rate here: 0.03 beat BP's 0.01 by 2.5
# points at 6 and 12 residual layers (docs/results.md, section 9.4).
DEEP_LEARNING_RATE = 0.03


def get_config(arg: str | None = None):
  config = default.base_config()
  config.model = kinds.model_config("conv", width=16, stages=3, residual_layers=6, stem_stride=2)
  return variants.apply(config, arg, rates=variants.Rates(bp=1e-2, deep=DEEP_LEARNING_RATE))
