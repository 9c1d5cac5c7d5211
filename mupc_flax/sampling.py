"""Text from a language model: autoregressive sampling from its feed-forward prediction.

``python -m mupc_flax.sample`` restores a checkpoint and calls ``sample_text``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mupc_flax import data, pc


def sample_text(model: pc.Network, spec: data.TextSpec, prompt: str, length: int,
                temperature: float, seed: int = 0) -> str:
  """``length`` characters drawn after ``prompt`` [str], each from
  softmax(μ_L / τ) of the feed-forward prediction at the last position of
  the window (the last ``spec.context`` characters so far); τ = 0 takes the
  most likely. The prompt must be in ``spec``'s vocabulary (DataError)."""
  context = spec.context
  ids = list(spec.encode(prompt))

  @nnx.jit
  def next_logits(model, window, position):
    return pc.predict(model, window)[0, position]

  key = jax.random.key(seed)
  for _ in range(length):
    recent = ids[-context:]
    window = jnp.asarray(np.pad(recent, (0, context - len(recent)))[None], jnp.int32)
    # Causal: the positions after the last character do not change its prediction.
    logits = next_logits(model, window, len(recent) - 1)
    if temperature == 0:
      ids.append(int(jnp.argmax(logits)))
    else:
      key, draw = jax.random.split(key)
      ids.append(int(jax.random.categorical(draw, logits / temperature)))
  return spec.decode(ids[len(prompt):])
