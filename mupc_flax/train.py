"""The training program: ``train_and_evaluate(config, workdir)``.

It checks the config and builds the run from it (``validation``), prepares
the dataset if needed, resumes from the newest checkpoint in ``workdir``,
trains with the PC (or BP) step, evaluates on the whole test split, logs
(process 0 only) to the console, ``metrics.jsonl`` and TensorBoard, and
checkpoints every N steps, at the end and on SIGTERM or Ctrl-C
(``preemption``). The workdir's own records are ``workdir``'s.
"""

import contextlib
import os
import pathlib
import shutil
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from mupc_flax import (checkpointing, data, diagnostics, metrics, optimizers, pc, preemption,
                       sharding, steps, workdir as records)
from mupc_flax.errors import check_writable_dir
from mupc_flax.validation import (TrainingError, build_model, inference_of, load_splits,
                                  validate_config)


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
          f"{kept}; lower train.learning_rate or inference.lr.")


def evaluate(eval_step, model_state, split: data.Split, mesh, batch_size: int,
             loss: str = "mse") -> dict:
  """Loss and accuracy of the feed-forward prediction over the whole split
  (per character for text, and with ``loss = "ce"`` its bits per character)."""
  total = None
  for batch in data.eval_batches(split, global_batch_size=batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count()):
    x, y, mask = sharding.global_batch((batch["x"], batch["y"], batch["mask"]), mesh)
    sums = eval_step(model_state, x, y, mask)
    total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
  total = jax.device_get(total)
  result = {"loss": total["loss"] / total["count"], "accuracy": total["correct"] / total["count"],
            "examples": total["count"]}
  if isinstance(split, data.TextSplit) and loss == "ce":  # the loss in nats per character
    result["bits_per_character"] = result["loss"] / np.log(2)
  return result


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
    batch = split.examples(rows)
    agreement = diagnostics.pc_bp_agreement(network, batch["x"], batch["y"],
                                            inference_of(config), loss=config.train.loss)
    out |= {"pc_bp_cosines": agreement["layer_cosines"], "reach": agreement["reach"]}
  if config.log_hessian:
    example = split.examples(np.array([0]))
    spectrum = diagnostics.hessian_spectrum(network, example["x"][0], example["y"][0],
                                            loss=config.train.loss)
    out |= {"hessian_condition": spectrum["condition"], "hessian_min": spectrum["min"],
            "hessian_max": spectrum["max"]}
  return out


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
  model = build_model(config, splits[0].spec if splits else data.spec_of(config.data))
  created = is_main and not workdir.exists()
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    return _train(config, workdir, mesh, model, splits)
  except BaseException:
    if created and records.is_empty_run(workdir):
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
      stack.enter_context(records.exclusive(workdir))
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
    weights = nnx.state(model, nnx.Param)
    optimizer = nnx.Optimizer(model, optimizers.weight_optimizer(config, num_steps, weights),
                              wrt=nnx.Param)
    inference = inference_of(config)
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
      records.record_config(config, workdir, start_step)
    writer = stack.enter_context(metrics.MetricWriter(workdir, enabled=is_main, num_steps=num_steps,
                                                      purge_step=start_step + 1 if start_step else None))
    preempted_after = stack.enter_context(preemption.notice(checkpointer))

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
        # The first step compiles and runs asynchronously: the clock starts once
        # it has finished, so that none of it counts as throughput.
        jax.block_until_ready(step_metrics)
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
        last_eval = evaluate(eval_step, model_state, test_split, mesh, config.eval_batch_size,
                             config.train.loss)
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
      last_eval = evaluate(eval_step, model_state, test_split, mesh, config.eval_batch_size,
                             config.train.loss)
  return last_eval
