"""Trains and evaluates a predictive coding network.

    python -m mupc_flax.main --config=configs/default.py --workdir=runs/default
    python -m mupc_flax.main --config=configs/mnist_128.py --workdir=runs/128 \\
        --config.train.batch_size=128
    python -m mupc_flax.main --config=configs/default.py:smoke --print_config

The text after ':' in --config chains variants and overrides (a config may
add recipes of its own, listed in its docstring):
{variants}
Single fields are set with --config.<section>.<field>=value, e.g.
--config.train.learning_rate=0.05 or --config.inference.lr=0.25;
--print_config prints every field of the resolved config, and exits.

Paths may be relative to the current directory. The dataset is prepared on
first use in $TFDS_DATA_DIR, else ~/tensorflow_datasets (or
--config.data.data_dir). Rerunning the same command resumes from the newest
checkpoint in --workdir; SIGTERM or Ctrl-C saves the current step first.
Under SLURM (srun) or Open MPI with several tasks, or with
--coordinator_address, every process joins one run; otherwise this is a plain
single process. Any failure ends with one ``error:`` line (``--traceback``
adds the traceback). In a multi-process run, a process lost for
--peer_timeout seconds stops all the others (each names it), and processes
that do not all join within --initialization_timeout stop.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mupc_flax import checkpointing, cli, cluster, train, variants

__doc__ = __doc__.format(variants="\n".join(f"  {line}" for line in variants.help_lines()))

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/x.py:smoke.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_PEER_TIMEOUT = flags.DEFINE_float(
    "peer_timeout", cluster.PEER_TIMEOUT,
    "Multi-process runs: seconds without a heartbeat after which a process counts as lost; "
    "every other process then stops with an error naming it.")
_INITIALIZATION_TIMEOUT = flags.DEFINE_float(
    "initialization_timeout", cluster.INITIALIZATION_TIMEOUT,
    "Multi-process runs: seconds for every process to join before each stops with an error.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False,
                                  "Print the resolved config (every field --config.* can set) and exit.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}: every option is a --flag=value.")
  config = _CONFIG.value
  cli.resolve_data_paths(config)
  if _PRINT_CONFIG.value:
    print(config.to_json_best_effort(indent=2))
    return
  if _WORKDIR.value is None:  # required, except to print the config
    raise app.UsageError("Flag --workdir must have a value other than None.")
  workdir = cli.resolve_path(_WORKDIR.value, "--workdir")
  cluster.join(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
               checkpoints=checkpointing.directory(workdir), peer_timeout=_PEER_TIMEOUT.value,
               initialization_timeout=_INITIALIZATION_TIMEOUT.value)
  logging.info("JAX %s on %s: process %d of %d, %d devices (%d local).", jax.__version__,
               jax.default_backend(), jax.process_index(), jax.process_count(),
               jax.device_count(), jax.local_device_count())
  with cluster.together():
    result = train.train_and_evaluate(config, workdir)
  if "preempted_at" in result:
    return
  if "bits_per_character" in result:  # text: per character
    logging.info("Done: test loss %.4g nats (%.4g bits) per character, accuracy %.2f %%. Metrics, "
                 "checkpoints and config are in %s.", result["loss"],
                 result["bits_per_character"], 100 * result["accuracy"], workdir)
    return
  logging.info("Done: test accuracy %.2f %%, test loss %.4g. Metrics, checkpoints and config "
               "are in %s.", 100 * result["accuracy"], result["loss"], workdir)


if __name__ == "__main__":
  cli.run(main)
