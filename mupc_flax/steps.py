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

from functools import partial
from typing import Callable, Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mupc_flax import diagnostics, pc, sharding

Algorithm = Literal["pc", "bp"]
DATA = P(sharding.DATA_AXIS)


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
  if split is None:  # a loop followed by more work runs slower on one CPU device (see ``split``)
    split = jax.default_backend() == "cpu" and len(mesh.local_devices) == 1
  defs = nnx.graphdef(model), nnx.graphdef(optimizer)
  functional_step = _Dispatch(mesh, partial(_train_program, model, defs, mesh, algorithm, inference,
                                            loss, split and algorithm == "pc"), batch_arg=2)

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

  train_step.lower = functional_step.lower
  return train_step


def make_eval_step(model: pc.Network, mesh: jax.sharding.Mesh | None = None, *,
                   loss: pc.Loss = "mse") -> Callable:
  """Builds the jitted, data-parallel eval step (feed-forward prediction).

  Returns ``step(model_state, x [B, ...], y [B, ..., C], mask [B]) -> sums`` with
  ``loss`` (the per-sample loss, per token where the outputs are [B, T, C]),
  ``correct`` (per-sample accuracy, likewise) and ``count`` summed over the
  rows where mask is 1, so padded rows of a last partial batch do not count.
  """
  mesh = mesh or sharding.make_mesh()
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  sums = jax.jit(jax.shard_map(partial(_local_sums, nnx.graphdef(model), loss), mesh=mesh,
                               in_specs=(P(), DATA, DATA, DATA), out_specs=P()),
                 in_shardings=(replicated, batch, batch, batch), out_shardings=replicated)
  return _Dispatch(mesh, lambda x: _single(sums), batch_arg=1)


class _Dispatch:
  """A step in the functional form: its compiled program for each input shape, called or lowered.

  ``build(x)`` gives the program for inputs shaped like ``x`` [B, ...] (the
  argument at ``batch_arg``): ``run(call, *args)``, which chains the jitted
  parts, each called as ``call(part, *part_args)``.
  """

  def __init__(self, mesh: jax.sharding.Mesh, build: Callable, batch_arg: int):
    self.mesh, self.build, self.batch_arg = mesh, build, batch_arg
    self.wait = _must_wait(mesh)
    self.built = {}

  def program(self, args) -> Callable:
    x = args[self.batch_arg]
    key = (x.shape, x.dtype)
    if key not in self.built:
      self.built[key] = self.build(x)
    return self.built[key]

  def __call__(self, *args):
    sharding.check_batch_size(args[self.batch_arg].shape[0], self.mesh)
    out = self.program(args)(lambda part, *part_args: part(*part_args), *args)
    return jax.block_until_ready(out) if self.wait else out

  def lower(self, *args) -> list[jax.stages.Lowered]:
    """The ``jax.stages.Lowered`` of each compiled part, in the order they run."""
    lowered = []

    def call(part, *part_args):
      lowered.append(part.lower(*part_args))
      return lowered[-1].out_info  # shapes and dtypes for the next part

    self.program(args)(call, *args)
    return lowered


def _must_wait(mesh: jax.sharding.Mesh) -> bool:
  """Whether a step must wait for its result before returning.

  XLA's in-process CPU collectives (several CPU devices in one process, as in
  the tests and device emulation) intermittently deadlock when executions of
  a program with collectives queue up behind one another: seen with jax
  0.10.2 as "Expected 8 threads to join the rendezvous, but only 7 of them
  arrived". One device per process, and every GPU or TPU, keeps async dispatch.
  """
  return jax.default_backend() == "cpu" and len(mesh.local_devices) > 1


def _train_program(model: pc.Network, defs: tuple[nnx.GraphDef, nnx.GraphDef],
                   mesh: jax.sharding.Mesh, algorithm: Algorithm, inference: pc.Inference | None,
                   loss: pc.Loss, split: bool, x: jax.Array) -> Callable:
  """The train step for inputs shaped like ``x`` [B, ...], as ``_Dispatch`` runs it: one jitted
  part or, with ``split``, inference and then the weight update. Both donate the states."""
  # The inference layout depends on the input's shape.
  per_layer = algorithm == "pc" and pc.plan(inference.engine, model, x, inference.method).per_layer
  model_def, opt_def = defs
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  update = partial(_apply_update, model_def, opt_def)
  # Pallas (jax 0.10, interpret mode) cannot type a kernel's values as
  # device-varying, so shard_map's check of those types is off around the
  # Pallas inference kernel. Nothing depends on it: the weight gradients are
  # made local and summed by one explicit psum either way.
  check_vma = inference is None or inference.engine.kernel != "pallas"
  if not split:
    local = (partial(_local_pc_gradients, model_def, inference, loss) if algorithm == "pc"
             else partial(_local_bp_gradients, model_def, loss))
    gradients = jax.shard_map(local, mesh=mesh, in_specs=(P(), DATA, DATA), out_specs=(P(), P()),
                              check_vma=check_vma)
    whole = jax.jit(lambda m, o, x, y: update(m, o, *gradients(m, x, y)), donate_argnums=(0, 1),
                    in_shardings=(replicated, replicated, batch, batch),
                    out_shardings=(replicated, replicated, replicated))
    return _single(whole)
  # Per stage: a tuple of per-layer arrays, or one array with the layer axis first.
  hidden = tuple((DATA,) * layers if per_layer else P(None, sharding.DATA_AXIS)
                 for layers in model.stage_layers)
  result_specs = pc.InferenceResult(hidden, hidden, DATA)
  inference_part = jax.jit(
      jax.shard_map(partial(_local_inference, model_def, inference, loss), mesh=mesh,
                    in_specs=(P(), DATA, DATA), out_specs=(result_specs, P()), check_vma=check_vma),
      in_shardings=(replicated, batch, batch))
  gradients = jax.shard_map(partial(_local_weight_gradients, model_def, inference.engine),
                            mesh=mesh, in_specs=(P(), DATA, result_specs), out_specs=P())
  update_part = jax.jit(lambda m, o, x, r: update(m, o, gradients(m, x, r), {}),
                        donate_argnums=(0, 1), out_shardings=(replicated, replicated, replicated))

  def run(call, model_state, opt_state, x, y):
    result, metrics = call(inference_part, model_state, x, y)
    model_state, opt_state, update_norms = call(update_part, model_state, opt_state, x, result)
    return model_state, opt_state, metrics | update_norms
  return run


def _single(part: Callable) -> Callable:
  """The program of a step compiled as one part."""
  return lambda call, *args: call(part, *args)


def _global_batch_size(x: jax.Array) -> int:
  return x.shape[0] * jax.lax.axis_size(sharding.DATA_AXIS)


def _local_inference(model_def, inference, loss, model_state, x, y):
  """Inference on this device's rows x [b, D], y [b, C]: the local ``pc.InferenceResult``
  and the global metrics."""
  model = nnx.merge(model_def, model_state)
  result, metrics = pc.pc_inference(model, x, y, inference, loss=loss,
                                    batch_size=_global_batch_size(x), axis_name=sharding.DATA_AXIS)
  # Metrics are local sums over the global-batch normaliser: add them up
  # (what inference did, inference_*, is the same on every device).
  shared = {k: metrics.pop(k) for k in list(metrics) if k.startswith("inference_")}
  return result, jax.lax.psum(metrics, sharding.DATA_AXIS) | shared


def _local_weight_gradients(model_def, engine, model_state, x, result):
  """∂F/∂W at the end of this device's inference, summed over devices."""
  # Marking the weights device-varying makes every gradient a local one
  # (jax.grad then inserts no implicit sum), so one explicit psum serves
  # the closed-form PC gradients and the backprop ones alike.
  model = nnx.merge(model_def, jax.lax.pcast(model_state, sharding.DATA_AXIS, to="varying"))
  return jax.lax.psum(pc.pc_weight_gradients(model, x, result, engine), sharding.DATA_AXIS)


def _local_pc_gradients(model_def, inference, loss, model_state, x, y):
  """Inference, then ∂F/∂W, on this device's rows: the gradients and metrics, summed."""
  result, metrics = _local_inference(model_def, inference, loss, model_state, x, y)
  return _local_weight_gradients(model_def, inference.engine, model_state, x, result), metrics


def _local_bp_gradients(model_def, loss, model_state, x, y):
  """Backprop's gradients and metrics on this device's rows, summed over devices."""
  model = nnx.merge(model_def, jax.lax.pcast(model_state, sharding.DATA_AXIS, to="varying"))
  grads, metrics = pc.bp_gradients(model, x, y, loss=loss, batch_size=_global_batch_size(x))
  return jax.lax.psum((grads, metrics), sharding.DATA_AXIS)


def _apply_update(model_def, opt_def, model_state, opt_state, grads, metrics):
  """The optimizer update: the new states, and ``metrics`` plus ``update_norms``, the norm of
  each layer's weight change [L]."""
  model = nnx.merge(model_def, model_state)
  optimizer = nnx.merge(opt_def, opt_state)
  updates = optimizer.update(model, grads)  # what was added to the weights
  return (nnx.state(model), nnx.state(optimizer),
          metrics | {"update_norms": diagnostics.layer_norms(model, updates)})


def _local_sums(model_def, loss, model_state, x, y, mask):
  """The eval sums over this device's unmasked rows, summed over devices."""
  outputs = pc.predict(nnx.merge(model_def, model_state), x)
  sums = {"loss": jnp.sum(mask * pc.loss_of(loss).per_token(outputs, y)),
          "correct": jnp.sum(mask * pc.sample_accuracies(outputs, y)), "count": jnp.sum(mask)}
  return jax.lax.psum(sums, sharding.DATA_AXIS)
