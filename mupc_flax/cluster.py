"""Multi-process runs: joining one, and ending it cleanly when a process is lost.

``join`` starts JAX's distributed runtime (explicit coordinator flags, or a
SLURM / Open MPI launch) and does nothing in a plain single process. JAX ends
every process with a fatal error and a C++ stack trace when a peer stops
heartbeating or never joins; this module sees both first, on clocks half as
long, and ends the process with one ``error:`` line instead (``cli.exit_now``):

- A process that has not met all the others within ``initialization_timeout``
  seconds stops.
- Every process posts a heartbeat to JAX's key-value store each second and
  reads the others'. A process silent for ``peer_timeout`` seconds (killed,
  stopped, its machine gone) is lost: every other process stops, naming it and
  the newest complete checkpoint, which a rerun resumes from. A process that
  fails with its own error says so in the store, and the others stop at once.

JAX's own timeouts are set longer, as a backstop: twice the join timeout, and
four times the peer timeout (JAX called a peer killed mid-save dead within
6 s at a heartbeat timeout of 10 s: at twice ours the two clocks raced, and
under load JAX's fatal error came first). Only the loss of
process 0, which hosts JAX's coordination service, still ends the others
through JAX's fatal error (at once): no process is left to tell them.
"""

import contextlib
import os
import threading
import time

import jax
from absl import logging
from jax._src import distributed as jax_distributed  # its client, as Orbax and multihost_utils use it
from jax.experimental import multihost_utils

from mupc_flax import checkpointing, cli
from mupc_flax.errors import UserError

PEER_TIMEOUT = 10  # seconds without a heartbeat before a process counts as lost
INITIALIZATION_TIMEOUT = 300  # seconds for all processes to meet at the start

_KEY_PREFIX = "mupc_flax/process/"  # + process index -> "alive <count>", "done" or "failed"
_BEAT_SECONDS = 1.0

_watch: "_PeerWatch | None" = None


def join(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *, checkpoints: os.PathLike,
         peer_timeout: float = PEER_TIMEOUT,
         initialization_timeout: float = INITIALIZATION_TIMEOUT) -> None:
  """Joins a multi-process run, or does nothing in a plain single process.

  Explicit arguments win; otherwise SLURM (``srun``) and Open MPI launches
  with more than one task are detected from their environment.

  Args:
    coordinator_address, num_processes, process_id: as for
      ``jax.distributed.initialize``.
    checkpoints: the run's checkpoint directory, for the newest complete
      checkpoint that a lost process's error line names.
    peer_timeout: seconds of silence after which a process counts as lost.
    initialization_timeout: seconds for every process to join.
  """
  global _watch
  launched = any(int(os.environ.get(v, "1")) > 1
                 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
  if coordinator_address is None and not launched:
    return
  if not peer_timeout > 0 or not initialization_timeout > 0:
    raise UserError(f"--peer_timeout ({peer_timeout}) and --initialization_timeout "
                    f"({initialization_timeout}) must be positive numbers of seconds.")
  # CPU processes exchange collectives through gloo (GPUs use NCCL regardless).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # SIGTERM reaches a multi-process run only through this service (train.py).
  jax.config.update("jax_enable_preemption_service", True)
  where = (f"this is process {process_id} of {num_processes}, coordinator {coordinator_address}"
           if coordinator_address else "the coordinator is the one SLURM or Open MPI named")
  alone = threading.Timer(initialization_timeout, cli.exit_now, args=(
      f"not every process of this run joined within {initialization_timeout:g} s ({where}): "
      "start all of them, with the same --coordinator_address and --num_processes (or through "
      "srun), or allow longer with --initialization_timeout.",))
  alone.daemon = True
  alone.start()
  cli.exit_at_once_on_failure()
  backstop = dict(initialization_timeout=int(2 * initialization_timeout),
                  heartbeat_timeout_seconds=int(4 * peer_timeout))
  try:
    if coordinator_address is None:
      jax.distributed.initialize(**backstop)
    else:
      jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                 process_id=process_id, **backstop)
  finally:
    alone.cancel()
  # JAX's preemption service stops the run at the step after the furthest one any process has
  # reported (train.py reports each step). Report the step this run resumes from now: a
  # SIGTERM before the first step would otherwise set step 1, which a resumed run never meets.
  multihost_utils.reached_preemption_sync_point(checkpointing.newest_complete_step(checkpoints) or 0)
  _watch = _PeerWatch(jax_distributed.global_state.client, jax.process_index(),
                      jax.process_count(), peer_timeout, checkpoints)
  _watch.start()


@contextlib.contextmanager
def together():
  """Runs the body as this process's part of the run; no-op in a single process.

  On success the other processes learn that this one is done, and stop
  watching it. On the process's own error they learn that it failed, and stop
  too. An error that a lost peer may have caused (a collective or a save that
  failed under it) first gives the watch time to name that peer.
  """
  if _watch is None:
    yield
    return
  try:
    yield
  except BaseException as e:
    if _may_come_from_a_peer(e):
      _watch.await_verdict()
    _watch.stop("failed")
    raise
  _watch.stop("done")


def _may_come_from_a_peer(error: BaseException) -> bool:
  """Anything but this program's own errors (and Ctrl-C, exits), unless one of them
  was raised from another failure, as a failed save is."""
  while error is not None:
    if not isinstance(error, (UserError, KeyboardInterrupt, SystemExit)):
      return True
    error = error.__cause__
  return False


def _describe_resume(checkpoints: os.PathLike) -> str:
  step = checkpointing.newest_complete_step(checkpoints)
  if step is None:
    return f"There is no complete checkpoint in {checkpoints} yet: rerun the same command to start over."
  return (f"The newest complete checkpoint is step {step} in {checkpoints}: rerun the same "
          "command to resume from it.")


class _PeerWatch:
  """Heartbeats through JAX's key-value store, and the verdict on silent peers.

  One thread posts this process's heartbeat and reads everyone's; another
  judges, so that a store that stops answering (process 0 stopped) is noticed
  while the first thread waits on it.
  """

  def __init__(self, client, process_index: int, process_count: int, timeout: float,
               checkpoints: os.PathLike):
    self._client = client
    self._me = process_index
    self._count = process_count
    self._timeout = timeout
    self._checkpoints = checkpoints
    self._stopped = threading.Event()
    self._lock = threading.Lock()
    now = time.monotonic()
    self._states = {p: "" for p in range(process_count) if p != process_index}
    self._changed = {p: now for p in self._states}  # when each peer's state last changed
    self._answered = now  # when the store last answered

  def start(self) -> None:
    for target, name in ((self._beat, "mupc_flax heartbeat"), (self._judge, "mupc_flax peer watch")):
      threading.Thread(target=target, name=name, daemon=True).start()

  def stop(self, final_state: str) -> None:
    """Stops watching, and tells the others this process is ``done`` or ``failed``.

    Waits at most two heartbeats for the store: one that no longer answers
    (process 0 stopped) must not keep a failing process from exiting.
    """
    self._stopped.set()
    telling = threading.Thread(target=self._tell, args=(final_state,), daemon=True)
    telling.start()
    telling.join(2 * _BEAT_SECONDS)

  def _tell(self, state: str) -> None:
    try:
      self._client.key_value_set(f"{_KEY_PREFIX}{self._me}", state, allow_overwrite=True)
    except Exception as e:  # the store is gone: the others learn from the silence instead
      logging.warning("Could not tell the other processes that this one is %s (%s).", state, e)

  def await_verdict(self) -> None:
    """Waits as long as the watch may take to find a lost peer (it then ends the process)."""
    self._stopped.wait(self._timeout + 2 * _BEAT_SECONDS)

  def _beat(self) -> None:
    count = 0
    while not self._stopped.is_set():
      count += 1
      try:
        self._client.key_value_set(f"{_KEY_PREFIX}{self._me}", f"alive {count}", allow_overwrite=True)
        entries = self._client.key_value_dir_get(_KEY_PREFIX)
      except Exception:  # the store did not answer; the judge counts the silence
        self._stopped.wait(_BEAT_SECONDS)
        continue
      now = time.monotonic()
      with self._lock:
        self._answered = now
        for key, state in entries:
          peer = int(key.rsplit("/", 1)[-1])
          if peer in self._states and state != self._states[peer]:
            self._states[peer], self._changed[peer] = state, now
      self._stopped.wait(_BEAT_SECONDS)

  def _judge(self) -> None:
    while not self._stopped.wait(_BEAT_SECONDS / 2):
      now = time.monotonic()
      with self._lock:
        failed = [p for p, state in self._states.items() if state == "failed"]
        silent = [p for p, state in self._states.items()
                  if state not in ("done", "failed") and now - self._changed[p] > self._timeout]
        if self._me != 0 and now - self._answered > self._timeout:
          silent = sorted({0, *silent})  # process 0 hosts the store
      if self._stopped.is_set() or not (failed or silent):
        continue
      if failed:
        what = (f"{_processes(failed, self._count)} stopped with an error (its own error line "
                "says which)")
      else:
        what = (f"{_processes(silent, self._count)} {'was' if len(silent) == 1 else 'were'} lost "
                f"(no heartbeat for {self._timeout:g} s)")
      cli.exit_now(f"{what}, so process {self._me} stops too. {_describe_resume(self._checkpoints)}")


def _processes(indices: list[int], count: int) -> str:
  """E.g. 'process 1 of 2', 'processes 1, 3 of 4'."""
  names = ", ".join(map(str, indices))
  return f"process{'es' if len(indices) > 1 else ''} {names} of {count}"
