"""μPC diagnostics: activity-Hessian conditioning, PC–BP agreement, coordinate
checks and which layers learn. All work on any ``PCNetwork`` (per-layer rows
follow its ``weight_stacks`` where it has one) and plain arrays.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from mupc_flax import pc
from mupc_flax.pc import forward

DENSE_LIMIT = 8192  # activities of one sample up to which the Hessian is formed explicitly


def _activity_hvp(model: pc.Network, x: jax.Array, y: jax.Array, z, loss: pc.Loss):
  """(hvp, flat z): v -> (∂²F/∂z²) v for one sample over all its hidden
  activities, flattened, and the flat z it is taken at (default: the
  feed-forward pass)."""
  if z is None:
    z = pc.feedforward(model, x[None])
  flat, unflatten = ravel_pytree(z)
  energy = lambda activities: pc.energy(model, unflatten(activities), x[None], y[None], loss=loss)
  return (lambda v: jax.jvp(jax.grad(energy), (flat,), (v,))[1]), flat


def activity_hessian(model: pc.Network, x: jax.Array, y: jax.Array, *, z=None,
                     loss: pc.Loss = "mse") -> jax.Array:
  """The Hessian [A, A] of F w.r.t. all A hidden activities of one sample
  (A = H·N for the dense network), in the order of ``ravel_pytree(z)``.

  Args:
    x: [D] one input; y: [C] its target.
    z: the activities to evaluate at, as ``pc.feedforward(model, x[None])`` gives
      them ([H, 1, N] for the dense network); default the feed-forward pass
      (F is quadratic in z for linear networks, so then anywhere is the same).
  Formed column by column from Hessian-vector products (one vmap), which is
  exact; use ``hessian_spectrum`` for the extreme eigenvalues of big models.
  """
  hvp, flat = _activity_hvp(model, x, y, z, loss)
  return jax.vmap(hvp)(jnp.eye(flat.size, dtype=flat.dtype))


def _lanczos_extremes(hvp, size: int, iterations: int, key: jax.Array) -> tuple[float, float]:
  """Extreme Ritz values after ``iterations`` Lanczos steps (full reorthogonalisation)."""
  basis = np.zeros((iterations + 1, size))
  v = np.asarray(jax.random.normal(key, (size,)), np.float64)
  basis[0] = v / np.linalg.norm(v)
  alphas, betas = [], []
  for j in range(iterations):
    w = np.asarray(hvp(jnp.asarray(basis[j], jnp.float32)), np.float64)
    alphas.append(basis[j] @ w)
    w -= basis[:j + 1].T @ (basis[:j + 1] @ w)  # full reorthogonalisation, twice
    w -= basis[:j + 1].T @ (basis[:j + 1] @ w)
    beta = np.linalg.norm(w)
    if beta < 1e-10 or j == iterations - 1:
      break
    betas.append(beta)
    basis[j + 1] = w / beta
  tridiagonal = np.diag(alphas) + np.diag(betas[:len(alphas) - 1], 1) + np.diag(betas[:len(alphas) - 1], -1)
  ritz = np.linalg.eigvalsh(tridiagonal)
  return float(ritz[0]), float(ritz[-1])


def hessian_spectrum(model: pc.Network, x: jax.Array, y: jax.Array, *, z=None,
                     loss: pc.Loss = "mse", method: str = "auto", iterations: int = 200,
                     seed: int = 0) -> dict:
  """Extreme eigenvalues and condition number of the activity Hessian (one sample).

  method: "dense" (explicit A × A matrix + eigvalsh; exact), "lanczos"
  (matrix-free Hessian-vector products; the extreme Ritz values, which
  converge from inside the spectrum) or "auto" (dense up to A = 8192 activities).
  Returns {"min", "max", "condition", "method"}; condition = max / min, inf
  if min ≤ 0 (a Hessian that is not positive definite).
  """
  size = sum(math.prod(a.shape) for a in jax.tree.leaves(jax.eval_shape(lambda x: pc.feedforward(model, x), x[None])))
  if method == "auto":
    method = "dense" if size <= DENSE_LIMIT else "lanczos"
  if method == "dense":
    hessian = nnx.jit(activity_hessian, static_argnames="loss")(model, x, y, z=z, loss=loss)
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
  elif method == "lanczos":
    hvp = jax.jit(_activity_hvp(model, x, y, z, loss)[0])
    low, high = _lanczos_extremes(hvp, size, min(iterations, size), jax.random.PRNGKey(seed))
  else:
    raise ValueError(f"Unknown method {method!r}; choose 'auto', 'dense' or 'lanczos'.")
  return {"min": low, "max": high, "condition": high / low if low > 0 else math.inf, "method": method}


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)])


def cosine(a, b) -> float:
  """Cosine similarity of two pytrees of arrays, flattened, in float64.

  Each vector is normalised before the product, so gradients of any size
  (1e-30 as well as 1e3) give a cosine in [−1, 1]. A zero vector has no
  direction: its cosine with anything is 0.
  """
  a, b = _flat(a), _flat(b)
  norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
  if norm_a == 0 or norm_b == 0:
    return 0.0
  return float(np.clip((a / norm_a) @ (b / norm_b), -1.0, 1.0))


def layer_kernels(model: pc.Network, params) -> list[np.ndarray]:
  """The L weight arrays of ``model``'s params (or of a gradient or update
  shaped like them), bottom to top."""
  return [np.asarray(w) for stack in forward.weight_stacks(model, params) for w in stack]


def reach(layer_cosines, threshold: float = 0.9) -> int:
  """The lowest weight matrix (1 = the bottom one, L = the readout) whose PC
  gradient has a cosine above ``threshold`` with BP's; L + 1 if none has.

  1 means that the inference signal agrees with backprop all the way down.
  """
  above = np.flatnonzero(np.asarray(layer_cosines) > threshold)
  return int(above[0]) + 1 if above.size else len(layer_cosines) + 1


@nnx.jit(static_argnames=("inference", "loss"))
def _pc_and_bp_gradients(model: pc.Network, x, y, inference: pc.Inference, loss: pc.Loss):
  pc_grads, measured = pc.pc_gradients(model, x, y, inference, loss=loss)
  return pc_grads, pc.bp_gradients(model, x, y, loss=loss)[0], measured["inference_steps"]


def pc_bp_agreement(model: pc.Network, x: jax.Array, y: jax.Array, inference: pc.Inference, *,
                    loss: pc.Loss = "mse") -> dict:
  """How the PC weight gradient at the end of inference compares with BP's.

  Returns {"cosine": over all weights, "layer_cosines": [L] per matrix,
  "norm_ratios": [L] ‖PC‖/‖BP‖ per matrix (0 for a zero PC gradient),
  "reach": ``reach`` of the cosines, "inference_steps": the steps inference
  took}. One compiled function per model shape, inference and loss.
  """
  pc_grads, bp_grads, steps = _pc_and_bp_gradients(model, x, y, inference, loss)
  pairs = list(zip(layer_kernels(model, pc_grads), layer_kernels(model, bp_grads)))
  cosines = [cosine(a, b) for a, b in pairs]
  ratios = [float(np.linalg.norm(np.asarray(a, np.float64)) / np.linalg.norm(np.asarray(b, np.float64)))
            for a, b in pairs]
  return {"cosine": cosine(pc_grads, bp_grads), "layer_cosines": cosines, "norm_ratios": ratios,
          "reach": reach(cosines), "inference_steps": int(steps)}


def relative_weight_change(model: pc.Network, initial, current) -> np.ndarray:
  """‖W_ℓ − W_ℓ⁰‖ / ‖W_ℓ⁰‖ for each of the L weight arrays (Frobenius norms)."""
  return np.array([np.linalg.norm(w - w0) / np.linalg.norm(w0) for w0, w in
                   zip(layer_kernels(model, initial), layer_kernels(model, current))])


def layer_norms(model: pc.Network, params) -> jax.Array:
  """Frobenius norm of each of the L weight arrays (e.g. of a gradient or an
  update), bottom to top [L]. Traceable: the train step logs it per update."""
  return jnp.concatenate([jnp.sqrt(jnp.sum(jnp.square(stack), axis=tuple(range(1, stack.ndim))))
                          for stack in forward.weight_stacks(model, params)])


def activity_rms(model: pc.Network, x: jax.Array) -> np.ndarray:
  """RMS of each hidden layer's feed-forward activity [H], plus the output's: [H + 1]."""
  return np.asarray(_activity_rms(model, x))


@nnx.jit  # one compilation: eagerly, each convolution of a new shape compiles on its own
def _activity_rms(model: pc.Network, x: jax.Array) -> jax.Array:
  stages = forward.as_stages(pc.feedforward(model, x))
  rms = [jnp.sqrt(jnp.mean(jnp.square(z), axis=tuple(range(1, z.ndim)))) for z in stages]
  outputs = model.readout(model.phi(stages[-1][-1]))
  return jnp.append(jnp.concatenate(rms), jnp.sqrt(jnp.mean(jnp.square(outputs))))


def coordinate_check(make_model: Callable[..., pc.Network], widths, x: jax.Array, y: jax.Array,
                     *, parameterization: str, steps: int = 3, learning_rate: float = 0.1,
                     inference_lr: float = 0.5, seed: int = 0) -> dict:
  """Per-layer activity RMS after 0 … ``steps`` PC training steps, at each width.

  The muP "coordinate check": under a width-stable parameterisation every
  curve is flat in width. ``make_model(width, parameterization=, rngs=)``
  builds the network at a width (for a convolutional network, its channels),
  e.g. ``lambda width, **kw: mupc_flax.ResidualPCN(784, width, 8, 10, **kw)``.
  T = the network's hidden layers. Returns {width: [steps + 1, H + 1] array}.
  """
  out = {}
  for width in widths:
    model = make_model(width, parameterization=parameterization, rngs=nnx.Rngs(seed))
    inference = pc.Inference(pc.hidden_layers(model), inference_lr)

    @nnx.jit
    def train_step(model, optimizer):
      grads, _ = pc.pc_gradients(model, x, y, inference)
      optimizer.update(model, grads)

    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    rows = [activity_rms(model, x)]
    for _ in range(steps):
      train_step(model, optimizer)
      rows.append(activity_rms(model, x))
    out[width] = np.stack(rows)
  return out
