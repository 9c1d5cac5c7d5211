"""Transformer μPC on MNIST: 16 tokens of 7×7 patches, one epoch.

    python -m mupc_flax.main --config=configs/mnist_transformer.py --workdir=runs/vit
    python -m mupc_flax.main --config=configs/mnist_transformer.py:blocks=8 --workdir=runs/vit8
    python -m mupc_flax.main --config=configs/mnist_transformer.py:sp --workdir=runs/vit_sp
    python -m mupc_flax.main --config=configs/mnist_transformer.py:bp --workdir=runs/vit_bp
    python -m mupc_flax.main --config=configs/mnist_transformer.py:depth_exponent=1 --workdir=runs/vit_a1
    python -m mupc_flax.main --config=configs/mnist_transformer.py:blocks=8,adamw,epc --workdir=runs/vit8_epc
    python -m mupc_flax.main --config=configs/mnist_transformer.py:blocks=8,adamw,bp --workdir=runs/vit8_bp
    python -m mupc_flax.main --config=configs/mnist_transformer.py:blocks=8,limits --workdir=runs/vit8_limits

The network (``TransformerPCN``): a patch embedding with learned positions
into d = 64, then ``blocks`` (default 4) pairs of a pre-LN attention layer
(4 heads) and a pre-LN GELU MLP (256 hidden), each sublayer one PC layer:
2·blocks + 1 hidden layers of [B, 16, 64]. Mean pooling and a linear
readout. The paper's MNIST recipe (β = 0.5, batch 64, T = H, MSE) with
η = 0.03: the paper's η = 0.1 diverges within an epoch on this network
(docs/results.md, section 10). ``bp`` trains it by backprop at η = 1e-2.

This config's own variants (README, "Transformer μPC"; measured in
docs/results.md, sections 10.5 to 10.7), which set the η that ``bp``, ``deep`` and
``epc`` then train at:
  adamw    the strong recipe: cross-entropy, AdamW (λ = 0.01), 100 warm-up
           steps and the cosine decay, η = 3e-2 (``adamw,bp`` the strong BP,
           ``adamw,epc`` ePC under it)
  limits   the limits paper's recipe: one PC layer per block, no layer norm,
           α = 1, the weight optimizer per role (adamw's, η = 0.1), and state
           PC by gradient descent at a per-sample step of 0.45 for T = H steps
"""

from configs import default
from mupc_flax import variants
from mupc_flax.networks import kinds

BP_LEARNING_RATE = 1e-2  # the best of 3e-4 … 0.1 over one epoch (docs/results.md, section 10)
LEARNING_RATE = 0.03  # μPC's best of 0.3 … 0.01 at 2 and 4 blocks, 300 steps (section 10)
ADAMW_LEARNING_RATE = 0.03  # BP's best of 3e-3 … 0.1 under adamw at 8 blocks (section 10.5)
ADAMW_WEIGHT_DECAY = 0.01
ADAMW_WARMUP_STEPS = 100
LIMITS_LEARNING_RATE = 0.1  # BP's best of 1e-2 … 0.3 on the limits network, per role (10.5)
LIMITS_STEP_PER_SAMPLE = 0.45  # the limits paper's inference step, per sample


def transformer(config, width: int, blocks: int, patch_size: int):
  """``config`` with a transformer of 4 heads, a GELU MLP 4× wide, and these sizes."""
  config.model = kinds.model_config("transformer", width=width, blocks=blocks,
                                    patch_size=patch_size, heads=4, mlp_ratio=4, activation="gelu")
  return config


def adamw(config) -> float:
  """Cross-entropy, AdamW, warm-up and the cosine decay; returns their η."""
  config.train.update(loss="ce", optimizer="adamw", weight_decay=ADAMW_WEIGHT_DECAY,
                      warmup_steps=ADAMW_WARMUP_STEPS, lr_schedule="cosine",
                      learning_rate=ADAMW_LEARNING_RATE)
  return ADAMW_LEARNING_RATE


def limits(config) -> float:
  """The limits paper's network, weight optimizer and inference; returns its η."""
  adamw(config)
  config.model.update(pc_layer="block", layer_norm=False, depth_exponent=1.0)
  config.train.update(optimizer_scaling="per_role", learning_rate=LIMITS_LEARNING_RATE)
  config.inference.update(optimizer="gd", momentum=0.0, steps=None, steps_per_layer=1,
                          lr=LIMITS_STEP_PER_SAMPLE * config.train.batch_size)
  return LIMITS_LEARNING_RATE


def get_config(arg: str | None = None):
  config = transformer(default.base_config(), width=64, blocks=4, patch_size=7)
  config.train.learning_rate = LEARNING_RATE
  return variants.apply(config, arg, rates=variants.Rates(bp=BP_LEARNING_RATE),
                        recipes={"adamw": adamw, "limits": limits})
