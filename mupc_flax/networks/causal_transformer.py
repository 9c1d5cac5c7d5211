"""The causal transformer PCN: a character-level language model, as a Flax NNX module.

Inputs x [B, T] are token ids (0 … V−1; integers, or floats holding them),
one window of T = ``context`` characters per sample. The network is the
transformer PCN's (``transformer.TransformerPCN``: the same blocks, PC
layers, premultipliers and roles) with three changes:

    entry (token embedding):  μ_1 = a_e · [onehot(x_t), onehot(t)] W_e   [B, T, d]
    attention:                token t attends to tokens 0 … t only
    readout (per token):      μ_L = a_L · LN(z_top) W_L                  [B, T, V]

so the output at position t predicts the token at t + 1 from tokens 0 … t
alone, and the output energy sums the per-token loss over a window's T
positions (``pc.energy``). Targets y are [B, T, V] one-hot.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mupc_flax import parameterization as parameterization_lib
from mupc_flax.networks import kinds
from mupc_flax.networks.transformer import TransformerPCN, check_positive_integers


class CausalTransformerPCN(TransformerPCN):
  """Causal transformer PCN over windows of ``context`` tokens of a
  ``vocab_size`` vocabulary; outputs [B, T, V], one prediction per position.

  Args:
    vocab_size: V, the number of token ids (inputs and outputs).
    context: T, the tokens of a window (the learned positions).
    width, blocks, heads, mlp_ratio, activation, parameterization,
      depth_exponent, precision, pc_layer, layer_norm, rngs: as for
      ``TransformerPCN``.
  """

  causal = True

  def __init__(self, vocab_size: int, context: int, width: int, blocks: int, *,
               heads: int = 4, mlp_ratio: int = 4, activation: str = "gelu",
               parameterization: str = "mupc",
               depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
               precision: str = "float32", pc_layer: str = "sublayer", layer_norm: bool = True,
               rngs: nnx.Rngs):
    check_positive_integers("CausalTransformerPCN", vocab_size=vocab_size, context=context)
    self.vocab_size, self.context = vocab_size, context
    self._build(vocab_size + context, width, blocks, vocab_size, heads=heads,
                mlp_ratio=mlp_ratio, activation=activation, parameterization=parameterization,
                depth_exponent=depth_exponent, precision=precision, pc_layer=pc_layer,
                layer_norm=layer_norm, rngs=rngs)

  @property
  def tokens(self) -> int:
    return self.context

  def entry(self, stage: int, h: jax.Array) -> jax.Array:
    """The token embedding with learned positions: ids [B, T] -> [B, T, d]."""
    del stage
    if h.shape[1:] != (self.context,):
      raise ValueError(f"CausalTransformerPCN takes windows [B, {self.context}] of token ids, got "
                       f"inputs of shape {h.shape}.")
    ids = h.astype(jnp.int32)
    dtype = self.embed.kernel.dtype
    positions = jnp.broadcast_to(jnp.eye(self.context, dtype=dtype),
                                 (h.shape[0], self.context, self.context))
    return self.embed(jnp.concatenate([jax.nn.one_hot(ids, self.vocab_size, dtype=dtype),
                                       positions], axis=-1))

  def readout(self, h: jax.Array) -> jax.Array:
    """μ_L per position [B, T, V] from the top activity [B, T, d] (layer norm if on)."""
    return self.head(self._norm(h))


def make_network(spec, *, width: int = 128, blocks: int = 4, heads: int = 4, mlp_ratio: int = 4,
                 activation: str = "gelu", parameterization: str = "mupc",
                 depth_exponent: float = parameterization_lib.DEPTH_EXPONENT,
                 precision: str = "float32", pc_layer: str = "sublayer", layer_norm: bool = True,
                 rngs: nnx.Rngs) -> CausalTransformerPCN:
  """The causal transformer for a text dataset of ``spec`` (its vocabulary
  size V and window ``context``), ``blocks`` blocks of width d = ``width``."""
  if not hasattr(spec, "vocabulary"):
    raise ValueError("the causal transformer reads text: choose a text dataset (shakespeare, "
                     "tiny_shakespeare) or another kind for images.")
  return CausalTransformerPCN(spec.num_classes, spec.context, width, blocks, heads=heads,
                              mlp_ratio=mlp_ratio, activation=activation,
                              parameterization=parameterization, depth_exponent=depth_exponent,
                              precision=precision, pc_layer=pc_layer, layer_norm=layer_norm,
                              rngs=rngs)


KIND = kinds.NetworkKind(make=make_network, smoke=dict(width=16, blocks=1, heads=2),
                         depth_field="blocks")
