"""Pallas TPU kernels under a context mesh: each device runs a kernel on its own images.

XLA does not partition Mosaic kernels: under a mesh of several devices a kernel call must run
inside a `shard_map`, on each device's share of the batch, with its weights whole on every
device and the gradients of those weights (each device's sums) added over the mesh.
`per_device` does that for the kernels whose arrays are image rows (`tpu_block_head`,
`tpu_lepe`).
"""

from typing import Any, Callable, Sequence

import jax
from jax.sharding import PartitionSpec


def per_device(function: Callable[..., Any], arrays: Sequence[jax.Array],
               weights: Sequence[jax.Array], backward: bool) -> Any:
  """`function(arrays, weights)` on each device's images under a context mesh of several
  devices (called as it is without one, or with one of a single device).

  Args:
    function: (arrays, weights) -> its outputs: the arrays' outputs (one array or a tuple of
      them, split as the arrays are); with `backward`, (an array, a tuple of weight
      gradients).
    arrays: image rows (b h, w, C), split over every device of the mesh along their first axis.
    weights: passed whole to every device.
    backward: the function returns (an array, weight gradients), the gradients each device's
      sums: they are added over the mesh (`psum`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return function(arrays, weights)
  axes = tuple(mesh.axis_names)
  split, replicated = PartitionSpec(axes), PartitionSpec()

  def local(arrays, weights):
    out = function(arrays, weights)
    if backward:
      return out[0], tuple(jax.lax.psum(g, axes) for g in out[1])
    return out

  out_specs = (split, (replicated,) * len(weights)) if backward else split
  return jax.shard_map(local, mesh=mesh,
                       in_specs=((split,) * len(arrays), (replicated,) * len(weights)),
                       out_specs=out_specs, check_vma=False)(tuple(arrays), tuple(weights))
