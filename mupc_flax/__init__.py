"""mupc_flax: very deep predictive coding networks with μPC, in JAX and Flax NNX.

A notebook session needs only these names::

    model = mupc_flax.ResidualPCN(784, 128, 8, 10, parameterization="mupc", rngs=nnx.Rngs(0))
    z = model.feedforward(x)                          # [H, B, N] feed-forward activities
    F = mupc_flax.energy(model, z, x, y)              # batch-mean energy
    z = mupc_flax.infer(model, x, y, mupc_flax.Inference(steps=8, lr=0.5))
    conv = mupc_flax.ConvResidualPCN((28, 28, 1), (8, 16), 4, 10, rngs=nnx.Rngs(0))  # same API
    vit = mupc_flax.TransformerPCN((28, 28, 1), 7, 64, 4, 10, rngs=nnx.Rngs(0))      # same API
    step = mupc_flax.make_train_step(model, optimizer, inference=mupc_flax.Inference(8, 0.5))
"""

from importlib import metadata as _metadata

from mupc_flax.networks.causal_transformer import CausalTransformerPCN
from mupc_flax.networks.conv import Conv, ConvResidualPCN
from mupc_flax.networks.dense import ResidualPCN
from mupc_flax.networks.kinds import NetworkKind
from mupc_flax.networks.layers import ACTIVATIONS, Dense, Premultiplier
from mupc_flax.networks.protocol import PCNetwork
from mupc_flax.networks.transformer import TransformerPCN
from mupc_flax.parameterization import PARAMETERIZATIONS, Parameterization
from mupc_flax.pc import (LOSSES, Engine, Inference, OutputLoss, bp_gradients, energy,
                          feedforward, infer, layer_energies, pc_gradients, predict,
                          wavefront_phases)
from mupc_flax.sharding import global_batch, make_mesh
from mupc_flax.steps import make_eval_step, make_train_step

try:  # the installed distribution's version (pyproject.toml)
  __version__ = _metadata.version("mupc_flax")
except _metadata.PackageNotFoundError:  # imported from a source tree that is not installed
  __version__ = "0+unknown"

__all__ = [
    "ACTIVATIONS", "Conv", "ConvResidualPCN", "Dense", "NetworkKind", "PCNetwork",
    "Premultiplier", "ResidualPCN", "PARAMETERIZATIONS", "Parameterization",
    "LOSSES", "Engine", "Inference", "OutputLoss", "bp_gradients", "energy", "feedforward",
    "infer", "layer_energies", "pc_gradients", "predict", "wavefront_phases",
    "global_batch", "make_mesh",
    "make_eval_step", "make_train_step",
    "CausalTransformerPCN", "TransformerPCN",
]
