"""Transformer μPC on MNIST: 16 tokens of 7×7 patches, one epoch.

    python -m mupc_flax.main --config=configs/mnist_transformer.py --workdir=runs/vit
    python -m mupc_flax.main --config=configs/mnist_transformer.py:blocks=8 --workdir=runs/vit8
    python -m mupc_flax.main --config=configs/mnist_transformer.py:sp --workdir=runs/vit_sp
    python -m mupc_flax.main --config=configs/mnist_transformer.py:bp --workdir=runs/vit_bp
    python -m mupc_flax.main --config=configs/mnist_transformer.py:depth_exponent=1 --workdir=runs/vit_a1

The network (``TransformerPCN``): a patch embedding with learned positions
into d = 64, then ``blocks`` (default 4) pairs of a pre-LN attention layer
(4 heads) and a pre-LN GELU MLP (256 hidden), each sublayer one PC layer:
2·blocks + 1 hidden layers of [B, 16, 64]. Mean pooling and a linear
readout. The paper's MNIST recipe (β = 0.5, batch 64, T = H, MSE) with
η = 0.03: the paper's η = 0.1 diverges within an epoch on this network
(docs/results.md, section 10). ``bp`` trains it by backprop at η = 1e-2.

The limits paper's options (README, "Transformer μPC"; measured in
docs/results.md, section 10.5): ``pc_layer=block`` (one PC layer per block),
``layer_norm=false``, ``depth_exponent=1`` and the weight optimizer per role
(``optimizer=adamw,optimizer_scaling=per_role,weight_decay=0.01,
warmup_steps=100,lr_schedule=cosine``), with ``loss=ce``.
"""

from configs import default
from mupc_flax.networks import kinds

BP_LEARNING_RATE = 1e-2  # the best of 3e-4 … 0.1 over one epoch (docs/results.md, section 10)
LEARNING_RATE = 0.03  # μPC's best of 0.3 … 0.01 at 2 and 4 blocks, 300 steps (section 10)


def transformer(config, width: int, blocks: int, patch_size: int):
  """``config`` with a transformer of 4 heads, a GELU MLP 4× wide, and these sizes."""
  config.model = kinds.model_config("transformer", width=width, blocks=blocks,
                                    patch_size=patch_size, heads=4, mlp_ratio=4, activation="gelu")
  return config


def get_config(arg: str | None = None):
  config = transformer(default.base_config(), width=64, blocks=4, patch_size=7)
  config.train.learning_rate = LEARNING_RATE
  return default.apply_arg(config, arg, bp_learning_rate=BP_LEARNING_RATE)
