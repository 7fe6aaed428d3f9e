"""The device mesh and the rules that place the train state and the batches on it.

The mesh has two axes, named by `config.mesh`: 'data' and 'fsdp'. Batches are split over
both (every device sees a different slice of the global batch). Parameters, and everything
shaped like them (Adam moments, EMA weights), are replicated over 'data' and split over
'fsdp' along their largest dimension that 'fsdp' divides; arrays smaller than
`config.fsdp_min_size` elements stay replicated, since splitting them saves little memory and
costs one all-gather each. So:

  mesh.data=-1, mesh.fsdp=1   plain data parallelism (the default; RMT-T/S fit every chip);
  mesh.data=1,  mesh.fsdp=-1  FSDP / ZeRO-3 over all devices (parameters sharded over the
                              data-parallel devices themselves; for RMT-B/L on small chips);
  mesh.data=4,  mesh.fsdp=2   both: pairs of devices share one copy of the parameters.

The rule looks only at shapes, so the optimizer state, whose leaves have the parameters'
shapes, is placed like the parameters without naming its structure. XLA inserts the
all-gathers and reduce-scatters that the shardings imply.
"""

import functools
import math
from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
# The batch dimension is split over every device, in mesh order.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes; one of them may be -1, meaning "all the remaining devices".

  Raises:
    ValueError: the sizes do not multiply to the number of devices.
  """
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise ValueError('At most one of config.mesh.data and config.mesh.fsdp may be -1.')
  if data == -1:
    data = num_devices // fsdp if num_devices % fsdp == 0 else -1
  elif fsdp == -1:
    fsdp = num_devices // data if num_devices % data == 0 else -1
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(f'config.mesh data={mesh_config.data} x fsdp={mesh_config.fsdp} does not '
                     f'fit the {num_devices} devices.')
  return data, fsdp


def create_mesh(mesh_config: ml_collections.ConfigDict,
                devices: list[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp') mesh over all devices of all processes.

  Args:
    mesh_config: `config.mesh`, with fields `data` and `fsdp` (one may be -1).
    devices: defaults to `jax.devices()`.

  Returns:
    The mesh; devices are ordered by `jax.make_mesh`, which keeps 'fsdp' groups on
    neighbouring chips of the interconnect where it knows the topology.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    # Auto axes: shardings are chosen by us at the jit boundary and by XLA inside (JAX's
    # default for make_mesh is Explicit, which types every intermediate's sharding).
    return jax.make_mesh(shape, (DATA_AXIS, FSDP_AXIS),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Device kinds without a topology model (e.g. several CPU processes): plain order.
    return Mesh(np.asarray(devices).reshape(shape), (DATA_AXIS, FSDP_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over every device; the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def partition_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Where one array of the train state lives: its largest dimension divisible by the
  'fsdp' axis is split over it, or nothing is split (small arrays, scalars, no fit).

  Args:
    shape: the array's shape.
    fsdp_size: devices along 'fsdp'.
    min_size: arrays with fewer elements stay replicated.
  """
  if fsdp_size <= 1 or not shape or math.prod(shape) < min_size:
    return P()
  # Largest first; ties go to the last dimension (a Dense kernel's output features), which
  # keeps the split of consecutive layers' kernels on alternating sides less often.
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
  for i in order:
    if shape[i] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[i] = FSDP_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp_min_size: int = 2**14) -> Any:
  """NamedShardings for every leaf of a train state (from `jax.eval_shape`).

  Args:
    abstract_state: pytree of `jax.ShapeDtypeStruct` (or arrays).
    mesh: from `create_mesh`.
    fsdp_min_size: see `partition_spec`.

  Returns:
    A pytree of `NamedSharding` with the structure of `abstract_state`.
  """
  fsdp_size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, partition_spec(tuple(x.shape), fsdp_size, fsdp_min_size)),
      abstract_state)


def traced_on(mesh: Mesh, fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn`, traced with `mesh` as the context mesh (for `jax.jit`).

  The TPU forms' Pallas kernels, which XLA cannot partition, read it to run on each device's
  share of the batch (`rmt_jax.kernels.tpu.attention`); nothing else depends on it.
  """

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return traced
