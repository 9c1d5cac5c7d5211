"""Compiled train and eval steps, data-parallel over the ``data`` mesh axis.

Each device runs feed-forward, inference and the energy on its own rows of
the batch (``jax.shard_map``: no communication inside the inference loop).
Energies are normalised by the *global* batch, so the per-sample activity step
is β/B_global on any number of devices, and the sum over devices of the local
weight gradients is the global-batch gradient. The optimizer update then runs
on the replicated weights.

A train step maps (model_state, opt_state, x, y) to (model_state, opt_state,
metrics); the states come from ``nnx.state(model)`` and
``nnx.state(optimizer)`` and are donated: write them back with ``nnx.update``.
"""

from typing import Callable, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mupc_flax import pc
from mupc_flax import sharding
from mupc_flax.model import ResidualPCN

Algorithm = Literal["pc", "bp"]


def make_train_step(model: ResidualPCN, optimizer: nnx.Optimizer,
                    mesh: jax.sharding.Mesh | None = None, *, algorithm: Algorithm = "pc",
                    inference: pc.Inference | None = None,
                    loss: pc.Loss = "mse") -> Callable:
  """Builds the jitted, data-parallel train step for this model and optimizer.

  Args:
    model, optimizer: define the structure (their current values are not used).
    mesh: a 1-D ``data`` mesh; default all devices.
    algorithm: "pc" (inference, then ∂F/∂W) or "bp" (backprop on the loss).
    inference: T, β and schedule; required for "pc".
    loss: "mse" or "ce".

  Returns:
    ``step(model_state, opt_state, x [B, D], y [B, C]) -> (model_state,
    opt_state, metrics)`` with B the global batch; metrics are global batch
    means (see ``pc.pc_gradients``).
  """
  if algorithm == "pc" and inference is None:
    raise ValueError("The PC train step needs inference=Inference(steps=…, lr=…).")
  if algorithm not in ("pc", "bp"):
    raise ValueError(f"Unknown algorithm {algorithm!r}; choose 'pc' or 'bp'.")
  mesh = mesh or sharding.make_mesh()
  model_def = nnx.graphdef(model)
  opt_def = nnx.graphdef(optimizer)

  def local_gradients(model_state, x, y):
    # Marking the weights device-varying makes every gradient below a local
    # one (jax.grad then inserts no implicit sum), so one explicit psum
    # serves the closed-form PC gradients and the backprop ones alike.
    model_state = jax.lax.pcast(model_state, sharding.DATA_AXIS, to="varying")
    model = nnx.merge(model_def, model_state)
    global_batch = x.shape[0] * jax.lax.axis_size(sharding.DATA_AXIS)
    if algorithm == "pc":
      grads, metrics = pc.pc_gradients(model, x, y, inference, loss=loss, batch_size=global_batch)
    else:
      grads, metrics = pc.bp_gradients(model, x, y, loss=loss, batch_size=global_batch)
    # Both are local sums over the global-batch normaliser: add them up.
    return jax.lax.psum((grads, metrics), sharding.DATA_AXIS)

  gradients = jax.shard_map(local_gradients, mesh=mesh,
                            in_specs=(P(), P(sharding.DATA_AXIS), P(sharding.DATA_AXIS)),
                            out_specs=(P(), P()))

  replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)

  def _step(model_state, opt_state, x, y):
    grads, metrics = gradients(model_state, x, y)
    model = nnx.merge(model_def, model_state)
    optimizer = nnx.merge(opt_def, opt_state)
    optimizer.update(model, grads)
    return nnx.state(model), nnx.state(optimizer), metrics

  step = jax.jit(_step, donate_argnums=(0, 1),
                 in_shardings=(replicated, replicated, batch, batch),
                 out_shardings=(replicated, replicated, replicated))

  def train_step(model_state, opt_state, x, y):
    sharding.check_batch_size(x.shape[0], mesh)
    return step(model_state, opt_state, x, y)

  train_step.jitted = step  # For ahead-of-time lowering in benchmarks.
  return train_step


def make_eval_step(model: ResidualPCN, mesh: jax.sharding.Mesh | None = None, *,
                   loss: pc.Loss = "mse") -> Callable:
  """Builds the jitted, data-parallel eval step (feed-forward prediction).

  Returns ``step(model_state, x [B, D], y [B, C], mask [B]) -> sums`` with
  ``loss`` (summed per-sample loss), ``correct`` and ``count`` summed over the
  rows where mask is 1, so padded rows of a last partial batch do not count.
  """
  mesh = mesh or sharding.make_mesh()
  model_def = nnx.graphdef(model)

  def local_sums(model_state, x, y, mask):
    outputs = nnx.merge(model_def, model_state)(x)
    correct = jnp.argmax(outputs, -1) == jnp.argmax(y, -1)
    sums = {"loss": jnp.sum(mask * pc.output_losses(outputs, y, loss)),
            "correct": jnp.sum(mask * correct), "count": jnp.sum(mask)}
    return jax.lax.psum(sums, sharding.DATA_AXIS)

  data = P(sharding.DATA_AXIS)
  sums = jax.shard_map(local_sums, mesh=mesh, in_specs=(P(), data, data, data), out_specs=P())
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  step = jax.jit(sums, in_shardings=(replicated, batch, batch, batch), out_shardings=replicated)

  def eval_step(model_state, x, y, mask):
    sharding.check_batch_size(x.shape[0], mesh)
    return step(model_state, x, y, mask)

  return eval_step
