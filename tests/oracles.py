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
