"""Compiled train and eval steps, data-parallel over the ``data`` mesh axis.

Each device runs feed-forward, inference and the energy on its own rows of
the batch (``jax.shard_map``: no communication inside the inference loop).
Energies are normalised by the *global* batch, so the per-sample activity step
is β/B_global on any number of devices, and the sum over devices of the local
weight gradients (one ``psum``) is the global-batch gradient. The optimizer
update then runs on the replicated weights.

A train step takes either form:

- the Flax NNX one, ``metrics = step(model, optimizer, x, y)``: it updates the
  model and the optimizer in place, so it can be called again and again (a
  notebook's loop, run twice, keeps training);
- the functional one, ``model_state, opt_state, metrics = step(model_state,
  opt_state, x, y)`` with the states of ``nnx.state(model)`` and
  ``nnx.state(optimizer)``: it *consumes* (donates) both states, whose arrays
  are deleted, so carry on with the states it returns, and write both back
  (``nnx.update(model, model_state); nnx.update(optimizer, opt_state)``)
  before using the modules again. The training loop uses this form.
"""

from typing import Callable, Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mupc_flax import diagnostics, pc, sharding

Algorithm = Literal["pc", "bp"]


def make_train_step(model: pc.Network, optimizer: nnx.Optimizer,
                    mesh: jax.sharding.Mesh | None = None, *, algorithm: Algorithm = "pc",
                    inference: pc.Inference | None = None, loss: pc.Loss = "mse",
                    split: bool | None = None) -> Callable:
  """Builds the jitted, data-parallel train step for this model and optimizer.

  Args:
    model, optimizer: define the structure (their current values are not used).
    mesh: a 1-D ``data`` mesh; default all devices.
    algorithm: "pc" (inference, then ∂F/∂W) or "bp" (backprop on the loss).
    inference: T, β and schedule; required for "pc".
    loss: the output energy: "mse", "ce" or a ``pc.OutputLoss``.
    split: PC only: compile inference and the weight update as two functions
      (dispatched back to back, no host sync) rather than one. On XLA's CPU
      runtime a compiled loop runs up to 2× slower when work follows it in the
      same program, so None means True on CPU when this process drives one
      device, else False. (Several CPU devices in one process must not
      interleave two programs with collectives: the CPU runtime can deadlock;
      there each step also waits for its result, see ``_must_wait``.)

  Returns:
    ``step``, callable in two forms, with B the global batch:

    - ``step(model, optimizer, x [B, D], y [B, C]) -> metrics``: the NNX
      form; updates ``model`` and ``optimizer`` in place (as ``nnx.jit``'d
      steps do) and can be called again at once.
    - ``step(model_state, opt_state, x, y) -> (model_state, opt_state,
      metrics)``: the functional form. It consumes (donates) ``model_state``
      and ``opt_state``: their arrays, and so the modules they came from, are
      deleted until ``nnx.update(model, model_state)`` and
      ``nnx.update(optimizer, opt_state)`` write the returned states back.

    Metrics are global batch means (see ``pc.pc_inference``) plus
    ``update_norms`` [L], the norm of each weight matrix's change in this
    step. ``step.lower(model_state, opt_state, x, y)`` gives the
    ``jax.stages.Lowered`` of each compiled part (for benchmarks).
  """
  if algorithm == "pc" and inference is None:
    raise ValueError("The PC train step needs inference=Inference(steps=…, lr=…).")
  if algorithm not in get_args(Algorithm):
    raise ValueError(f"Unknown algorithm {algorithm!r}; choose 'pc' or 'bp'.")
  mesh = mesh or sharding.make_mesh()
  if split is None:
    split = jax.default_backend() == "cpu" and len(mesh.local_devices) == 1
  model_def = nnx.graphdef(model)
  opt_def = nnx.graphdef(optimizer)
  data = P(sharding.DATA_AXIS)
  # Pallas (jax 0.10, interpret mode) cannot type a kernel's values as
  # device-varying, so shard_map's check of those types is off around the
  # Pallas inference kernel. Nothing depends on it: the weight gradients are
  # made local and summed by one explicit psum either way.
  check_vma = inference is None or inference.engine.kernel != "pallas"

  def global_batch_size(x):
    return x.shape[0] * jax.lax.axis_size(sharding.DATA_AXIS)

  def build(per_layer: bool):
    """The compiled step and its ``lower``, for inference in this layout."""
    # Per stage: a tuple of per-layer arrays, or one array with the layer axis first.
    hidden = tuple((data,) * layers if per_layer else P(None, sharding.DATA_AXIS)
                   for layers in model.stage_layers)
    result_specs = pc.InferenceResult(hidden, hidden, data)

    def local_inference(model_state, x, y):
      model = nnx.merge(model_def, model_state)
      result, metrics = pc.pc_inference(model, x, y, inference, loss=loss,
                                        batch_size=global_batch_size(x), axis_name=sharding.DATA_AXIS)
      # Metrics are local sums over the global-batch normaliser: add them up
      # (what inference did, inference_*, is the same on every device).
      shared = {k: metrics.pop(k) for k in list(metrics) if k.startswith("inference_")}
      return result, jax.lax.psum(metrics, sharding.DATA_AXIS) | shared

    def local_weight_gradients(model_state, x, result):
      # Marking the weights device-varying makes every gradient a local one
      # (jax.grad then inserts no implicit sum), so one explicit psum serves
      # the closed-form PC gradients and the backprop ones alike.
      model = nnx.merge(model_def, jax.lax.pcast(model_state, sharding.DATA_AXIS, to="varying"))
      grads = pc.pc_weight_gradients(model, x, result, inference.engine)
      return jax.lax.psum(grads, sharding.DATA_AXIS)

    def local_gradients(model_state, x, y):
      if algorithm == "pc":
        result, metrics = local_inference(model_state, x, y)
        return local_weight_gradients(model_state, x, result), metrics
      model = nnx.merge(model_def, jax.lax.pcast(model_state, sharding.DATA_AXIS, to="varying"))
      grads, metrics = pc.bp_gradients(model, x, y, loss=loss, batch_size=global_batch_size(x))
      return jax.lax.psum((grads, metrics), sharding.DATA_AXIS)

    def apply(model_state, opt_state, grads):
      """The optimizer update; also returns the norm of each layer's weight change [L]."""
      model = nnx.merge(model_def, model_state)
      optimizer = nnx.merge(opt_def, opt_state)
      updates = optimizer.update(model, grads)  # what was added to the weights
      return nnx.state(model), nnx.state(optimizer), diagnostics.layer_norms(model, updates)

    replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    if split and algorithm == "pc":
      inference_part = jax.jit(
          jax.shard_map(local_inference, mesh=mesh, in_specs=(P(), data, data),
                        out_specs=(result_specs, P()), check_vma=check_vma),
          in_shardings=(replicated, batch, batch))
      gradients = jax.shard_map(local_weight_gradients, mesh=mesh,
                                in_specs=(P(), data, result_specs), out_specs=P())
      update_part = jax.jit(lambda m, o, x, r: apply(m, o, gradients(m, x, r)),
                            donate_argnums=(0, 1), out_shardings=(replicated, replicated, replicated))

      def step(model_state, opt_state, x, y):
        result, metrics = inference_part(model_state, x, y)
        model_state, opt_state, update_norms = update_part(model_state, opt_state, x, result)
        return model_state, opt_state, metrics | {"update_norms": update_norms}

      def lower(model_state, opt_state, x, y):
        result = jax.eval_shape(inference_part, model_state, x, y)[0]
        return [inference_part.lower(model_state, x, y),
                update_part.lower(model_state, opt_state, x, result)]
    else:
      gradients = jax.shard_map(local_gradients, mesh=mesh, in_specs=(P(), data, data),
                                out_specs=(P(), P()), check_vma=check_vma)

      def whole(model_state, opt_state, x, y):
        grads, metrics = gradients(model_state, x, y)
        model_state, opt_state, update_norms = apply(model_state, opt_state, grads)
        return model_state, opt_state, metrics | {"update_norms": update_norms}

      step = jax.jit(whole, donate_argnums=(0, 1), in_shardings=(replicated, replicated, batch, batch),
                     out_shardings=(replicated, replicated, replicated))

      def lower(*args):
        return [step.lower(*args)]
    return step, lower

  built = {}  # the inference layout depends on the input's shape: one build per shape

  def compiled(x):
    key = (x.shape, x.dtype)
    if key not in built:
      per_layer = algorithm == "pc" and pc.plan(inference.engine, model, x, inference.method).per_layer
      built[key] = build(per_layer)
    return built[key]

  wait = _must_wait(mesh)

  def functional_step(model_state, opt_state, x, y):
    sharding.check_batch_size(x.shape[0], mesh)
    out = compiled(x)[0](model_state, opt_state, x, y)
    return jax.block_until_ready(out) if wait else out

  def train_step(model, optimizer, x, y):
    if not isinstance(model, nnx.Module):
      return functional_step(model, optimizer, x, y)
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError("train_step(model, optimizer, x, y) takes the nnx.Optimizer as its second "
                      f"argument, got {type(optimizer).__name__}.")
    # The modules' own arrays are donated, and replaced at once by the new ones.
    model_state, opt_state, metrics = functional_step(nnx.state(model), nnx.state(optimizer), x, y)
    nnx.update(model, model_state)
    nnx.update(optimizer, opt_state)
    return metrics

  train_step.lower = lambda model_state, opt_state, x, y: compiled(x)[1](model_state, opt_state,
                                                                          x, y)
  return train_step


def _must_wait(mesh: jax.sharding.Mesh) -> bool:
  """Whether a step must wait for its result before returning.

  XLA's in-process CPU collectives (several CPU devices in one process, as in
  the tests and device emulation) intermittently deadlock when executions of
  a program with collectives queue up behind one another: seen with jax
  0.10.2 as "Expected 8 threads to join the rendezvous, but only 7 of them
  arrived". One device per process, and every GPU or TPU, keeps async dispatch.
  """
  return jax.default_backend() == "cpu" and len(mesh.local_devices) > 1


def make_eval_step(model: pc.Network, mesh: jax.sharding.Mesh | None = None, *,
                   loss: pc.Loss = "mse") -> Callable:
  """Builds the jitted, data-parallel eval step (feed-forward prediction).

  Returns ``step(model_state, x [B, D], y [B, C], mask [B]) -> sums`` with
  ``loss`` (summed per-sample loss), ``correct`` and ``count`` summed over the
  rows where mask is 1, so padded rows of a last partial batch do not count.
  """
  mesh = mesh or sharding.make_mesh()
  model_def = nnx.graphdef(model)

  def local_sums(model_state, x, y, mask):
    outputs = pc.predict(nnx.merge(model_def, model_state), x)
    correct = jnp.argmax(outputs, -1) == jnp.argmax(y, -1)
    sums = {"loss": jnp.sum(mask * pc.loss_of(loss)(outputs, y)),
            "correct": jnp.sum(mask * correct), "count": jnp.sum(mask)}
    return jax.lax.psum(sums, sharding.DATA_AXIS)

  data = P(sharding.DATA_AXIS)
  sums = jax.shard_map(local_sums, mesh=mesh, in_specs=(P(), data, data, data), out_specs=P())
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  step = jax.jit(sums, in_shardings=(replicated, batch, batch, batch), out_shardings=replicated)

  wait = _must_wait(mesh)

  def eval_step(model_state, x, y, mask):
    sharding.check_batch_size(x.shape[0], mesh)
    out = step(model_state, x, y, mask)
    return jax.block_until_ready(out) if wait else out

  return eval_step
