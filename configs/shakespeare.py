"""A character-level language model on Shakespeare's works: the causal transformer PCN.

    python -m mupc_flax.data prepare --dataset=shakespeare --manual_dir=../shared/data/shakespeare
    python -m mupc_flax.main --config=configs/shakespeare.py --workdir=runs/shakespeare
    python -m mupc_flax.main --config=configs/shakespeare.py:epc --workdir=runs/shakespeare_epc
    python -m mupc_flax.main --config=configs/shakespeare.py:bp --workdir=runs/shakespeare_bp
    python -m mupc_flax.main --config=configs/shakespeare.py:limits --workdir=runs/shakespeare_limits
    python -m mupc_flax.sample --workdir=runs/shakespeare --prompt="ROMEO:" --length=200

The data: the ``shakespeare`` dataset (the 42 works of the offline archive,
84 characters; the test split the last tenth of every work), windows of
``data.context`` = 64 characters; ``data.name=tiny_shakespeare`` reads tfds'
Tiny Shakespeare where its ``input.txt`` is at hand. Evaluation reads
``data.eval_windows`` disjoint windows spread evenly over the test split and
logs the loss per character in nats and in bits.

The network (``CausalTransformerPCN``): token embedding with learned
positions into d = 128, 4 blocks of pre-LN causal attention (4 heads) and a
GELU MLP 4× wide, a PC layer per sublayer (9 hidden layers of [B, 64, 128]),
a per-token readout. Cross-entropy, AdamW (λ = 0.01) with 100 warm-up steps
and the cosine decay, for 2,000 steps of 64 windows (8.2 M characters, about
1.8 passes over the training text); state PC by the paper's recipe
(β = 0.5, T = H).

Its own variants, besides smoke, bp, deep and epc:
  adamw    the strong recipe above, the default (``adamw,bp`` is BP under it,
           as for configs/mnist_transformer.py)
  limits   the limits paper's transformer: 12 blocks, one PC layer per
           block, no layer norm, α = 1, state PC by gradient descent for
           T = 100 steps at a per-sample step of 0.25
"""

from configs import default
from mupc_flax import variants
from mupc_flax.networks import kinds

LEARNING_RATE = 0.1  # BP's best of 3e-3 … 1 over 200 steps at the default shape (docs/results.md, section 12)
WEIGHT_DECAY = 0.01
WARMUP_STEPS = 100
LIMITS_BLOCKS = 12
LIMITS_INFERENCE_STEPS = 100
LIMITS_STEP_PER_SAMPLE = 0.25


def adamw(config) -> float:
  """The strong recipe (the default): cross-entropy, AdamW, warm-up and the
  cosine decay; returns its η."""
  config.train.update(loss="ce", optimizer="adamw", learning_rate=LEARNING_RATE,
                      weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP_STEPS, lr_schedule="cosine")
  return LEARNING_RATE


def limits(config) -> float:
  """The limits paper's network and inference; returns the weights' η."""
  config.model.update(blocks=LIMITS_BLOCKS, pc_layer="block", layer_norm=False,
                      depth_exponent=1.0)
  config.inference.update(optimizer="gd", momentum=0.0, steps=LIMITS_INFERENCE_STEPS,
                          lr=LIMITS_STEP_PER_SAMPLE * config.train.batch_size)
  return config.train.learning_rate


def get_config(arg: str | None = None):
  config = default.base_config()
  config.data.name = "shakespeare"  # shakespeare | tiny_shakespeare
  config.data.context = 64  # characters a window shows the network (T)
  config.data.eval_windows = 2048  # disjoint test windows, spread over the split (0: all)
  config.model = kinds.model_config("causal_transformer", width=128, blocks=4, heads=4,
                                    mlp_ratio=4, activation="gelu")
  adamw(config)
  config.train.num_steps = 2000
  config.eval_every_steps = 500
  config.eval_batch_size = 256
  config.log_every_steps = 50
  return variants.apply(config, arg, rates=variants.Rates(bp=LEARNING_RATE),
                        recipes={"adamw": adamw, "limits": limits})
