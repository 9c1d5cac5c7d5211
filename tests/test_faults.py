"""Multi-process runs under cluster faults, with two CPU processes: SIGTERM to
one process and to all, a process killed mid-save and the rerun, a process
that hangs, and a process that starts alone.

The faults share one workdir, in turn, so that one rerun after another must
resume where the last fault left it (CI's time budget allows few runs); the
run's final checkpoint must then equal an uninterrupted run's, bit for bit.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mupc_flax import checkpointing
from programs import (REPO, checkpoint_steps, command, environment, free_port, load_checkpoint,
                      start_processes, wait_for)

STEPS = 160
# The smoke model takes ≈15 ms a step on two CPU processes: a signal lands mid-run. The
# faults below land by step ≈40 (the preemptions agree on steps 21 and 31), which leaves
# the kill six saves to catch before the last (steps 40 to 140) and the rerun 120 steps.
FAULTS = [f"--config.train.num_steps={STEPS}", "--config.checkpoint_every_steps=20",
          "--config.log_every_steps=10", f"--config.eval_every_steps={STEPS}",
          "--config.data.in_memory=False", "--peer_timeout=5"]
CLEAN_EXIT_SECONDS = 30  # the bound for every exit below; SLURM allows 120 s after SIGTERM


def logged(path) -> str:
  path = pathlib.Path(path)
  return path.read_text() if path.exists() else ""


def train_steps_logged(log) -> list[int]:
  return [int(s) for s in re.findall(r"\[train\] step (\d+)/\d+:", logged(log))]


def preempted_steps(log) -> list[int]:
  return [int(s) for s in re.findall(r"Preempted: saved step (\d+) of", logged(log))]


def error_lines(log) -> list[str]:
  return [line for line in logged(log).splitlines() if line.startswith("error:")]


def assert_no_crash_report(log):
  text = logged(log)
  for sign in ("Traceback", "Fatal Python error", "Check failure stack trace"):
    assert sign not in text, text[-3000:]


def children(pid) -> list[int]:
  return [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def command_line(pid) -> str:
  """The arguments of a running process, or "" once it has ended."""
  try:
    return pathlib.Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
  except FileNotFoundError:
    return ""


def wait_all(processes, timeout):
  """Exit codes, and the seconds until the last process exited."""
  start = time.monotonic()
  codes = [p.wait(timeout=timeout) for p in processes]
  return codes, time.monotonic() - start


def lost_line(process, lost, workdir, seconds=5):
  step = max(checkpoint_steps(workdir))
  return (f"error: process {lost} of 2 was lost (no heartbeat for {seconds} s), so process "
          f"{process} stops too. The newest complete checkpoint is step {step} in "
          f"{checkpointing.directory(workdir)}: rerun the same command to resume from it.")


@pytest.mark.slow
def test_preemptions_and_a_killed_process_resume_bit_identically(tmp_path, mnist_data_dir):
  reference = start_processes(tmp_path / "reference", mnist_data_dir, *FAULTS,
                              logs=tmp_path / "logs" / "reference")
  workdir = tmp_path / "faults"

  # 1. SIGTERM to process 1 alone, mid-run: both agree on a step, save it once and exit 0.
  logs = tmp_path / "logs" / "term_one"
  processes = start_processes(workdir, mnist_data_dir, *FAULTS, logs=logs)
  wait_for(lambda: 10 in train_steps_logged(logs / "0.log"), what="step 10")
  processes[1].send_signal(signal.SIGTERM)
  codes, seconds = wait_all(processes, timeout=60)
  assert codes == [0, 0], logged(logs / "0.log")[-3000:] + logged(logs / "1.log")[-3000:]
  assert seconds < CLEAN_EXIT_SECONDS
  first, second = preempted_steps(logs / "0.log"), preempted_steps(logs / "1.log")
  assert len(first) == 1 and first == second, (first, second)
  term_one = first[0]
  assert 10 < term_one < STEPS and checkpoint_steps(workdir)[-1] == term_one

  # 2. SIGTERM to the launcher, which sends it to both processes, as they resume from that
  # step: they agree on the next one.
  launcher_log = tmp_path / "logs" / "term_both.log"
  with open(launcher_log, "w") as log:
    launcher = subprocess.Popen(
        ["launch/local.sh", "configs/default.py:smoke", str(workdir),
         f"--config.data.data_dir={mnist_data_dir}", *FAULTS],
        cwd=REPO, env=dict(environment(), PROCESSES="2", PYTHON=sys.executable),
        stdout=subprocess.DEVNULL, stderr=log)
  resumed = f"Resumed from step {term_one} of {STEPS}"
  wait_for(lambda: logged(launcher_log).count(resumed) == 2, what="both processes to resume")
  launcher.send_signal(signal.SIGTERM)
  assert launcher.wait(timeout=60) == 0, logged(launcher_log)[-3000:]
  both = preempted_steps(launcher_log)
  assert len(both) == 2 and both[0] == both[1], both  # one line per process, the same step
  term_both = both[0]
  assert term_one < term_both < STEPS and checkpoint_steps(workdir)[-1] == term_both

  # 3. kill -9 of process 1 while a checkpoint is being written: process 0 stops with one line
  # naming it and the newest complete checkpoint; the one being written does not count.
  logs = tmp_path / "logs" / "kill"
  processes = start_processes(workdir, mnist_data_dir, *FAULTS, logs=logs)
  folder = checkpointing.directory(workdir)
  saving = lambda: [p for p in folder.iterdir() if ".orbax-checkpoint-tmp" in p.name]
  wait_for(lambda: max(checkpoint_steps(workdir)) > term_both and saving(),
           what="a save after the second preemption")
  processes[1].send_signal(signal.SIGKILL)
  (code,), seconds = wait_all(processes[:1], timeout=60)
  processes[1].wait()
  assert code == 1 and seconds < CLEAN_EXIT_SECONDS, logged(logs / "0.log")[-3000:]
  assert error_lines(logs / "0.log") == [lost_line(0, 1, workdir)]
  assert_no_crash_report(logs / "0.log")
  killed_at = max(checkpoint_steps(workdir))
  assert checkpointing.newest_complete_step(folder) == killed_at > term_both

  # 4. The rerun resumes from that checkpoint, clears the unfinished one, and ends as the
  # uninterrupted run does, bit for bit.
  logs = tmp_path / "logs" / "rerun"
  processes = start_processes(workdir, mnist_data_dir, *FAULTS, logs=logs)
  codes, _ = wait_all(processes, timeout=300)
  assert codes == [0, 0], logged(logs / "0.log")[-3000:]
  assert f"Resumed from step {killed_at} of {STEPS}" in logged(logs / "0.log")
  assert not saving() and checkpoint_steps(workdir)[-1] == STEPS
  codes, _ = wait_all(reference, timeout=300)
  assert codes == [0, 0], logged(tmp_path / "logs" / "reference" / "0.log")[-3000:]
  for item in ("model", "optimizer"):
    a, b = load_checkpoint(tmp_path / "reference", STEPS, item), load_checkpoint(workdir, STEPS, item)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{item} {key}")


@pytest.mark.slow
def test_a_hung_process_stops_the_others_and_the_launcher(tmp_path, mnist_data_dir):
  """Process 1 stops (SIGSTOP) as soon as it has joined: process 0 names it
  within the peer timeout and exits 1; the launcher then kills the stopped
  process and returns that 1."""
  log = tmp_path / "launcher.log"
  with open(log, "w") as stderr:
    launcher = subprocess.Popen(
        ["launch/local.sh", "configs/default.py:smoke", str(tmp_path / "run"),
         f"--config.data.data_dir={mnist_data_dir}", *FAULTS],
        cwd=REPO, env=dict(environment(), PROCESSES="2", PYTHON=sys.executable, FAILURE_GRACE="1"),
        stdout=subprocess.DEVNULL, stderr=stderr)
  wait_for(lambda: "Process 1 of 2" in logged(log), what="process 1 to join")
  hung = next(pid for pid in children(launcher.pid) if "--process_id=1" in command_line(pid))
  os.kill(hung, signal.SIGSTOP)
  (code,), seconds = wait_all([launcher], timeout=60)
  assert code == 1 and seconds < CLEAN_EXIT_SECONDS, logged(log)[-3000:]
  assert error_lines(log) == [
      "error: process 1 of 2 was lost (no heartbeat for 5 s), so process 0 stops too. There is "
      f"no complete checkpoint in {checkpointing.directory(tmp_path / 'run')} yet: rerun the "
      "same command to start over."]
  assert_no_crash_report(log)
  assert not pathlib.Path(f"/proc/{hung}").exists()  # killed (and reaped) by the launcher


@pytest.mark.slow
def test_a_process_started_alone_stops_after_the_initialization_timeout(tmp_path, mnist_data_dir):
  """Process 0 (which hosts the coordinator) and process 1, each of a run whose
  other process never comes, both stop once --initialization_timeout passes."""
  ports = {i: free_port() for i in (0, 1)}
  alone = {i: subprocess.Popen(
      command(tmp_path / f"run{i}", mnist_data_dir, f"--coordinator_address=127.0.0.1:{ports[i]}",
              "--num_processes=2", f"--process_id={i}", "--initialization_timeout=3"),
      cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in (0, 1)}
  start = time.monotonic()
  for i, process in alone.items():
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        f"error: not every process of this run joined within 3 s (this is process {i} of 2, "
        f"coordinator 127.0.0.1:{ports[i]}): start all of them, with the same "
        "--coordinator_address and --num_processes (or through srun), or allow longer with "
        "--initialization_timeout."]
    assert "Traceback" not in stderr and "Check failure" not in stderr
    assert not (tmp_path / f"run{i}").exists()  # the workdir was never touched
  assert time.monotonic() - start < 3 + 30  # the timeout, plus starting Python and JAX
