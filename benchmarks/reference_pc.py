"""Baselines for the step benchmark: the reference implementation's design.

The reference JAX library (jpc) keeps one weight matrix per layer, computes
activity gradients with ``jax.grad`` of an energy written layer by layer, and
either runs each inference step as its own dispatch from a Python loop ("host
loop") or the whole step in one jit ("fully jitted"). These re-implement both
designs (same maths: μPC, batch-mean energy, T plain steps from the
feed-forward start, Adam on ∂F/∂W) so they can be timed in the same run as
mupc_flax. They share no code with the library.
"""

import jax
import jax.numpy as jnp
import optax


def init(key, in_features, width, hidden_layers, out_features):
  """Per-layer N(0, 1) weights and μPC premultipliers, as lists."""
  keys = jax.random.split(key, hidden_layers + 1)
  sizes = [in_features] + [width] * hidden_layers + [out_features]
  weights = [jax.random.normal(k, (i, o)) for k, i, o in zip(keys, sizes[:-1], sizes[1:])]
  num = hidden_layers + 1
  scales = [in_features ** -0.5] + [(width * num) ** -0.5] * (hidden_layers - 1) + [1.0 / width]
  return weights, scales


def _energy(z, weights, scales, x, y):
  e = 0.5 * jnp.sum(jnp.square(z[0] - scales[0] * (x @ weights[0])))
  for l in range(1, len(z)):
    mu = scales[l] * (jax.nn.relu(z[l - 1]) @ weights[l]) + z[l - 1]
    e += 0.5 * jnp.sum(jnp.square(z[l] - mu))
  out = scales[-1] * (jax.nn.relu(z[-1]) @ weights[-1])
  return (e + 0.5 * jnp.sum(jnp.square(y - out))) / x.shape[0]


def _feedforward(weights, scales, x):
  z = [scales[0] * (x @ weights[0])]
  for l in range(1, len(weights) - 1):
    z.append(scales[l] * (jax.nn.relu(z[-1]) @ weights[l]) + z[-1])
  return z


def make_steps(scales, steps: int, lr: float, learning_rate: float):
  """Returns (host_loop_step, jitted_step, tx), each mapping
  (weights, opt_state, x, y) -> (weights, opt_state)."""
  tx = optax.adam(learning_rate)
  activity_grad = jax.grad(_energy)

  def update(weights, opt_state, z, x, y):
    grads = jax.grad(_energy, argnums=1)(z, weights, scales, x, y)
    updates, opt_state = tx.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state

  @jax.jit
  def inference_step(z, weights, x, y):
    return [zl - lr * gl for zl, gl in zip(z, activity_grad(z, weights, scales, x, y))]

  feedforward = jax.jit(lambda weights, x: _feedforward(weights, scales, x))
  update_jit = jax.jit(update)

  def host_loop_step(weights, opt_state, x, y):
    z = feedforward(weights, x)
    for _ in range(steps):
      z = inference_step(z, weights, x, y)
    return update_jit(weights, opt_state, z, x, y)

  @jax.jit
  def jitted_step(weights, opt_state, x, y):
    z = tuple(_feedforward(weights, scales, x))
    body = lambda _, z: tuple(zl - lr * gl for zl, gl in zip(z, activity_grad(z, weights, scales, x, y)))
    z = jax.lax.fori_loop(0, steps, body, z)
    return update(weights, opt_state, z, x, y)

  return host_loop_step, jitted_step, tx
