"""Trains and evaluates a predictive coding network.

    python -m mupc_flax.main --config=configs/default.py --workdir=/tmp/mupc/default
    python -m mupc_flax.main --config=configs/mnist_128.py --workdir=/tmp/mupc/128 \\
        --config.train.batch_size=128

Rerunning the same command resumes from the newest checkpoint in --workdir.
Under SLURM (srun) or Open MPI with several tasks, or with --coordinator_address,
every process joins one run; otherwise this is a plain single process.
"""

import logging as py_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mupc_flax import data, sharding, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/x.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries(record: py_logging.LogRecord) -> bool:
  """Keeps the console to this program's lines and every library warning."""
  chatty = any(f"/{name}/" in record.pathname for name in ("orbax", "grain", "tensorflow_datasets"))
  return record.levelno >= py_logging.WARNING or not chatty


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_libraries)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("JAX %s on %s: process %d of %d, %d devices (%d local).", jax.__version__,
               jax.default_backend(), jax.process_index(), jax.process_count(),
               jax.device_count(), jax.local_device_count())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.TrainingError, data.DataError) as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
