"""Independent references for the tests: plain NumPy (float64) and plain JAX.

They take the network as per-layer lists of matrices and premultipliers
(``unstack``) and share no code with mupc_flax beyond reading its weights.
"""

import jax
import jax.numpy as jnp
import numpy as np

NUMPY_ACTIVATIONS = {
    "linear": lambda v: v,
    "relu": lambda v: np.maximum(v, 0.0),
    "tanh": np.tanh,
}
JAX_ACTIVATIONS = {"linear": lambda v: v, "relu": lambda v: jnp.maximum(v, 0.0), "tanh": jnp.tanh}


def unstack(model):
  """([W_1 … W_L] as [in, out] matrices, [a_1 … a_L]) as float64 NumPy."""
  hidden = np.asarray(model.hidden.kernel[...], np.float64)
  weights = ([np.asarray(model.input_layer.kernel[...], np.float64)] + list(hidden)
             + [np.asarray(model.readout.kernel[...], np.float64)])
  multipliers = ([float(model.input_layer.multiplier[...])]
                 + [float(a) for a in np.asarray(model.hidden.multiplier[...])]
                 + [float(model.readout.multiplier[...])])
  return weights, multipliers


def numpy_layer_energies(weights, multipliers, z, x, y, activation, loss):
  """Per-layer batch-mean energies [H + 1], written out layer by layer."""
  act = NUMPY_ACTIVATIONS[activation]
  z = [np.asarray(v, np.float64) for v in z]
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  batch = x.shape[0]
  energies = []
  for layer in range(len(z)):
    if layer == 0:
      mu = multipliers[0] * (x @ weights[0])
    else:
      mu = multipliers[layer] * (act(z[layer - 1]) @ weights[layer]) + z[layer - 1]
    energies.append(0.5 * np.sum((z[layer] - mu) ** 2) / batch)
  out = multipliers[-1] * (act(z[-1]) @ weights[-1])
  if loss == "mse":
    energies.append(0.5 * np.sum((y - out) ** 2) / batch)
  else:
    shifted = out - out.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    energies.append(-np.sum(y * log_softmax) / batch)
  return np.array(energies)


def jax_energy(weights, multipliers, z, x, y, activation, loss):
  """The energy as plain JAX over lists (differentiable in weights and z)."""
  act = JAX_ACTIVATIONS[activation]
  total = 0.5 * jnp.sum((z[0] - multipliers[0] * (x @ weights[0])) ** 2)
  for layer in range(1, len(z)):
    mu = multipliers[layer] * (act(z[layer - 1]) @ weights[layer]) + z[layer - 1]
    total += 0.5 * jnp.sum((z[layer] - mu) ** 2)
  out = multipliers[-1] * (act(z[-1]) @ weights[-1])
  if loss == "mse":
    total += 0.5 * jnp.sum((y - out) ** 2)
  else:
    total += -jnp.sum(y * jax.nn.log_softmax(out, axis=1))
  return total / x.shape[0]


def jax_feedforward(weights, multipliers, x, activation):
  act = JAX_ACTIVATIONS[activation]
  z = [multipliers[0] * (x @ weights[0])]
  for layer in range(1, len(weights) - 1):
    z.append(multipliers[layer] * (act(z[-1]) @ weights[layer]) + z[-1])
  return z


def jax_pc_gradients(weights, multipliers, x, y, activation, loss, steps, lr, momentum=0.0,
                     nesterov=False):
  """The recipe step by step in float64: FF start, T steps on z, ∂F/∂W.

  The steps are gradient descent (the paper), or with ``momentum`` μ heavy
  ball (v ← μv + g, z ← z − lr·v) or, with ``nesterov``, z ← z − lr·(g + μv).
  """
  with jax.enable_x64(True):
    weights = [jnp.asarray(w, jnp.float64) for w in weights]
    x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
    z = jax_feedforward(weights, multipliers, x, activation)
    v = [jnp.zeros_like(zl) for zl in z]
    grad_z = jax.grad(jax_energy, argnums=2)
    for _ in range(steps):
      g = grad_z(weights, multipliers, z, x, y, activation, loss)
      v = [momentum * vl + gl for vl, gl in zip(v, g)]
      step = [gl + momentum * vl for gl, vl in zip(g, v)] if nesterov else v
      z = [zl - lr * sl for zl, sl in zip(z, step)]
    grads = jax.grad(jax_energy)(weights, multipliers, z, x, y, activation, loss)
    return [np.asarray(g) for g in grads], [np.asarray(v) for v in z]


def jax_grads64(fn, argnums, *args):
  """``jax.grad(fn, argnums)(*args)`` in float64, as NumPy."""
  with jax.enable_x64(True):
    args = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if hasattr(a, "dtype") else a, args)
    return jax.tree.map(np.asarray, jax.grad(fn, argnums=argnums)(*args))


def random_batch(seed, batch, in_features, classes):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, in_features)).astype(np.float32)
  y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, batch)]
  return x, y


# --- The convolutional network, layer by layer ---------------------------------------


def unstack_conv(model):
  """The network as a bottom-to-top list of layers, each (kernel [k, k, in, out],
  multiplier, stride, residual?) in float64, and the readout (kernel [C, out],
  multiplier)."""
  layers = []
  for entry, stack in zip(model.entries, model.stacks):
    layers.append((np.asarray(entry.kernel[...], np.float64), float(entry.multiplier[...]),
                   entry.stride, False))
    for kernel, a in zip(np.asarray(stack.kernel[...], np.float64), np.asarray(stack.multiplier[...])):
      layers.append((kernel, float(a), 1, True))
  readout = (np.asarray(model.head.kernel[...], np.float64), float(model.head.multiplier[...]))
  return layers, readout


def _conv(h, kernel, stride):
  return jax.lax.conv_general_dilated(h, kernel, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def jax_conv_energy(kernels, readout_kernel, layers, readout_multiplier, z, images, y, activation, loss):
  """The convolutional energy as plain JAX over per-layer lists: ``kernels``
  and activities ``z`` [B, H, W, C] per layer, differentiable in both;
  ``layers`` gives each layer's (multiplier, stride, residual?)."""
  act = JAX_ACTIVATIONS[activation]
  total = 0.0
  for layer, (kernel, (a, stride, residual)) in enumerate(zip(kernels, layers)):
    below = images if layer == 0 else act(z[layer - 1])
    mu = a * _conv(below, kernel, stride) + (z[layer - 1] if residual else 0.0)
    total += 0.5 * jnp.sum((z[layer] - mu) ** 2)
  out = readout_multiplier * (jnp.mean(act(z[-1]), axis=(1, 2)) @ readout_kernel)
  if loss == "mse":
    total += 0.5 * jnp.sum((y - out) ** 2)
  else:
    total += -jnp.sum(y * jax.nn.log_softmax(out, axis=1))
  return total / images.shape[0]


# --- The transformer, written out per layer ----------------------------------------


def unstack_transformer(model):
  """The transformer's weights as plain float64 arrays: a dict with the
  embedding (kernel, a), per block (qkv, a_i, out, a_o) and (up, a_i, down,
  a_o), the head (kernel, a), the logit scale, heads, patch size, image
  shape, activation, PC layer (sublayer | block) and whether layer norms are on."""
  f = lambda v: np.asarray(v[...], np.float64)
  blocks = []
  for r in range(model.blocks):
    blocks.append(((f(model.attention_qkv.kernel)[r], f(model.attention_qkv.multiplier)[r],
                    f(model.attention_out.kernel)[r], f(model.attention_out.multiplier)[r]),
                   (f(model.mlp_up.kernel)[r], f(model.mlp_up.multiplier)[r],
                    f(model.mlp_down.kernel)[r], f(model.mlp_down.multiplier)[r])))
  return {"embed": (f(model.embed.kernel), float(f(model.embed.multiplier))), "blocks": blocks,
          "head": (f(model.head.kernel), float(f(model.head.multiplier))),
          "scale": float(f(model.logit_scale)), "heads": model.heads, "patch": model.patch_size,
          "image": model.image_shape, "activation": model.activation,
          "pc_layer": model.pc_layer, "layer_norm": model.layer_norm}


def _normalise(v):
  mu = v.mean(-1, keepdims=True)
  return (v - mu) / jnp.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-6)


def _attention(z, qkv, a_in, out, a_out, scale, heads, norm):
  """Multi-head attention, one head at a time."""
  n = norm(z)
  width = z.shape[-1]
  size = width // heads
  q, k, v = (a_in * (n @ qkv[:, i * width:(i + 1) * width]) for i in range(3))
  mixed = []
  for h in range(heads):
    cols = slice(h * size, (h + 1) * size)
    logits = scale * jnp.einsum("bqc,bkc->bqk", q[..., cols], k[..., cols])
    weights = jnp.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    mixed.append(jnp.einsum("bqk,bkc->bqc", weights, v[..., cols]))
  return a_out * (jnp.concatenate(mixed, -1) @ out)


def transformer_inputs(net, x):
  """[B, H·W·C] -> patches in row-major patch order with one-hot positions."""
  h, w, c = net["image"]
  p = net["patch"]
  images = x.reshape(x.shape[0], h, w, c)
  rows = [images[:, i:i + p, j:j + p, :].reshape(x.shape[0], -1)
          for i in range(0, h, p) for j in range(0, w, p)]
  patches = jnp.stack(rows, axis=1)
  return jnp.concatenate([patches, jnp.broadcast_to(jnp.eye(len(rows)), (x.shape[0], len(rows),
                                                                           len(rows)))], -1)


def _norm(net):
  return _normalise if net["layer_norm"] else (lambda v: v)


def transformer_branches(net):
  """The residual branches bottom to top, each z -> G(z): 2R (attention and
  MLP alternating), or R (a block: attention, then the MLP on z + its output)."""
  act = {"gelu": jax.nn.gelu, "relu": lambda v: jnp.maximum(v, 0.0), "tanh": jnp.tanh}[net["activation"]]
  norm = _norm(net)
  out = []
  for attention, (up, a_in, down, a_out) in net["blocks"]:
    attend = lambda z, w=attention: _attention(z, *w, net["scale"], net["heads"], norm)
    mlp = lambda z, up=up, a_in=a_in, down=down, a_out=a_out: a_out * (act(a_in * (norm(z) @ up)) @ down)
    if net["pc_layer"] == "sublayer":
      out += [attend, mlp]
    else:
      out.append(lambda z, attend=attend, mlp=mlp: attend(z) + mlp(z + attend(z)))
  return out


def jax_transformer_energy(net, z, x, y):
  """The transformer's MSE energy, batch mean, with activities z: a list of [B, T, d]."""
  kernel, a = net["embed"]
  total = 0.5 * jnp.sum((z[0] - a * (transformer_inputs(net, x) @ kernel)) ** 2)
  for layer, branch in enumerate(transformer_branches(net), start=1):
    total += 0.5 * jnp.sum((z[layer] - z[layer - 1] - branch(z[layer - 1])) ** 2)
  head, a_head = net["head"]
  out = a_head * (_norm(net)(z[-1]).mean(1) @ head)
  return (total + 0.5 * jnp.sum((y - out) ** 2)) / x.shape[0]
