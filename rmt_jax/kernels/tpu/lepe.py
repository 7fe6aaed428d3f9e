"""MaSA's output with its local positional encoding as Pallas TPU kernels (`kernels='tpu'`):
o = attention + LePE(v), LePE a 5 x 5 depthwise conv with bias.

XLA runs LePE as a grouped convolution with layout copies and prefetches around it, forward and
backward (its conv's input and kernel gradients in passes of their own), and adds it to the
attention's output in another: LePE moved a tenth of the RMT-S train step's bytes
(`tpu_compile --traffic`). Here:

- The forward kernel reads v and the attention's output and writes o. The backward kernel reads
  v and do and writes v's cotangent from LePE and the gradients of its kernel and bias (the
  attention's cotangent is do itself).
- Arrays as image rows (b h, w, C), the layout of the projections' and the attention kernels'
  outputs, flattened in VMEM; a grid step holds whole images, in bands of tokens with a halo of
  two rows and two pixels (`tpu_bands`: the conv reaches its neighbours by rotations of the
  sublane axis). v, MaSA's compute dtype, is small enough that a whole 56 x 56 image fits.
- Roundings are the plain form's: the conv in float32 of v in the compute dtype, its output and
  its bias and the sum with the attention in the compute dtype.
- `Shape.plan` chooses images per step and band within `common.budget()` by its own estimate
  (`Shape.vmem_bytes`); where none fits (`fits_vmem`), MaSA runs the plain conv and add.

Both kernels declare their true cost (`cost_estimates`). As the other kernels, they run per
device under a context mesh (`common.per_device`: a `shard_map` over images) and keep their
operands in HBM (`common.in_hbm`).
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rmt_jax.kernels.tpu import bands as tpu_bands
from rmt_jax.kernels.tpu import common

# The conv's reach: 5 x 5 taps.
_RADIUS = 2
_TAPS = (2 * _RADIUS + 1) ** 2

# Tokens per grid step are kept near this (whole images, so that stage 1 takes one 56 x 56
# image): large enough that the step's fixed cost is small against its work.
_BLOCK_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the kernels cover a device's images.

  Attributes:
    block_images: images per grid step.
    band: tokens per band; each band also takes `Shape.halo` tokens either side.
  """
  block_images: int
  band: int


@dataclasses.dataclass(frozen=True)
class Shape:
  """The static description of one call.

  Attributes:
    images, height, width: the device's images and their size in tokens.
    dim: C, channels (heads x head dim).
    itemsize: bytes per element of the compute dtype (v, the attention's output, o).
  """
  images: int
  height: int
  width: int
  dim: int
  itemsize: int

  @property
  def tokens(self) -> int:
    return self.images * self.height * self.width

  @property
  def halo(self) -> int:
    return tpu_bands.halo(self.width, _RADIUS)

  def vmem_bytes(self, plan: Plan) -> int:
    """The backward kernel's VMEM (the larger) under `plan`: v and do in, dv out as
    double-buffered (rows, width padded to the sublane tile, C) blocks; flat copies of the
    inputs with halos and of dv; the taps and their float32 gradient sums; float32
    temporaries: fourteen (band + 2 halo, C) (five column shifts, five sums, a moved row, the
    band's do and v, a product)."""
    rows = plan.block_images * self.height
    tokens = rows * self.width
    lanes = tpu_bands.lanes(self.dim)
    padded = -(-self.width // (32 // self.itemsize)) * (32 // self.itemsize)
    blocks = 2 * 3 * rows * padded * lanes * self.itemsize
    flat = lanes * (2 * (tokens + 2 * self.halo) + tokens) * self.itemsize
    weights = 2 * 32 * lanes * (self.itemsize + 2 * 4)
    temporaries = 14 * lanes * (plan.band + 2 * self.halo) * 4
    return blocks + flat + weights + temporaries

  @functools.cached_property
  def plan(self) -> Plan | None:
    """The plan with the longest bands, then the most images per step (up to `_BLOCK_TOKENS`
    tokens where one image fits), within `common.budget()`; None if none fits."""
    pixels = self.height * self.width
    # Any whole number of images: rows arrays need no 16-token tiles in HBM.
    images = [d for d in range(self.images, 0, -1)
              if self.images % d == 0 and d * pixels <= _BLOCK_TOKENS] or [1]
    plans = [Plan(d, band) for d in images for band in tpu_bands.bands(d * pixels, self.halo)]
    fitting = [p for p in plans if self.vmem_bytes(p) <= common.budget()]
    return max(fitting, key=lambda p: (p.band, p.block_images)) if fitting else None

  @property
  def steps(self) -> int:
    return self.images // self.plan.block_images

  @property
  def cores(self) -> int:
    """Partial gradient sums, one per TensorCore (`common.CoreGrid`)."""
    return common.CoreGrid(self.steps).cores


def fits_vmem(v_shape: Sequence[int], itemsize: int) -> bool:
  """Whether `lepe_add` has a plan within `common.budget()` for v of `v_shape` (b, h, w, C),
  the batch split over the context mesh's devices."""
  batch, height, width, dim = v_shape
  return Shape(common.images_per_device(batch), height, width, dim, itemsize).plan is not None


def cost_estimates(shape: Shape) -> tuple[pl.CostEstimate, pl.CostEstimate]:
  """The forward and backward kernels' costs, from the shapes alone.

  Flops: forward, the conv's 2 x 25 C per token on the bands with their halos, its bias and the
  sum with the attention 2 C per token; backward, the conv's transpose and its taps' gradient
  (2 x 2 x 25 C per token on the bands with their halos) and the bias' gradient (C). Bytes:
  every block read or written once (forward v, the attention's output, o; backward v, do, dv),
  the taps and bias once, and the backward's float32 gradient sums once per core.
  """
  n, c, plan = shape.tokens, shape.dim, shape.plan
  extended = n // plan.band * (plan.band + 2 * shape.halo)
  array = n * c * shape.itemsize
  weights = (_TAPS + 1) * c * shape.itemsize
  forward = pl.CostEstimate(flops=2 * _TAPS * c * extended + 2 * c * n, transcendentals=0,
                            bytes_accessed=3 * array + weights)
  backward = pl.CostEstimate(flops=4 * _TAPS * c * extended + c * n, transcendentals=0,
                             bytes_accessed=3 * array + weights
                             + shape.cores * (_TAPS + 1) * c * 4)
  return forward, backward


def _forward_kernel(v_ref, a_ref, taps_ref, bias_ref, o_ref, v_padded, a_flat, o_flat, *,
                    height, width, band, halo):
  dim = v_ref.shape[-1]
  tokens = v_ref.size // dim
  tpu_bands.with_halo(v_padded, v_ref, halo)
  a_flat[...] = a_ref[...].reshape(tokens, dim)
  compute = o_ref.dtype
  taps = taps_ref[...].astype(jnp.float32)

  k = 2 * _RADIUS + 1

  def body(first):
    v = v_padded[pl.ds(first, band + 2 * halo), :].astype(jnp.float32)
    near = tpu_bands.Neighbours(band + 2 * halo, height, width, first - halo)
    columns = near.columns(v, _RADIUS)
    # `Neighbours.conv`, each tap row's sum shifted and added as it is made: fewer float32
    # temporaries live at once.
    conv = 0.0
    for i in range(k):
      row = sum(taps[k * i + j] * columns[j] for j in range(k))
      conv = conv + near.shift(row, i - _RADIUS, 0)
    conv = conv[halo:halo + band].astype(compute)
    lepe = (conv.astype(jnp.float32) + bias_ref[...].astype(jnp.float32)).astype(compute)
    o = a_flat[pl.ds(first, band), :].astype(jnp.float32) + lepe.astype(jnp.float32)
    o_flat[pl.ds(first, band), :] = o.astype(compute)

  tpu_bands.for_each_band(tokens, band, body)
  o_ref[...] = o_flat[...].reshape(o_ref.shape)


def _backward_kernel(v_ref, do_ref, taps_ref, bias_ref, dv_ref, dtaps_ref, dbias_ref, v_padded,
                     do_padded, dv_flat, *, height, width, band, halo):
  @pl.when(pl.program_id(1) == 0)
  def _():
    for ref in (dtaps_ref, dbias_ref):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  dim = v_ref.shape[-1]
  tokens = v_ref.size // dim
  tpu_bands.with_halo(v_padded, v_ref, halo)
  tpu_bands.with_halo(do_padded, do_ref, halo)
  taps = taps_ref[...].astype(jnp.float32)
  kept = slice(halo, halo + band)
  k = 2 * _RADIUS + 1

  def body(first):
    extended = pl.ds(first, band + 2 * halo)
    near = tpu_bands.Neighbours(band + 2 * halo, height, width, first - halo)
    # LePE's output was added to the attention's in the compute dtype: its cotangent is do.
    dz = do_padded[extended, :].astype(jnp.float32)
    dbias_ref[0] += jnp.sum(dz[kept], axis=0, keepdims=True)
    columns = near.columns(v_padded[extended, :].astype(jnp.float32), _RADIUS)
    # `Neighbours.conv_transpose` and the taps' gradient (see there), one moved row at a time:
    # fewer float32 temporaries live at once.
    sums = [0.0] * k
    for i in range(k):
      moved = near.shift(dz, _RADIUS - i, 0)
      dtaps = [(moved[kept] * columns[j][kept]).sum(axis=0, keepdims=True) for j in range(k)]
      dtaps_ref[0, pl.ds(k * i, k), :] += jnp.concatenate(dtaps, axis=0)
      sums = [sums[j] + taps[k * i + j] * moved for j in range(k)]
    dv = sum(near.shift(sums[j], 0, _RADIUS - j) for j in range(k))[kept]
    dv_flat[pl.ds(first, band), :] = dv.astype(dv_flat.dtype)

  tpu_bands.for_each_band(tokens, band, body)
  dv_ref[...] = dv_flat[...].reshape(dv_ref.shape)


def _call(kernel, shape, arrays, weights, cost, interpret):
  """`kernel` over blocks of whole images: `arrays` by image rows, `weights` whole at every
  step. It gives a rows array in the arrays' shape and dtype (through a flat VMEM copy), and in
  the backward the weights' float32 gradient sums per core (`common.CoreGrid`). Scratch for
  the kernel: flat copies of the inputs (with halos, but the forward's attention output) and
  of the output."""
  backward = kernel is _backward_kernel
  grid = common.CoreGrid(shape.steps)
  rows = shape.plan.block_images * shape.height
  tokens = rows * shape.width
  row_block = grid.blocks((rows, shape.width, shape.dim))
  sums, sum_specs = grid.sums(weights if backward else ())
  dtype = arrays[0].dtype
  # v with halos; the forward's attention output without (its values are only added).
  scratch = ([pltpu.VMEM((tokens + (2 * shape.halo if h else 0), shape.dim), dtype)
              for h in (True, backward)]
             + [pltpu.VMEM((tokens, shape.dim), dtype)])
  return common.call(
      functools.partial(kernel, height=shape.height, width=shape.width, band=shape.plan.band,
                        halo=shape.halo),
      (*arrays, *weights), out_shape=[jax.ShapeDtypeStruct(arrays[0].shape, dtype), *sums],
      grid=grid.shape, in_specs=[row_block] * len(arrays) + [common.whole(w) for w in weights],
      out_specs=[row_block, *sum_specs], scratch_shapes=scratch, cost=cost, interpret=interpret)


def _shape(v, height, width):
  shape = Shape(v.shape[0] // height, height, width, v.shape[-1], v.dtype.itemsize)
  if shape.plan is None:
    raise ValueError(f'the LePE kernel does not fit {common.budget() / 2**20:.0f} MiB of VMEM '
                     f'for {shape.dim} channels on {height} x {width} images (see fits_vmem); '
                     "use kernels='xla'")
  return shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lepe_add(attention, v, weights, height, width, interpret):
  def forward(arrays, weights):
    shape = _shape(arrays[0], height, width)
    return _call(_forward_kernel, shape, arrays, weights, cost_estimates(shape)[0],
                 interpret)[0], ()

  return common.per_device(forward, (v, attention), weights)[0]


def _lepe_add_fwd(attention, v, weights, height, width, interpret):
  return _lepe_add(attention, v, weights, height, width, interpret), (v, weights)


def _lepe_add_bwd(height, width, interpret, residuals, do):
  v, weights = residuals

  def backward(arrays, weights):
    shape = _shape(arrays[0], height, width)
    dv, *grads = _call(_backward_kernel, shape, arrays, weights, cost_estimates(shape)[1],
                       interpret)
    return dv, common.core_sums(grads)

  do = do.astype(v.dtype)
  dv, grads = common.per_device(backward, (v, do), weights)
  return do, dv, common.like_weights(grads, weights)


_lepe_add.defvjp(_lepe_add_fwd, _lepe_add_bwd)


def lepe_add(attention: jax.Array, v: jax.Array, kernel: jax.Array, bias: jax.Array, *,
             interpret: bool | None = None) -> jax.Array:
  """attention + DWConv5x5(v) + bias (zero padding 2) in v's dtype, as a Pallas kernel pair.

  Args:
    attention: (b, h, w, C), MaSA's attention output, in v's dtype.
    v: (b, h, w, C), the value projection, in the compute dtype.
    kernel: (5, 5, 1, C), the conv's taps (`DepthwiseConv`'s layout), cast to v's dtype.
    bias: (C,), cast to v's dtype.
    interpret: Pallas's interpreter (True), Mosaic (False), or by the platform the computation
      is lowered for (None).

  Returns:
    (b, h, w, C) in v's dtype; differentiable in every argument.
  """
  batch, height, width, dim = v.shape
  if (attention.shape != v.shape or attention.dtype != v.dtype
      or kernel.shape != (5, 5, 1, dim) or bias.shape != (dim,)):
    raise ValueError(f'attention and v of one shape and dtype, a (5, 5, 1, {dim}) kernel and a '
                     f'({dim},) bias expected, got attention {attention.shape} '
                     f'{attention.dtype}, v {v.shape} {v.dtype}, kernel {kernel.shape}, bias '
                     f'{bias.shape}')
  weights = (kernel.reshape(_TAPS, dim).astype(v.dtype), bias.reshape(1, dim).astype(v.dtype))
  rows = lambda a: a.reshape(batch * height, width, dim)
  return _lepe_add(rows(attention), rows(v), weights, height, width, interpret).reshape(v.shape)
