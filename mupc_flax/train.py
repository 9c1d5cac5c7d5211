"""The training program: ``train_and_evaluate(config, workdir)``.

It prepares the dataset if needed, builds the mesh, model, optimizer and
pipelines, resumes from the newest checkpoint in ``workdir``, trains with the
PC (or BP) step, evaluates on the whole test split, logs (process 0 only) to
the console, ``metrics.jsonl`` and TensorBoard, and checkpoints every N steps,
at the end and on SIGTERM or Ctrl-C.
"""

import contextlib
import fcntl
import inspect
import json
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from mupc_flax import checkpointing, data, diagnostics, metrics, pc, sharding, steps
from mupc_flax.errors import UserError, check_writable_dir
from mupc_flax.networks import kinds


class TrainingError(UserError):
  """The run cannot start or go on; the message says why and what to do."""


_CHOICES = {
    "data.name": data.DATASETS,
    "engine.layout": get_args(pc.options.Layout),
    "engine.kernel": get_args(pc.options.Kernel),
    "train.algorithm": get_args(steps.Algorithm),
    "train.loss": tuple(pc.LOSSES),
    "train.schedule": get_args(pc.Schedule),
    "train.inference_method": get_args(pc.inference.Method),
    "train.inference_optimizer": get_args(pc.Optimizer),
    "train.lr_schedule": ("constant", "cosine"),
    "train.optimizer_scaling": ("none", "per_role"),
}
_POSITIVE = ("train.batch_size", "train.num_epochs", "train.output_precision",
             "train.learning_rate", "train.phases", "train.steps_per_layer", "log_every_steps",
             "eval_batch_size",
             "keep_checkpoints", "checkpoint_every_steps")
_NON_NEGATIVE = ("train.num_steps", "train.inference_steps", "train.inference_lr",
                 "train.inference_momentum", "train.inference_tolerance",
                 "train.inference_step_guard", "train.optimizer_eps", "train.weight_decay",
                 "train.warmup_steps", "eval_every_steps",
                 "data.prefetch")


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def validate_config(config, num_devices: int, num_processes: int) -> None:
  """Raises TrainingError with one clear message for the first bad field."""
  for field, choices in _CHOICES.items():
    if _get(config, field) not in choices:
      raise TrainingError(f"config.{field} = {_get(config, field)!r} is not one of {list(choices)}.")
  for field in _POSITIVE:
    if not _get(config, field) > 0:
      raise TrainingError(f"config.{field} must be positive, got {_get(config, field)!r}.")
  for field in _NON_NEGATIVE:
    if not _get(config, field) >= 0:
      raise TrainingError(f"config.{field} must be non-negative, got {_get(config, field)!r}.")
  if not callable(getattr(optax, config.train.optimizer, None)):
    raise TrainingError(f"config.train.optimizer = {config.train.optimizer!r} is not an optax "
                        "optimizer (e.g. adam, sgd, adamw).")
  if config.train.optimizer_eps and optimizer_argument(config.train.optimizer, "eps") is None:
    raise TrainingError(f"config.train.optimizer_eps: optax.{config.train.optimizer} takes no "
                        "eps; set it to 0 or choose an optimizer that does (e.g. adam).")
  if config.train.weight_decay and optimizer_argument(config.train.optimizer, "weight_decay") is None:
    raise TrainingError(f"config.train.weight_decay: optax.{config.train.optimizer} takes no "
                        "weight_decay; set it to 0 or choose an optimizer that does (e.g. adamw).")
  for field in ("train.inference_momentum", "train.inference_tolerance"):
    if not _get(config, field) < 1:
      raise TrainingError(f"config.{field} must be below 1, got {_get(config, field)!r}.")
  try:
    kinds.check_fields(config.model)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  if config.train.inference_momentum and config.train.inference_optimizer == "gd":
    raise TrainingError("config.train.inference_momentum needs train.inference_optimizer = "
                        "'momentum' or 'nesterov'.")
  if config.engine.kernel == "pallas" and (config.train.inference_optimizer != "gd"
                                           or config.train.inference_tolerance
                                           or config.train.inference_step_guard
                                           or config.train.inference_method != "states"):
    raise TrainingError("config.engine.kernel = 'pallas' runs plain gradient descent on the "
                        "states for a fixed number of steps: set train.inference_optimizer = "
                        "'gd', train.inference_tolerance = 0, train.inference_step_guard = 0 and "
                        "train.inference_method = 'states', or use engine.kernel = 'xla'.")
  if config.engine.kernel == "pallas" and config.engine.layout == "per_layer":
    raise TrainingError("config.engine.kernel = 'pallas' needs engine.layout = 'stacked' or "
                        "'auto'.")
  # The network's own refusals, from shapes alone (no weights drawn, no data read).
  nnx.eval_shape(lambda: build_model(config, data.SPECS[config.data.name]))
  if config.data.augment and config.data.name != "cifar10":
    raise TrainingError("config.data.augment is the CIFAR-10 augmentation; set it only for cifar10.")
  for field in ("train.batch_size", "eval_batch_size"):
    size = _get(config, field)
    if size % num_devices or size % num_processes:
      raise TrainingError(
          f"config.{field} = {size} must be divisible by the number of devices ({num_devices}) "
          f"and of processes ({num_processes}); use a multiple of {np.lcm(num_devices, num_processes)}.")


@contextlib.contextmanager
def _preemption_notice(checkpointer: checkpointing.Checkpointer):
  """Yields ``preempted(step)``: whether the loop must save and stop after ``step``.

  A single process sets a flag from its own handler of SIGTERM and SIGINT
  (Ctrl-C), so both save the current step and stop cleanly; a second Ctrl-C
  raises KeyboardInterrupt at once, without saving. ``preempted.signal``
  names the signal that came ("SIGTERM" or "SIGINT"), else None.

  In a multi-process run every process must stop at the same step: JAX's
  preemption service caught SIGTERM in C++ when the run was joined, and makes
  the processes agree on a step, which Orbax's ``reached_preemption`` reads.
  A Python handler would replace that C++ one, so none is installed then
  (and Ctrl-C interrupts such a run without saving).
  """
  if jax.process_count() > 1:
    if callable(signal.getsignal(signal.SIGTERM)):
      logging.warning("A Python SIGTERM handler (%s) replaced JAX's preemption notice: a SIGTERM "
                      "will not stop this multi-process run at an agreed step.",
                      signal.getsignal(signal.SIGTERM))
    agreed = lambda step: checkpointer.reached_preemption(step)
    agreed.signal = "SIGTERM"
    yield agreed
    return
  flag = threading.Event()

  def preempted(step: int) -> bool:
    return flag.is_set()

  preempted.signal = None
  if threading.current_thread() is not threading.main_thread():
    yield preempted
    return

  def on_signal(signum, frame):
    if signum == signal.SIGINT and preempted.signal == "SIGINT":
      raise KeyboardInterrupt  # the second Ctrl-C: the user will not wait for the save
    preempted.signal = preempted.signal or signal.Signals(signum).name
    flag.set()
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: saving after this step, then stopping. Press Ctrl-C again to stop "
                      "at once, without saving.")

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield preempted
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _summarise(window: list[dict]) -> dict:
  """Means over the steps of a log interval; per-layer energies stay a vector."""
  return {key: np.mean([m[key] for m in window], axis=0) for key in window[0]}


def _check_finite(window: list[dict], first_step: int, kept_step: int | None) -> None:
  """Raises TrainingError at the first step of ``window`` whose loss or energy
  is not finite; ``kept_step`` is the newest checkpoint (None if there is none)."""
  for offset, m in enumerate(window):
    bad = [k for k in ("loss", "energy") if k in m and not np.all(np.isfinite(m[k]))]
    if bad:
      kept = ("No checkpoint was saved" if kept_step is None
              else f"The last good checkpoint, step {kept_step}, is kept")
      raise TrainingError(
          f"Non-finite {' and '.join(bad)} at step {first_step + offset + 1}: training diverged. "
          f"{kept}; lower train.learning_rate or train.inference_lr.")


def build_model(config, spec: data.pipeline.DatasetSpec) -> pc.Network:
  """The network ``config.model`` describes, for inputs and classes of ``spec``.

  A value or shape the network cannot take (e.g. patches that do not tile
  the images), or an engine choice that does not fit it, raises
  TrainingError naming it.
  """
  def build():
    try:
      model = kinds.build(config.model, spec, config.seed)
    except (ValueError, TypeError) as e:
      raise TrainingError(f"config.model ({config.model.kind}) cannot be built for "
                          f"{config.data.name} ({'×'.join(map(str, spec.image_shape))} images): "
                          f"{e}") from None
    try:
      pc.plan(engine_of(config), model, jnp.zeros((1, spec.input_size)))
    except ValueError as e:
      raise TrainingError(f"config.engine does not fit config.model ({config.model.kind}): "
                          f"{e}") from None
    return model

  return build()


def engine_of(config) -> pc.Engine:
  """The engine's choices ``config.engine`` describes."""
  return pc.Engine(layout=config.engine.layout, kernel=config.engine.kernel)


def optimizer_argument(name: str, argument: str):
  """The default of optax.``name``'s ``argument``, or None if it takes none."""
  parameter = inspect.signature(getattr(optax, name)).parameters.get(argument)
  return None if parameter is None else parameter.default


def weight_optimizer(config, num_steps: int, params=None) -> optax.GradientTransformation:
  """The weights' optax optimizer ``config.train`` describes.

  ``optimizer`` at ``learning_rate`` η: raised linearly from 0 over
  ``warmup_steps``, then constant or decayed to 0 at ``num_steps`` (cosine);
  ``optimizer_eps`` as its ε where that is set, ``weight_decay`` λ as its
  (decoupled) weight decay. Under ``optimizer_scaling = "per_role"`` each
  weight of ``params`` (``nnx.state(model, nnx.Param)``) gets η times its
  ``lr_scale`` and ε times its ``eps_scale`` (the metadata
  ``Parameterization.layer_options`` gives it), and λ / ``lr_scale``, so
  that every weight decays by the same fraction η·λ per step.
  """
  train = config.train
  eta = train.learning_rate
  if train.warmup_steps >= num_steps:
    raise TrainingError(f"config.train.warmup_steps = {train.warmup_steps} must be below the run's "
                        f"{num_steps} steps.")
  if train.lr_schedule == "cosine":  # from η down to 0 at the last step
    schedule = optax.warmup_cosine_decay_schedule(0.0, eta, train.warmup_steps, num_steps)
  elif train.warmup_steps:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, eta, train.warmup_steps),
                                     optax.constant_schedule(eta)], [train.warmup_steps])
  else:
    schedule = eta
  default_eps = optimizer_argument(train.optimizer, "eps")

  def optimizer(lr_scale: float = 1.0, eps_scale: float = 1.0) -> optax.GradientTransformation:
    kwargs = {}
    if default_eps is not None and (train.optimizer_eps or eps_scale != 1.0):
      kwargs["eps"] = (train.optimizer_eps or default_eps) * eps_scale
    if train.weight_decay:
      kwargs["weight_decay"] = train.weight_decay / lr_scale
    lr = (lambda step: lr_scale * schedule(step)) if callable(schedule) else lr_scale * schedule
    return getattr(optax, train.optimizer)(lr, **kwargs)

  if train.optimizer_scaling == "none":
    return optimizer()
  if params is None:
    raise ValueError("weight_optimizer needs the weights (params) for optimizer_scaling = "
                     "'per_role'.")

  def scale_of(variable) -> tuple[float, float]:
    metadata = variable.get_metadata()
    if "lr_scale" not in metadata:
      raise TrainingError("config.train.optimizer_scaling = 'per_role' needs every weight's "
                          "optimizer scale: build the network's layers with "
                          "Parameterization.layer_options (or nnx.Param metadata lr_scale, "
                          "eps_scale), or set optimizer_scaling = 'none'.")
    return metadata["lr_scale"], metadata["eps_scale"]

  is_variable = lambda x: isinstance(x, nnx.Variable)
  scales = {scale_of(v) for v in jax.tree.leaves(params, is_leaf=is_variable)}
  label = {scale: f"lr×{scale[0]:.6g},eps×{scale[1]:.6g}" for scale in sorted(scales)}
  labels = jax.tree.map(lambda v: label[scale_of(v)], params, is_leaf=is_variable)
  return optax.multi_transform({label[scale]: optimizer(*scale) for scale in label}, labels)


def inference_of(config, model: pc.Network) -> pc.Inference:
  """The inference ``config.train`` describes, for ``model``'s depth."""
  train = config.train
  method = train.inference_method
  return pc.Inference(steps=train.inference_steps or train.steps_per_layer * pc.hidden_layers(model),
                      lr=train.inference_lr,
                      # The errors have no wavefront: every layer moves at every step.
                      schedule=train.schedule if method == "states" else "plain",
                      phases=train.phases, optimizer=train.inference_optimizer,
                      momentum=train.inference_momentum, tolerance=train.inference_tolerance,
                      engine=engine_of(config), method=method,
                      step_guard=train.inference_step_guard,
                      output_precision=train.output_precision)


def evaluate(eval_step, model_state, split: data.Split, mesh, batch_size: int) -> dict:
  """Loss and accuracy of the feed-forward prediction over the whole split."""
  total = None
  for batch in data.eval_batches(split, global_batch_size=batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count()):
    x, y, mask = sharding.global_batch((batch["x"], batch["y"], batch["mask"]), mesh)
    sums = eval_step(model_state, x, y, mask)
    total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
  total = jax.device_get(total)
  return {"loss": total["loss"] / total["count"], "accuracy": total["correct"] / total["count"],
          "examples": total["count"]}


def _layer_diagnostics(config, model: pc.Network, model_state, initial_params,
                       split: data.Split) -> dict:
  """Which layers learn (‖W − W⁰‖/‖W⁰‖ per matrix); for PC, if
  ``config.log_gradient_agreement``, the per-matrix cosine of the PC gradient
  with BP's and its reach on a fixed batch (the first training batch size of
  the test split); if ``config.log_hessian``, the activity Hessian's spectrum
  for the first test example."""
  current = jax.device_get(model_state)
  network = nnx.merge(nnx.graphdef(model), current)
  out = {"weight_change": diagnostics.relative_weight_change(model, initial_params, current)}
  if config.log_gradient_agreement and config.train.algorithm == "pc":
    rows = np.arange(min(config.train.batch_size, len(split)))
    batch = data.pipeline.preprocess(*split.read(rows), split.spec)
    agreement = diagnostics.pc_bp_agreement(network, batch["x"], batch["y"],
                                            inference_of(config, model), loss=config.train.loss)
    out |= {"pc_bp_cosines": agreement["layer_cosines"], "reach": agreement["reach"]}
  if config.log_hessian:
    example = data.pipeline.preprocess(*split.read(np.array([0])), split.spec)
    spectrum = diagnostics.hessian_spectrum(network, example["x"][0], example["y"][0],
                                            loss=config.train.loss)
    out |= {"hessian_condition": spectrum["condition"], "hessian_min": spectrum["min"],
            "hessian_max": spectrum["max"]}
  return out


def load_splits(config) -> tuple[data.Split, data.Split]:
  """The (train, test) splits of ``config.data``, prepared on first use
  (atomically, so concurrent processes are safe)."""
  data_dir = config.data.data_dir or data.default_data_dir()
  data.prepare(config.data.name, data_dir, manual_dir=config.data.manual_dir or None,
               url=config.data.download_url or None)
  return tuple(data.Split(config.data.name, split, data_dir, in_memory=config.data.in_memory)
               for split in ("train", "test"))


@contextlib.contextmanager
def _exclusive(workdir: pathlib.Path):
  """Holds a lock on ``workdir`` for the run (process 0 takes it for all), so
  that a second run started on the same workdir stops at once instead of
  interleaving its checkpoints and metrics with this one's."""
  with open(workdir / ".lock", "w") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise TrainingError(f"Another run is using the workdir {workdir}; wait for it to end, or "
                          "use another --workdir.") from None
    except OSError as e:  # some network filesystems have no locks
      logging.warning("Cannot lock the workdir %s (%s); make sure no other run uses it.",
                      workdir, e.strerror)
    yield


def _flatten(tree: dict, prefix: str = "") -> dict:
  """A nested dict as {"a.b": leaf}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out |= _flatten(value, f"{prefix}{key}.")
    else:
      out[prefix + key] = value
  return out


def _config_records(workdir: pathlib.Path) -> dict[int, pathlib.Path]:
  """The config records of a workdir by the step they start at: config.json
  (step 0) and the config.<step>.json of resumes that changed the config."""
  records = {0: workdir / "config.json"} if (workdir / "config.json").exists() else {}
  for path in workdir.glob("config.*.json"):
    if path.name.split(".")[1].isdigit():
      records[int(path.name.split(".")[1])] = path
  return records


def _record_config(config, workdir: pathlib.Path, start_step: int) -> None:
  """Writes this run's config, keeping the record of how each checkpoint was trained.

  A fresh run writes ``config.json``. A resumed run compares its config with
  the newest record up to ``start_step``; if they differ, it logs each changed
  field and writes its own as ``config.<start_step>.json`` beside the records
  it keeps (``config.json`` stays the first run's).
  """
  text = config.to_json_best_effort(indent=2)
  records = {step: path for step, path in _config_records(workdir).items() if step <= start_step}
  if start_step == 0 or not records:
    (workdir / "config.json").write_text(text)
    return
  previous_path = records[max(records)]
  try:
    previous = _flatten(json.loads(previous_path.read_text()))
  except (OSError, ValueError) as e:
    previous = {}
    logging.warning("Cannot read %s (%s); not comparing the config with it.", previous_path, e)
  current = _flatten(json.loads(text))
  changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
  if not changed:
    return
  target = workdir / f"config.{start_step}.json"
  target.write_text(text)
  logging.warning(
      "The config differs from %s, which trained the checkpoints up to step %d: %s. %s is kept; "
      "this run's config, from step %d on, is in %s.", previous_path.name, start_step,
      "; ".join(f"{k}: {previous.get(k, '(none)')!r} → {current.get(k, '(none)')!r}" for k in changed),
      previous_path.name, start_step, target.name)


def _is_empty_run(workdir: pathlib.Path) -> bool:
  """Whether a workdir holds neither a checkpoint nor a logged metric."""
  log = workdir / "metrics.jsonl"
  return (checkpointing.newest_complete_step(checkpointing.directory(workdir)) is None
          and not (log.exists() and log.stat().st_size))


def train_and_evaluate(config, workdir: str | os.PathLike,
                       splits: tuple[data.Split, data.Split] | None = None) -> dict:
  """Trains and evaluates as ``config`` says; returns the final eval metrics,
  or ``{"preempted_at": step}`` if a preemption notice (SIGTERM, or Ctrl-C in
  a single process) stopped it early.

  Bad input raises a ``UserError`` before the workdir is created or touched;
  a run that fails in a workdir it created, before saving a checkpoint or
  logging a metric, removes that workdir again.

  Args:
    config: the config (``configs/default.py`` documents its fields).
    workdir: where checkpoints and metrics go; resumed if it holds a run.
    splits: the (train, test) splits already loaded (a sweep shares them
      between runs); default: prepared if needed and loaded from the config.
  """
  mesh = sharding.make_mesh()
  validate_config(config, mesh.size, jax.process_count())
  workdir = pathlib.Path(workdir).absolute()
  check_writable_dir(workdir, "The workdir")
  is_main = jax.process_index() == 0
  logging.info("Process %d of %d; %d devices in the mesh (%d local); workdir %s",
               jax.process_index(), jax.process_count(), mesh.size, jax.local_device_count(), workdir)
  # The model comes first (its shapes need only the dataset's spec), so that a
  # workdir this run cannot continue is refused before the data is loaded.
  model = build_model(config, splits[0].spec if splits else data.SPECS[config.data.name])
  created = is_main and not workdir.exists()
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    return _train(config, workdir, mesh, model, splits)
  except BaseException:
    if created and _is_empty_run(workdir):
      shutil.rmtree(workdir, ignore_errors=True)  # nothing to resume or read: leave no trace
    raise


def _train(config, workdir: pathlib.Path, mesh, model: pc.Network, splits) -> dict:
  """``train_and_evaluate`` in an existing ``workdir``."""
  is_main = jax.process_index() == 0
  batch_size = config.train.batch_size
  # The initial weights are a function of the seed, so a resumed run has them too.
  initial_params = jax.device_get(nnx.state(model, nnx.Param))
  model_state = sharding.replicate(nnx.state(model), mesh)
  with contextlib.ExitStack() as stack:
    if is_main:
      stack.enter_context(_exclusive(workdir))
    # Leaving this waits for the last save and raises if it failed: no success after a failed save.
    checkpointer = stack.enter_context(
        checkpointing.Checkpointer(checkpointing.directory(workdir), keep=config.keep_checkpoints))
    latest = checkpointer.latest_step()
    if latest is not None:
      try:  # before loading the data: a workdir of another model is refused at once
        checkpointer.check_compatible(latest, model_state)
      except checkpointing.WorkdirError:
        raise
      except Exception:  # unreadable metadata: restore_latest falls back, with a warning
        pass

    train_split, test_split = splits or load_splits(config)
    if batch_size > len(train_split):
      raise TrainingError(f"config.train.batch_size = {batch_size} is larger than the training "
                          f"split ({len(train_split)} examples of {config.data.name}); use at most "
                          f"{len(train_split)}.")
    steps_per_epoch = len(train_split) // batch_size
    num_steps = config.train.num_steps or config.train.num_epochs * steps_per_epoch
    eval_every = config.eval_every_steps or steps_per_epoch
    train_iterator = iter(data.train_dataset(
        train_split, global_batch_size=batch_size, seed=config.seed,  # endless: the loop counts
        augment=config.data.augment, process_index=jax.process_index(),
        process_count=jax.process_count(), prefetch=config.data.prefetch))

    # Optimizer and compiled steps.
    optimizer = nnx.Optimizer(model, weight_optimizer(config, num_steps, nnx.state(model, nnx.Param)),
                              wrt=nnx.Param)
    inference = inference_of(config, model)
    train_step = steps.make_train_step(model, optimizer, mesh, algorithm=config.train.algorithm,
                                       inference=inference, loss=config.train.loss)
    eval_step = steps.make_eval_step(model, mesh, loss=config.train.loss)
    opt_state = sharding.replicate(nnx.state(optimizer), mesh)

    start_step = 0
    restored = checkpointer.restore_latest(model_state, opt_state, train_iterator)
    if restored is not None:
      model_state, opt_state, meta = restored
      start_step = meta["step"]
      if meta["seed"] != config.seed:
        logging.warning("The checkpoint was trained with seed %d, this config has %d: the data "
                        "order continues from the config's seed.", meta["seed"], config.seed)
      logging.info("Resumed from step %d of %d.", start_step, num_steps)
    if is_main:
      # Records after the checkpoint (of a run killed after it) go: the log reads as one run.
      metrics.truncate_after(workdir / "metrics.jsonl", start_step)
      metrics.truncate_events_after(workdir / "tensorboard", start_step)
      _record_config(config, workdir, start_step)
    writer = stack.enter_context(metrics.MetricWriter(workdir, enabled=is_main, num_steps=num_steps,
                                                      purge_step=start_step + 1 if start_step else None))
    preempted_after = stack.enter_context(_preemption_notice(checkpointer))

    pending: list = []  # device metrics of steps not yet checked
    window: list = []  # host metrics since the last log
    # Throughput and ETA count the steps after the first: its call compiles.
    # (A window of that first step alone is timed whole, compile included.)
    clock, timed, window_clock = None, 0, time.perf_counter()
    last_eval = None
    for step in range(start_step, num_steps):
      batch = next(train_iterator)
      x, y = sharding.global_batch((batch["x"], batch["y"]), mesh)
      model_state, opt_state, step_metrics = train_step(model_state, opt_state, x, y)
      if clock is None:
        clock, timed = time.perf_counter(), 0
      else:
        timed += 1
      checkpointer.check_saved()  # a save that failed in the background stops the run here
      pending.append(step_metrics)
      done = step + 1
      preempted = preempted_after(done)
      final = done == num_steps
      save_now = final or preempted or done % config.checkpoint_every_steps == 0
      if save_now or done % config.log_every_steps == 0:
        host = jax.device_get(pending)
        # Before any save: keep the last good checkpoint.
        _check_finite(host, done - len(host), checkpointer.latest_step())
        window += host
        pending = []
      if window and (final or done % config.log_every_steps == 0):
        summary = _summarise(window)
        counted, elapsed = ((timed, time.perf_counter() - clock) if timed
                            else (len(window), time.perf_counter() - window_clock))
        summary["examples_per_second"] = counted * batch_size / elapsed
        summary["eta_seconds"] = (num_steps - done) * elapsed / counted
        writer.write(done, "train", summary)
        window, clock, timed = [], time.perf_counter(), 0
        window_clock = clock
      if final or done % eval_every == 0:
        last_eval = evaluate(eval_step, model_state, test_split, mesh, config.eval_batch_size)
        last_eval |= _layer_diagnostics(config, model, model_state, initial_params, test_split)
        writer.write(done, "eval", last_eval)
        clock, timed = time.perf_counter(), 0  # evaluation time is not training throughput
        window_clock = clock
      if save_now:
        checkpointer.save(done, model_state, opt_state, train_iterator,
                          {"step": done, "seed": config.seed, "examples_seen": done * batch_size})
      if preempted and not final:
        logging.warning("%s: saved step %d of %d; rerun the same command to resume.",
                        "Interrupted" if preempted_after.signal == "SIGINT" else "Preempted",
                        done, num_steps)
        # No evaluation: the grace period before the kill is for saving.
        return {"preempted_at": done}
    if last_eval is None:  # resumed a finished run: report its result
      last_eval = evaluate(eval_step, model_state, test_split, mesh, config.eval_batch_size)
  return last_eval
