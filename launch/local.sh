#!/usr/bin/env bash
# Single-node training: one process using every local device (all GPUs, or the CPU).
#
#   launch/local.sh CONFIG WORKDIR [extra flags...]
#   launch/local.sh configs/mnist_128.py ~/mupc_runs/mnist_128
#   launch/local.sh configs/default.py:smoke runs/smoke --config.train.num_steps=100
#
# CONFIG and WORKDIR are relative to the current directory, as for any command.
# Environment:
#   PYTHON=python3      the interpreter of the environment mupc_flax is installed in
#   PROCESSES=N         run N cooperating processes on this machine (jax.distributed over
#                       127.0.0.1), each with its share of the devices; default 1
#   CPU_DEVICES=N       on a CPU-only machine, emulate N devices per process
#   GPUS_PER_PROCESS=K  with PROCESSES > 1 on a GPU machine: GPUs per process (default 1)
#   FAILURE_GRACE=S     with PROCESSES > 1: once a process fails, the others have S seconds
#                       (default 15) to stop by themselves, each naming the lost process,
#                       before they are killed; keep it above --peer_timeout (10 s)
# Rerunning the same command resumes from the newest checkpoint in WORKDIR. SIGTERM to this
# script reaches every process: they agree on a step, save it and exit 0. The exit status
# is that of the first process to fail, or 0.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
python=${PYTHON:-python3}
processes=${PROCESSES:-1}
grace=${FAILURE_GRACE:-15}
if [ -n "${CPU_DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${CPU_DEVICES}"
fi
# The package is importable from this checkout even where it is not installed.
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"

if [ "$processes" -eq 1 ]; then
  exec "$python" -m mupc_flax.main --config="$config" --workdir="$workdir" "$@"
fi

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < processes; i++)); do
  if command -v nvidia-smi >/dev/null 2>&1; then
    k=${GPUS_PER_PROCESS:-1}
    export CUDA_VISIBLE_DEVICES=$(seq -s, $((i * k)) $((i * k + k - 1)))
  fi
  "$python" -m mupc_flax.main --config="$config" --workdir="$workdir" \
      --coordinator_address="127.0.0.1:${port}" --num_processes="$processes" --process_id="$i" "$@" &
  pids+=($!)
done
# A preemption notice for the launcher is one for every process.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM

# Polled rather than `wait -n`, which cannot tell a child's exit from the trapped signal.
status=0
failed_at=
while [ ${#pids[@]} -gt 0 ]; do
  running=()
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      running+=("$pid")
      continue
    fi
    code=0
    wait "$pid" || code=$?
    if [ "$code" -ne 0 ] && [ -z "$failed_at" ]; then
      status=$code
      failed_at=$SECONDS
    fi
  done
  pids=(${running[@]+"${running[@]}"})
  if [ -n "$failed_at" ] && [ ${#pids[@]} -gt 0 ] && [ $((SECONDS - failed_at)) -ge "$grace" ]; then
    echo "launch/local.sh: a process failed ${grace} s ago; killing the ${#pids[@]} still running." >&2
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  if [ ${#pids[@]} -gt 0 ]; then
    sleep 0.2
  fi
done
exit "$status"
