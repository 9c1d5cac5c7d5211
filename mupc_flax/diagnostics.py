"""μPC diagnostics: activity-Hessian conditioning, PC–BP agreement, coordinate
checks and which layers learn. All work on a ResidualPCN and plain arrays.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mupc_flax import pc
from mupc_flax.model import ResidualPCN

DENSE_LIMIT = 8192  # NH up to which the Hessian is formed explicitly


def _activity_hvp(model: ResidualPCN, x: jax.Array, y: jax.Array, z: jax.Array | None,
                  loss: pc.Loss):
  """(hvp, z): v [H·N] -> (∂²F/∂z²) v for one sample, and the flattened z [H·N]
  it is taken at (given as [H, N], default: the feed-forward pass)."""
  if z is None:
    z = model.feedforward(x[None])[:, 0]
  shape = (model.hidden_layers, 1, model.width)
  energy = lambda activities: pc.energy(model, activities.reshape(shape), x[None], y[None],
                                        loss=loss)
  flat = z.reshape(-1)
  return (lambda v: jax.jvp(jax.grad(energy), (flat,), (v,))[1]), flat


def activity_hessian(model: ResidualPCN, x: jax.Array, y: jax.Array, *, z: jax.Array | None = None,
                     loss: pc.Loss = "mse") -> jax.Array:
  """The Hessian [H·N, H·N] of F w.r.t. all hidden activities of one sample.

  Args:
    x: [D] one input; y: [C] its target.
    z: [H, N] the activities to evaluate at (default: the feed-forward pass;
      F is quadratic in z for linear networks, so then anywhere is the same).
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


def hessian_spectrum(model: ResidualPCN, x: jax.Array, y: jax.Array, *, z: jax.Array | None = None,
                     loss: pc.Loss = "mse", method: str = "auto", iterations: int = 200,
                     seed: int = 0) -> dict:
  """Extreme eigenvalues and condition number of the activity Hessian (one sample).

  method: "dense" (explicit NH × NH matrix + eigvalsh; exact), "lanczos"
  (matrix-free Hessian-vector products; the extreme Ritz values, which
  converge from inside the spectrum) or "auto" (dense up to NH = 8192).
  Returns {"min", "max", "condition", "method"}; condition = max / min, inf
  if min ≤ 0 (a Hessian that is not positive definite).
  """
  size = model.hidden_layers * model.width
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
  return np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(tree)])


def cosine(a, b) -> float:
  """Cosine similarity of two pytrees of arrays, flattened."""
  a, b = _flat(a), _flat(b)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def layer_kernels(params) -> list[np.ndarray]:
  """The L = H + 1 weight matrices of a ResidualPCN's params, bottom to top."""
  params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  unwrap = lambda d: np.asarray(d["kernel"])
  return [unwrap(params["input_layer"])] + list(unwrap(params["hidden"])) + [unwrap(params["readout"])]


def pc_bp_agreement(model: ResidualPCN, x: jax.Array, y: jax.Array, inference: pc.Inference, *,
                    loss: pc.Loss = "mse") -> dict:
  """Cosine between the PC weight gradient at the end of inference and the BP gradient.

  Returns {"cosine": over all weights, "layer_cosines": [L] per matrix}.
  """
  pc_grads, _ = pc.pc_gradients(model, x, y, inference, loss=loss)
  bp_grads, _ = pc.bp_gradients(model, x, y, loss=loss)
  per_layer = [cosine(a, b) for a, b in zip(layer_kernels(pc_grads), layer_kernels(bp_grads))]
  return {"cosine": cosine(pc_grads, bp_grads), "layer_cosines": per_layer}


def relative_weight_change(initial, current) -> np.ndarray:
  """‖W_ℓ − W_ℓ⁰‖ / ‖W_ℓ⁰‖ for each of the L weight matrices (Frobenius norms)."""
  return np.array([np.linalg.norm(w - w0) / np.linalg.norm(w0)
                   for w0, w in zip(layer_kernels(initial), layer_kernels(current))])


def layer_norms(params) -> jax.Array:
  """Frobenius norm of each of the L weight matrices (e.g. of a gradient or an
  update), bottom to top [L]. Traceable: the train step logs it per update."""
  params = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  hidden = jnp.sqrt(jnp.sum(jnp.square(params["hidden"]["kernel"]), axis=(1, 2)))
  return jnp.concatenate([jnp.linalg.norm(params["input_layer"]["kernel"])[None], hidden,
                          jnp.linalg.norm(params["readout"]["kernel"])[None]])


def activity_rms(model: ResidualPCN, x: jax.Array) -> np.ndarray:
  """RMS of each hidden layer's feed-forward activity [H], plus the output's: [H + 1]."""
  z = model.feedforward(x)
  rms = jnp.sqrt(jnp.mean(jnp.square(z), axis=(1, 2)))
  return np.asarray(jnp.append(rms, jnp.sqrt(jnp.mean(jnp.square(model.output(z[-1]))))))


def coordinate_check(widths, hidden_layers: int, x: jax.Array, y: jax.Array, *,
                     parameterization: str, steps: int = 3, learning_rate: float = 0.1,
                     inference_lr: float = 0.5, activation: str = "relu", seed: int = 0) -> dict:
  """Per-layer activity RMS after 0 … ``steps`` PC training steps, at each width.

  The muP "coordinate check": under a width-stable parameterisation every
  curve is flat in width. Returns {width: [steps + 1, H + 1] array}.
  """
  inference = pc.Inference(hidden_layers, inference_lr)

  @nnx.jit
  def train_step(model, optimizer):
    grads, _ = pc.pc_gradients(model, x, y, inference)
    optimizer.update(model, grads)

  out = {}
  for width in widths:
    model = ResidualPCN(x.shape[1], width, hidden_layers, y.shape[1], activation=activation,
                        parameterization=parameterization, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    rows = [activity_rms(model, x)]
    for _ in range(steps):
      train_step(model, optimizer)
      rows.append(activity_rms(model, x))
    out[width] = np.stack(rows)
  return out
