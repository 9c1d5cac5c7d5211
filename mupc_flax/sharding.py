"""The device mesh: one ``data`` axis over every device of every process.

Weights are replicated; batches are split along their leading axis. A
process's own slice of the global batch becomes part of one global array with
``global_batch``, so the same step runs on one CPU, several GPUs or hosts.
"""

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: all devices, all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """Raises a clear error if the batch cannot be split evenly over devices and processes."""
  devices, processes = mesh.size, jax.process_count()
  if global_batch_size % devices or global_batch_size % processes:
    raise ValueError(
        f"The global batch size {global_batch_size} must be divisible by the number of "
        f"devices ({devices}) and of processes ({processes}); change the batch size "
        "or the number of devices.")


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """This process's rows of the global batch (a pytree of arrays) -> global arrays.

  Each process passes its own contiguous slice of the global batch along the
  leading axis; the result is sharded over the ``data`` axis.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a pytree of arrays, identical on every process, on every device."""
  sharding = replicated(mesh)

  def place(leaf):
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(place, tree)
