"""What every Pallas TPU kernel here shares: the VMEM budget, the per-device mapping under a
mesh, the `pallas_call` skeleton, and the layer norm inside a kernel.

- VMEM (`budget`, `limit`): by the chip the program is traced for (`chip`): the scoped VMEM a
  kernel asks Mosaic for is a v4 TensorCore's 16 MiB on v4 and on any chip not named, 48 MiB on
  v5p (64 MiB a TensorCore), 64 MiB on v5e and v6e (128 MiB); each kernel's memory plan
  (`Shape.plan` of each module) keeps its own estimate within the budget, 2 MiB less. The
  interpreter (a CPU host) takes the v4 figures, so its plans are the ones a program for any
  chip can run.
- The mesh (`per_device`): XLA does not partition Mosaic kernels. Under a mesh of several
  devices a kernel's call runs in a `shard_map`: each device takes its share of the images, the
  weights whole, and the weights' gradients (each device's sums) are added over the mesh. The
  mesh is the context mesh (`jax.set_mesh`, or `rmt_jax.train.sharding.traced_on` in the
  trainer), else the one the operands' types carry (a plain `jax.jit` of arrays or
  `ShapeDtypeStruct`s with `NamedSharding`s). A program partitioned with neither (only
  `jax.jit(..., in_shardings=...)` of unsharded inputs) stops when lowered for TPUs with one
  line naming the fixes (`SHARDING_UNKNOWN`), where Mosaic's own error would not.
- The call (`call`): Mosaic when lowered for a TPU, else Pallas's interpreter, which computes
  the same function slowly (so that `kernels='tpu'` runs on a CPU host); the scoped VMEM; and
  every operand of a Mosaic call kept in HBM (`in_hbm`). The blocks: a weight's, the same at
  every grid step, fetched once into one buffer (`whole`); and the (cores, steps per core) grid
  of the kernels that add their weights' gradients into one float32 block per TensorCore
  (`CoreGrid`).
- Kernel code: the layer norm's normalisation and its transpose (`normalise`,
  `normalise_transpose`), and the matrix products with a transposed operand.
"""

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
from jax._src import sharding_impls  # The partitioning context Mosaic's lowering reads.
import jax.extend.core
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

# The scoped VMEM a kernel asks Mosaic for, per TensorCore, by the `device_kind` of the chip it
# is compiled for; other chips and the interpreter take `_SMALLEST`. A v4 TensorCore has 16 MiB
# of VMEM; v5p 64 MiB, v5e and v6e 128 MiB (jax's `pltpu.get_tpu_info_for_chip`). Three quarters
# of v5p's and half of v5e's and v6e's leave Mosaic's own scratch room; RMT's plans at 64 images
# a chip compile within them ahead of time (the compile tests, `rmt_jax.tpu_compile`), and the
# on-device check drops a kernel that does not build on its chip.
_SMALLEST = 16 * 1024 * 1024
_LIMITS = {'TPU v4': _SMALLEST, 'TPU v5': 48 * 1024 * 1024, 'TPU v5p': 48 * 1024 * 1024,
           'TPU v5 lite': 64 * 1024 * 1024, 'TPU v5e': 64 * 1024 * 1024,
           'TPU v6 lite': 64 * 1024 * 1024, 'TPU v6e': 64 * 1024 * 1024}
# What a kernel's own estimate (`Shape.vmem_bytes` of each module) leaves for what it does not
# count.
_UNCOUNTED = 2 * 1024 * 1024


def chip() -> str | None:
  """The `device_kind` of the TPU that what is being traced is compiled for: the context mesh's
  devices' where a mesh is set (`jax.set_mesh`, `use_abstract_mesh`, `on_operands_mesh`; the
  abstract devices of `jax.experimental.topologies` too), else the default backend's; None
  where that is not a TPU (the interpreter)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    device = mesh.abstract_device
    return device.device_kind if device.platform == 'tpu' else None
  if jax.default_backend() == 'tpu':
    return jax.devices()[0].device_kind
  return None


def limit() -> int:
  """The scoped VMEM, bytes, that a kernel traced now asks Mosaic for (`chip`)."""
  return _LIMITS.get(chip(), _SMALLEST)


def budget() -> int:
  """What a kernel traced now may take of VMEM by its own estimate: `limit()` less 2 MiB."""
  return limit() - _UNCOUNTED

TRANS_A = (((0,), (0,)), ((), ()))  # x.T @ y
TRANS_B = (((1,), (1,)), ((), ()))  # x @ y.T


# ---------------------------------------------------------------------------------------------
# The mesh.

def mesh_of(operands: Any = ()) -> jax.sharding.AbstractMesh:
  """The mesh that a kernel's work is split over: the context mesh where one is set, else the
  first mesh of several devices that the operands' types carry (inside a `jax.jit` of sharded
  arrays or `ShapeDtypeStruct`s with `NamedSharding`s, every value's type names the mesh),
  else the empty context mesh.

  Args:
    operands: a pytree of arrays or tracers (the kernel's operands).
  """
  context = jax.sharding.get_abstract_mesh()
  if not context.empty:
    return context
  for operand in jax.tree.leaves(operands):
    mesh = getattr(getattr(jax.typeof(operand), 'sharding', None), 'mesh', None)
    if mesh is not None and not mesh.empty and mesh.size > 1:
      return mesh.abstract_mesh if isinstance(mesh, jax.sharding.Mesh) else mesh
  return context


def devices(operands: Any = ()) -> int:
  """The devices of `mesh_of(operands)` (1 without a mesh)."""
  mesh = mesh_of(operands)
  return 1 if mesh.empty else mesh.size


def images_per_device(batch: int, operands: Any = ()) -> int:
  """Each device's share of `batch` images under `mesh_of(operands)`, as `per_device` splits
  them."""
  count = devices(operands)
  if batch % count:
    raise ValueError(f'{batch} images do not split over {count} devices')
  return batch // count


def on_operands_mesh(operation: Callable[..., Any]) -> Callable[..., Any]:
  """`operation`, traced with the mesh its operands carry as the context mesh where no context
  mesh is set, so that what it decides from the mesh before calling its kernels (the memory
  plans of each device's share) sees the mesh that `per_device` splits over."""

  @functools.wraps(operation)
  def traced(*args, **kwargs):
    mesh = mesh_of(args)
    if mesh.empty or not jax.sharding.get_abstract_mesh().empty:
      return operation(*args, **kwargs)
    with jax.sharding.use_abstract_mesh(mesh):
      return operation(*args, **kwargs)

  return traced


def per_device(function: Callable[[tuple, tuple], tuple[Any, Any]], split: Sequence[jax.Array],
               whole: Sequence[jax.Array], split_axes: Sequence[int] | None = None
               ) -> tuple[Any, Any]:
  """`function(split, whole)` on each device's share under a mesh of several devices
  (`mesh_of` the operands; called as it is without one, or with one of a single device).

  Args:
    function: (split, whole) -> (outputs, sums): the outputs (an array or a pytree of them),
      split as the split arrays are, along their first axis; the sums (e.g. the weights'
      gradients; `()` for none), each device's, added over the mesh (`psum`).
    split: arrays split over every device of the mesh: images, image rows or tokens of whole
      images along their first axis (or `split_axes`).
    whole: arrays passed whole to every device (weights, tables).
    split_axes: the axis along which each of `split` is split (default: the first).

  Returns:
    (outputs, sums).
  """
  split, whole = tuple(split), tuple(whole)
  mesh = mesh_of((split, whole))
  if mesh.empty or mesh.size == 1:
    return function(tuple(_one_program(*split)), whole)
  axes = tuple(mesh.axis_names)
  along = lambda axis: PartitionSpec(*(None,) * axis, axes)

  def local(split, whole):
    outputs, sums = function(split, whole)
    return outputs, (jax.lax.psum(sums, axes) if jax.tree.leaves(sums) else sums)

  in_specs = (tuple(along(a) for a in split_axes or (0,) * len(split)),
              (PartitionSpec(),) * len(whole))
  with (contextlib.nullcontext() if not jax.sharding.get_abstract_mesh().empty
        else jax.sharding.use_abstract_mesh(mesh)):
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                         out_specs=(along(0), PartitionSpec()), check_vma=False)(split, whole)


SHARDING_UNKNOWN = (
    'rmt_jax: the TPU kernels run on each device\'s share of the batch, and this program is '
    'partitioned over {devices} devices with no mesh they can read; trace it under '
    '`with jax.set_mesh(mesh):`, or give its inputs NamedShardings (jax.device_put, '
    'ShapeDtypeStruct(..., sharding=...)), or build the model with kernels=\'xla\'')

# The identity on a kernel's split operands where no mesh is known: lowered for TPUs into a
# program partitioned over several devices (which Mosaic cannot partition), it stops the
# lowering with `SHARDING_UNKNOWN` before Mosaic's own error, which names no fix of ours.
_one_program_p = jax.extend.core.Primitive('rmt_jax_one_program')
_one_program_p.multiple_results = True
_one_program_p.def_impl(lambda *operands: operands)
_one_program_p.def_abstract_eval(lambda *avals: avals)
batching.primitive_batchers[_one_program_p] = (
    lambda operands, dims: (_one_program_p.bind(*operands), dims))


def _one_program(*operands: jax.Array) -> Sequence[jax.Array]:
  return _one_program_p.bind(*operands) if operands else operands


def _one_program_tpu_lowering(ctx: Any, *operands: Any) -> Sequence[Any]:
  # The test Mosaic's lowering makes (jax._src.tpu_custom_call): a partitioned program that is
  # not inside a shard_map.
  context = ctx.module_context.axis_context
  if isinstance(context, sharding_impls.ShardingContext) and context.num_devices != 1:
    raise ValueError(SHARDING_UNKNOWN.format(devices=context.num_devices))
  return operands


mlir.register_lowering(_one_program_p, lambda ctx, *operands: operands)
mlir.register_lowering(_one_program_p, _one_program_tpu_lowering, platform='tpu')


# ---------------------------------------------------------------------------------------------
# The call.

def in_hbm(operands: Sequence[jax.Array]) -> list[jax.Array]:
  """`operands` of a Mosaic kernel, constrained to stay in HBM.

  A kernel's BlockSpecs stream its operands from HBM into VMEM block by block, overlapped with
  its work. Left free, XLA's memory-space assignment also copies operands that fit into VMEM
  there ahead of the kernel (`copy-start`): a second on-chip copy of bytes the kernel's pipeline
  brings in anyway, which XLA's cost model counts on top of the kernel's own reads. RMT-S's v5p
  train step estimates at 32.8 ms with the constraint and 36.4 ms without
  (`python -m rmt_jax.tpu_compile`); the HBM traffic is the same (24.3 ms either way with
  memory-space assignment off). For Mosaic calls only: the Pallas interpreter does not take
  memory-space constraints.
  """
  return [pltpu.with_memory_space_constraint(a, pltpu.HBM) for a in operands]


def whole(array: Any) -> pl.BlockSpec:
  """A weight's block: all of it at every grid step, so fetched once, into one buffer."""
  return pl.BlockSpec(array.shape, lambda *steps: (0,) * len(array.shape),
                      pipeline_mode=pl.Buffered(1))


@dataclasses.dataclass(frozen=True)
class CoreGrid:
  """A grid of (cores, steps per core) over `steps` blocks: the first axis parallel, one entry
  per TensorCore of a megacore chip where the steps split evenly between two; the second a
  sequential loop, whose steps add their weights' gradients into their core's float32 block
  (`sums`), the partial sums added outside."""
  steps: int

  @property
  def cores(self) -> int:
    return 2 if self.steps % 2 == 0 else 1

  @property
  def shape(self) -> tuple[int, int]:
    return (self.cores, self.steps // self.cores)

  def step(self, core: Any, step: Any) -> Any:
    """The block (along the arrays' first axis) of grid step (core, step)."""
    return core * (self.steps // self.cores) + step

  def blocks(self, block_shape: Sequence[int]) -> pl.BlockSpec:
    """Blocks of `block_shape` along an array's first axis, one per grid step."""
    rest = (0,) * (len(block_shape) - 1)
    return pl.BlockSpec(tuple(block_shape), lambda c, s, *_: (self.step(c, s), *rest))

  def sums(self, weights: Sequence[Any]) -> tuple[list[jax.ShapeDtypeStruct], list[pl.BlockSpec]]:
    """The outputs of the weights' gradient sums, float32 (cores, *weight shape), and their
    blocks: core c's at every step of its loop."""
    structs = [jax.ShapeDtypeStruct((self.cores, *w.shape), jnp.float32) for w in weights]
    specs = [pl.BlockSpec((1, *w.shape), lambda c, s, *_, n=len(w.shape): (c,) + (0,) * n)
             for w in weights]
    return structs, specs


def call(kernel: Callable[..., None], operands: Sequence[jax.Array], *,
         out_shape: Sequence[jax.ShapeDtypeStruct], grid: tuple[int, ...],
         in_specs: Sequence[pl.BlockSpec], out_specs: Sequence[pl.BlockSpec],
         cost: pl.CostEstimate, interpret: bool | None, scratch_shapes: Sequence[Any] = (),
         dimension_semantics: Sequence[str] = ('parallel', 'arbitrary'),
         scalar_prefetch: int = 0) -> Any:
  """`pl.pallas_call(kernel, ...)(*operands)` within `limit()` of scoped VMEM.

  Args:
    kernel: the kernel (its static arguments bound).
    operands: the operands: first `scalar_prefetch` in SMEM, then one per `in_specs`.
    out_shape, grid, in_specs, out_specs, scratch_shapes: as `pl.pallas_call` takes them.
    dimension_semantics: per grid axis, 'parallel' or 'arbitrary' (default: a `CoreGrid`'s).
    cost: the kernel's declared cost.
    interpret: Pallas's interpreter (True), Mosaic with the operands kept in HBM (False), or by
      the platform the computation is lowered for (None: Mosaic on TPUs).
    scalar_prefetch: operands prefetched into SMEM before the grid, passed to the index maps
      and first to the kernel (`pltpu.PrefetchScalarGridSpec`).
  """
  if interpret is None:
    run = lambda flag: lambda *x: call(
        kernel, x, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        dimension_semantics=dimension_semantics, cost=cost, interpret=flag,
        scratch_shapes=scratch_shapes, scalar_prefetch=scalar_prefetch)
    return jax.lax.platform_dependent(*operands, tpu=run(False), default=run(True))
  blocks = dict(grid=grid, in_specs=list(in_specs), out_specs=list(out_specs),
                scratch_shapes=list(scratch_shapes))
  if scalar_prefetch:
    blocks = dict(grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=scalar_prefetch,
                                                         **blocks))
  return pl.pallas_call(
      kernel, out_shape=list(out_shape), **blocks,
      compiler_params=pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics),
                                           vmem_limit_bytes=limit()),
      cost_estimate=cost, interpret=interpret,
  )(*(operands if interpret else in_hbm(operands)))


def core_sums(partials: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  """The weights' gradients of one device: the float32 partial sums of each TensorCore
  (`CoreGrid.sums`, (cores, *weight shape) each) added."""
  return tuple(g.sum(axis=0) for g in partials)


def like_weights(gradients: Sequence[jax.Array],
                 weights: Sequence[Any]) -> tuple[jax.Array, ...]:
  """The weights' gradients (float32 sums) in the weights' own dtypes, as autodiff returns them."""
  return tuple(g.astype(w.dtype) for g, w in zip(gradients, weights))


# ---------------------------------------------------------------------------------------------
# Kernel code.

def normalise(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """x (tokens, C) float32 normalised (zero mean, unit variance), and 1 / std (tokens, 1)."""
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  return centred * rstd, rstd


def normalise_transpose(dxhat: jax.Array, xhat: jax.Array, rstd: jax.Array) -> jax.Array:
  """The transpose of `normalise` at x for the cotangent dxhat of its output (float32)."""
  return rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
