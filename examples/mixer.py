"""A residual MLP-Mixer for μPC, from outside the package: tokens [B, T, d] are patches,
each PC layer one block z + a·(channel map of token-mixed z); premultipliers by role.

    python -m mupc_flax.main --config=configs/default.py:kind=examples.mixer:KIND --workdir=runs/mixer
"""

import jax
import jax.numpy as jnp
from flax import nnx

import mupc_flax as mf
from mupc_flax.networks.transformer import layer_norm


class Mixer(nnx.Module):
  def __init__(self, image_shape, patch, width, blocks, classes, *, parameterization, rngs):
    h, w, c = image_shape
    self.image_shape, self.patch = tuple(image_shape), patch
    self.stage_layers = (1 + blocks,)  # one stage: the embedding and the blocks
    p, tokens = mf.PARAMETERIZATIONS[parameterization], (h // patch) * (w // patch)
    dense = lambda fan_in, out, role, stack=None: mf.Dense(
        fan_in, out, **p.layer_options(role, fan_in, out, blocks + 2), rngs=rngs, stack=stack)
    self.embed = dense(patch * patch * c, width, "entry")
    self.token_mix = dense(tokens, tokens, "inner", blocks)
    self.channel_mix = dense(width, width, "residual", blocks)
    self.head = dense(width, classes, "readout")

  def phi(self, z):  # the nonlinearities live inside the branches
    return z

  def entry(self, stage, x):
    (h, w, c), p = self.image_shape, self.patch
    patches = x.reshape(-1, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return self.embed(patches.reshape(x.shape[0], -1, p * p * c))

  def residual_weights(self, stage, dtype=None):
    return (self.token_mix.kernel[...], self.token_mix.multiplier[...],
            self.channel_mix.kernel[...], self.channel_mix.multiplier[...])

  def residual_branch(self, stage, weights, h):
    def block(z, token_kernel, a_token, channel_kernel, a_channel):
      mixed = jax.nn.gelu(a_token * jnp.einsum("btd,ts->bsd", layer_norm(z), token_kernel))
      return a_channel * mixed @ channel_kernel
    if isinstance(h, tuple):  # one array per layer
      return tuple(block(h[i], *(w[i] for w in weights)) for i in range(len(h)))
    return jax.vmap(block)(h, *weights)

  def readout(self, h):
    return self.head(jnp.mean(h, axis=1))


def make_network(spec, *, width=32, blocks=4, patch_size=7, parameterization="mupc", rngs):
  return Mixer(spec.image_shape, patch_size, width, blocks, spec.num_classes,
               parameterization=parameterization, rngs=rngs)


KIND = mf.NetworkKind(make=make_network, smoke=dict(width=16, blocks=2), depth_field="blocks")
