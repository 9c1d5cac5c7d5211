"""The notice that a run must save and stop: SIGTERM, Ctrl-C, or a multi-process run's agreed step."""

import contextlib
import signal
import threading

import jax
from absl import logging

from mupc_flax import checkpointing


@contextlib.contextmanager
def notice(checkpointer: checkpointing.Checkpointer):
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
