"""Which form of RMT's backend-specific operations a model runs: the `kernels` field.

The architecture (`rmt_jax/models/`) is written once, in plain JAX. A few operations also have
a form written for one compiler: `cpu_forms` for XLA CPU, and Pallas kernels for TPUs
(`tpu/operations.py`: the decayed attention, a block's first half (pos conv, layer norm, q/k/v
projections), LePE with its sum, the FFN and a block's second half); every form computes the
same function. Every module of the network carries one field, `kernels`, that says which to
use:

- `'xla'`: the plain forms, for compilers that do well with them (GPU).
- `'cpu'`: the XLA CPU forms.
- `'tpu'`: the TPU forms where an operation has one, each running its kernel where the kernel's
  memory plan fits the shape and saying so in one log line where it does not (`fallback`),
  else the plain ones.
- `'auto'` (the default): resolved when the model is traced, to the forms of the devices in
  context: the context mesh's (`jax.set_mesh`, `jax.sharding.use_abstract_mesh`) where one is
  set, else the default backend's. Only the resolved form is traced, so `'auto'` costs no more
  than naming the form. To compile ahead of time for other devices than the host's (a TPU
  slice from a CPU host), trace under a mesh of those devices or name the form.

Code that knows its target devices (the trainer, the benchmarks, `rmt_jax.tpu_compile`) resolves
the field up front with `for_devices`; `'auto'` serves users who call `model.apply` directly.
"""

import functools
import logging
from typing import Any, Callable, Iterable, Sequence

import jax

from rmt_jax.kernels import KERNELS


def for_platform(platform: str) -> str:
  """The kernel forms for a JAX platform name ('cpu', 'tpu', 'cuda', 'rocm', 'gpu')."""
  return platform if platform in ('cpu', 'tpu') else 'xla'


def for_devices(devices: Iterable[jax.Device] | Any) -> str:
  """The kernel forms for the devices a computation is compiled for (e.g. a mesh's devices).

  Args:
    devices: jax devices (a list, an ndarray of devices, a `jax.sharding.Mesh`); also the
      abstract devices of `jax.experimental.topologies`.

  Raises:
    ValueError: the devices are of more than one platform.
  """
  if isinstance(devices, jax.sharding.Mesh):
    devices = devices.devices.flat
  elif hasattr(devices, 'flat'):
    devices = devices.flat
  platforms = {d.platform for d in devices}
  if len(platforms) != 1:
    raise ValueError(f'devices of one platform expected, got {sorted(platforms)}')
  return for_platform(platforms.pop())


def for_context() -> str:
  """The kernel forms for the devices being traced for: the context mesh's where one is set
  (`jax.set_mesh`, `jax.sharding.use_abstract_mesh`), else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return for_platform(mesh.abstract_device.platform)
  return for_platform(jax.default_backend())


def fallback(operation: str, shape: Sequence[int], reason: str,
             instead: str = 'the plain form runs') -> None:
  """Says, once per operation, shape and reason in a process, that a TPU kernel does not run.

  For a kernel that declines a shape at trace time (its memory plan does not fit): the run goes
  on with `instead`, and the log says so in one line rather than falling back silently.
  """
  _say(f'rmt_jax: the TPU kernel of {operation} does not run at {tuple(shape)}: {reason}; '
       f'{instead}.')


@functools.lru_cache(maxsize=None)
def _say(message: str) -> None:
  logging.getLogger('rmt_jax').warning(message)


def check(kernels: str) -> str:
  """`kernels` itself, or a ValueError naming the choices."""
  if kernels not in KERNELS:
    raise ValueError(f'kernels must be one of {", ".join(map(repr, KERNELS))}; got {kernels!r}')
  return kernels


def resolve(kernels: str, devices: Iterable[jax.Device] | Any = None) -> str:
  """`kernels` checked (`check`), with 'auto' resolved to the forms of `devices` (`for_devices`)
  where they are given; 'auto' as it is without them."""
  kernels = check(kernels)
  return for_devices(devices) if kernels == 'auto' and devices is not None else kernels


def select(kernels: str, *args: Any, xla: Callable[..., Any], cpu: Callable[..., Any],
           tpu: Callable[..., Any] | None = None) -> Any:
  """`xla(*args)`, `cpu(*args)` or `tpu(*args)` as `kernels` says ('auto': `for_context()`).

  Args:
    kernels: 'auto', 'xla', 'cpu' or 'tpu'.
    *args: arrays (pytrees of arrays) passed to the chosen form; static settings go in the
      callables (e.g. `functools.partial`).
    xla: the plain form.
    cpu: the XLA CPU form.
    tpu: the TPU form; None (an operation without one) takes the plain form.
  """
  tpu = xla if tpu is None else tpu
  if kernels == 'auto':
    kernels = for_context()
  if kernels == 'xla':
    return xla(*args)
  if kernels == 'cpu':
    return cpu(*args)
  if kernels == 'tpu':
    return tpu(*args)
  check(kernels)
