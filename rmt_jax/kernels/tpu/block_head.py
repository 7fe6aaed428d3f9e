"""The first half of a `RetBlock` up to the attention as Pallas TPU kernels (`kernels='tpu'`):
x1 = x + pos(x), and MaSA's q, k, v = (LN(x1) W_i + b_i) s_i.

`block_first_half` computes what `layers.ManhattanSelfAttention` computes from the block's input
when it is given `pos` (the block's 3 x 3 depthwise conv): the residual stream after `pos`, and
the q, k, v projections of its layer norm (k times key_dim ** -0.5). XLA runs `pos` as a
convolution with layout copies around it and the projections kernel (`tpu_projections`) after
it: x1 goes to HBM and is read back, and the backward pass adds the two cotangents of x1 and
takes the convolution's transposes in passes of their own (`pos` with its copies and prefetches
moved a sixth of the RMT-S train step's bytes, `tpu_compile --traffic`). Here:

- The forward kernel reads x and writes x1, q, k and v. The backward kernel reads x, x1 (an
  output of the forward, kept for the second half's backward anyway), the cotangent of x1 from
  the rest of the block and those of q, k, v; it writes dx and the gradients of `pos`, the norm
  and the projections.
- It is `tpu_projections` with `pos` in front, in `tpu_block_tail`'s blocks and bands: arrays as
  image rows (b h, w, C), flattened in VMEM; a grid step holds whole images, or part of one
  image with the rows above and below it read as blocks of one row (`tpu_bands.with_halo_rows`);
  a band reaches its neighbours through `tpu_bands.Neighbours`. The backward needs the
  cotangent of x1 on the band's halo (the conv's transpose reads it there): the norm's
  transpose and the projections' input gradient are recomputed on the halo tokens.
- An output read by two consumers (MaSA's q and k by the row and the column pass, v by the
  attention and LePE) comes back once per consumer (`uses`; the same array, nothing written
  twice), so that their cotangents reach the backward kernel apart and are summed in VMEM:
  autodiff would add them in passes over HBM of their own.
- Roundings are the plain form's: the conv of x in the compute dtype (float32 sums), its bias
  added in the compute dtype, x1 in the stream's dtype; the norm and the projections as
  `tpu_projections`.
- `Shape.plan` chooses rows per step and band within `common.budget()` by its own estimate
  (`Shape.vmem_bytes`). Where none fits with a cotangent per use, MaSA takes the kernel with
  one per output (autodiff adds the others'); where none fits at all (`fits_vmem`), it runs
  `pos` plainly and the projections kernel (or the plain projections) after it.

Both kernels declare their true cost (`cost_estimates`). As the other kernels, they run per
device under a context mesh (`common.per_device`: a `shard_map` over images) and keep their
operands in HBM (`common.in_hbm`).
"""

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rmt_jax.kernels.tpu import bands as tpu_bands
from rmt_jax.kernels.tpu import common

# Tokens per grid step are kept at most this where whole images fit (as the FFN kernel's).
_BLOCK_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the kernels cover a device's image rows, as `tpu_block_tail.Plan` (without chunks).

  Attributes:
    block_rows: image rows per grid step: whole images (a multiple of the height), or part of
      one image (a divisor of the height) with the rows above and below it.
    band: tokens per band; each band also takes `Shape.halo` tokens either side.
  """
  block_rows: int
  band: int


@dataclasses.dataclass(frozen=True)
class Shape:
  """The static description of one call.

  Attributes:
    images, height, width: the device's images and their size in tokens.
    dim: C, channels of x and of each projection.
    outputs: number of projections.
    itemsize: bytes per element of the compute dtype (q, k, v, the weights).
    stream_itemsize: bytes per element of x and x1.
    cotangents: the backward's cotangents of the projections' outputs: one per output and use
      (see `block_first_half`'s `uses`).
  """
  images: int
  height: int
  width: int
  dim: int
  outputs: int
  itemsize: int
  stream_itemsize: int
  cotangents: int = 3

  @property
  def tokens(self) -> int:
    return self.images * self.height * self.width

  @property
  def halo(self) -> int:
    return tpu_bands.halo(self.width, 1)

  def vmem_bytes(self, plan: Plan) -> int:
    """The backward kernel's VMEM (the larger) under `plan`: x, x1, dx1 (stream dtype) and the
    outputs' cotangents (compute dtype, one per use) in, dx out, as double-buffered (rows,
    width padded to the sublane tile, C) blocks (two rows more for part of an image); flat
    copies of the inputs with halos and of dx; the weights once and their float32 gradient
    sums twice; float32 temporaries: twelve (band + 2 halo, C) and one (C, C) product."""
    rows = plan.block_rows + (2 if plan.block_rows < self.height else 0)
    tokens = plan.block_rows * self.width
    extended = plan.band + 2 * self.halo
    lanes = tpu_bands.lanes(self.dim)
    padded = lambda itemsize: -(-self.width // (32 // itemsize)) * (32 // itemsize)
    compute, stream, n = self.itemsize, self.stream_itemsize, self.cotangents
    blocks = 2 * rows * lanes * (padded(compute) * n * compute + padded(stream) * 4 * stream)
    flat = lanes * ((tokens + 2 * self.halo) * (n * compute + 3 * stream) + tokens * stream)
    matrices = self.dim * self.outputs * lanes
    vectors = 16 * (self.outputs + 6) * lanes
    weights = (matrices + vectors) * (compute + 2 * 4)
    temporaries = 12 * lanes * extended * 4 + self.dim * lanes * 4
    return blocks + flat + weights + temporaries

  @functools.cached_property
  def plan(self) -> Plan | None:
    """The plan with the longest bands, then the most rows per step, within
    `common.budget()`: blocks of whole images (up to `_BLOCK_TOKENS` tokens where one fits)
    where any fits, else of part of an image (rows dividing the height, in whole bfloat16
    tiles of tokens); None if none fits."""
    pixels = self.height * self.width
    images = [d * self.height for d in range(self.images, 0, -1)
              if self.images % d == 0 and d * pixels <= _BLOCK_TOKENS] or [self.height]
    parts = [r for r in range(self.height - 1, 0, -1)
             if self.height % r == 0 and (r * self.width) % tpu_bands.TILE == 0]
    for rows in (images, parts):
      plans = [Plan(block_rows, band) for block_rows in rows
               for band in tpu_bands.bands(block_rows * self.width, self.halo)]
      fitting = [p for p in plans if self.vmem_bytes(p) <= common.budget()]
      if fitting:
        return max(fitting, key=lambda p: (p.band, p.block_rows))
    return None

  @property
  def steps(self) -> int:
    return self.images * self.height // self.plan.block_rows

  @property
  def cores(self) -> int:
    """Partial weight-gradient sums, one per TensorCore (`common.CoreGrid`)."""
    return common.CoreGrid(self.steps).cores

  @property
  def blocks_per_image(self) -> int:
    """Grid steps per image: 1 for blocks of whole images."""
    return max(self.height // self.plan.block_rows, 1)


def fits_vmem(x_shape: Sequence[int], outputs: int, itemsize: int, stream_itemsize: int,
              uses: Sequence[int] | None = None) -> bool:
  """Whether `block_first_half` has a plan within `common.budget()` for x of `x_shape`
  (b, h, w, C), `outputs` projections and `uses` consumers of each (default one), the batch
  split over the context mesh's devices."""
  batch, height, width, dim = x_shape
  return Shape(common.images_per_device(batch), height, width, dim, outputs, itemsize,
               stream_itemsize, sum(uses or (1,) * outputs)).plan is not None


def cost_estimates(shape: Shape) -> tuple[pl.CostEstimate, pl.CostEstimate]:
  """The forward and backward kernels' costs, from the shapes alone.

  Flops: forward, the conv's 2 x 9 C per token on the bands with their halos, the residual
  and the conv's bias 2 C, the norm's 8 C and the projections' 2 C^2 each per token; backward,
  on the bands with their halos the norm (8 C) and its transpose (12 C), the projections' input
  gradients (2 C^2 each), the residual (C) and the sum of each output's cotangents over its
  uses, and per token the weight gradients (2 C^2 each), the conv's transpose and its taps'
  gradient (2 x 2 x 9 C) and the residual (C). Transcendentals: a reciprocal square root per
  token (backward: with the halos). Bytes: every block read or written once (the backward's
  cotangents once per use), the rows above and below a block of part of an image, the weights
  once, and the backward's float32 gradient sums once per core.
  """
  n, c, k, plan = shape.tokens, shape.dim, shape.outputs, shape.plan
  extra = shape.cotangents - k  # cotangents beyond one per output: added in the kernel
  extended = n // plan.band * (plan.band + 2 * shape.halo)
  compute, stream = shape.itemsize, shape.stream_itemsize
  weights_count = c * c * k + c * k + 10 * c  # projections; taps and the conv's bias
  weights = weights_count * compute + 2 * c * 4  # and the norm's float32 scale and shift
  array = n * c
  edge = 2 * shape.steps * shape.width * c if shape.blocks_per_image > 1 else 0
  forward = pl.CostEstimate(
      flops=18 * c * extended + (10 * c + 2 * c * c * k) * n,
      transcendentals=n,
      bytes_accessed=(array + edge) * stream + array * (stream + k * compute) + weights)
  backward = pl.CostEstimate(
      flops=(21 * c + 2 * c * c * k + extra * c) * extended
      + (2 * c * c * k + 37 * c) * n,
      transcendentals=extended,
      bytes_accessed=(array + edge) * (3 * stream + shape.cotangents * compute) + array * stream
      + weights
      + shape.cores * (weights_count + 2 * c) * 4)
  return forward, backward


def _pos(x, near, taps_ref, bias_ref, compute):
  """x + conv(x) + bias over the band with its halos as the plain form rounds it (the conv of x
  in the compute dtype, its output and its bias in the compute dtype), float32; valid on the
  band."""
  xc = x.astype(compute).astype(jnp.float32)
  conv = near.conv(near.columns(xc, 1), taps_ref[...].astype(jnp.float32)).astype(compute)
  c = (conv.astype(jnp.float32) + bias_ref[...].astype(jnp.float32)).astype(compute)
  return x.astype(jnp.float32) + c.astype(jnp.float32)


def _forward_kernel(x_ref, taps_ref, cbias_ref, scale_ref, shift_ref, w_ref, b_ref, *refs,
                    height, width, band, halo, eps, scales, blocks_per_image):
  outputs = len(scales)
  edges, refs = tpu_bands.split_edges(refs, 1, blocks_per_image)
  x1_ref, out_refs = refs[0], refs[1:1 + outputs]
  x_padded, x1_flat, out_flats = refs[1 + outputs], refs[2 + outputs], refs[3 + outputs:]
  dim = x_ref.shape[-1]
  tokens = x_ref.size // dim
  compute = w_ref.dtype
  tpu_bands.with_halo_rows(x_padded, x_ref, edges[0], halo, width)
  kept = slice(halo, halo + band)
  block = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
  offset = tpu_bands.block_offset(block, blocks_per_image, tokens)

  def body(first):
    x = x_padded[pl.ds(first, band + 2 * halo), :]
    near = tpu_bands.Neighbours(band + 2 * halo, height, width, first - halo + offset)
    x1 = _pos(x, near, taps_ref, cbias_ref, compute)[kept].astype(x1_flat.dtype)
    x1_flat[pl.ds(first, band), :] = x1
    xhat, _ = common.normalise(x1.astype(jnp.float32), eps)
    xn = (xhat * scale_ref[...] + shift_ref[...]).astype(compute)
    for i, (ref, s) in enumerate(zip(out_flats, scales)):
      columns = slice(i * dim, (i + 1) * dim)
      y = (jnp.dot(xn, w_ref[:, columns], preferred_element_type=jnp.float32).astype(compute)
           + b_ref[:, columns])
      if s != 1.0:
        y = y * jnp.asarray(s, compute)
      ref[pl.ds(first, band), :] = y

  tpu_bands.for_each_band(tokens, band, body)
  x1_ref[...] = x1_flat[...].reshape(x1_ref.shape)
  for ref, flat in zip(out_refs, out_flats):
    ref[...] = flat[...].reshape(ref.shape)


def _backward_kernel(x_ref, x1_ref, dx1_ref, *refs, height, width, band, halo, eps, scales,
                     blocks_per_image, uses):
  outputs = len(scales)
  cotangents = sum(uses)  # each output's uses' in turn
  dy_refs = refs[:cotangents]
  taps_ref, cbias_ref, scale_ref, shift_ref, w_ref, b_ref = refs[cotangents:cotangents + 6]
  edges, refs = tpu_bands.split_edges(refs[cotangents + 6:], 3 + cotangents, blocks_per_image)
  (dx_ref, dtaps_ref, dcbias_ref, dscale_ref, dshift_ref, dw_ref, db_ref), refs = (
      refs[:7], refs[7:])
  padded, dx_flat = refs[:3 + cotangents], refs[3 + cotangents]
  sums = (dtaps_ref, dcbias_ref, dscale_ref, dshift_ref, dw_ref, db_ref)

  @pl.when(pl.program_id(1) == 0)
  def _():
    for ref in sums:
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  dim = x_ref.shape[-1]
  tokens = x_ref.size // dim
  compute, stream = w_ref.dtype, x1_ref.dtype
  for ref, pad, edge in zip((x_ref, x1_ref, dx1_ref, *dy_refs), padded, edges):
    tpu_bands.with_halo_rows(pad, ref, edge, halo, width)
  x_padded, x1_padded, dx1_padded, dy_padded = padded[0], padded[1], padded[2], padded[3:]
  kept = slice(halo, halo + band)
  block = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
  offset = tpu_bands.block_offset(block, blocks_per_image, tokens)
  scale = scale_ref[...]

  def body(first):
    extended = pl.ds(first, band + 2 * halo)
    # The norm and the projections' transposes over the band with its halos: the conv's
    # transpose reads x1's cotangent at the band's neighbours.
    xhat, rstd = common.normalise(x1_padded[extended, :].astype(jnp.float32), eps)
    xn = (xhat * scale + shift_ref[...]).astype(compute)
    dxn = jnp.zeros(xhat.shape, jnp.float32)
    for i, s in enumerate(scales):
      columns = slice(i * dim, (i + 1) * dim)
      first_use = sum(uses[:i])
      dy = dy_padded[first_use][extended, :]
      if uses[i] > 1:  # the uses' cotangents summed in the compute dtype, as autodiff sums them
        dy = sum(dy_padded[first_use + u][extended, :].astype(jnp.float32)
                 for u in range(1, uses[i])) + dy.astype(jnp.float32)
        dy = dy.astype(compute)
      if s != 1.0:
        dy = dy * jnp.asarray(s, compute)
      dw_ref[0, :, columns] += jax.lax.dot_general(xn[kept], dy[kept], common.TRANS_A,
                                                   preferred_element_type=jnp.float32)
      db_ref[0, :, columns] += jnp.sum(dy[kept].astype(jnp.float32), axis=0, keepdims=True)
      dxn = dxn + jax.lax.dot_general(dy, w_ref[:, columns], common.TRANS_B,
                                      preferred_element_type=jnp.float32)
    dscale_ref[0] += jnp.sum((dxn * xhat)[kept], axis=0, keepdims=True)
    dshift_ref[0] += jnp.sum(dxn[kept], axis=0, keepdims=True)
    dxhat = dxn * scale
    dnorm = common.normalise_transpose(dxhat, xhat, rstd)
    # x1's cotangent: the rest of the block's plus the norm's (in the stream's dtype, as the
    # plain form adds them).
    dx1 = (dx1_padded[extended, :].astype(jnp.float32)
           + dnorm.astype(stream).astype(jnp.float32)).astype(stream).astype(jnp.float32)
    # x1 = x + c, c = conv(x) + bias in the compute dtype: c's cotangent, rounded.
    dc = dx1.astype(compute).astype(jnp.float32)
    dcbias_ref[0] += jnp.sum(dc[kept], axis=0, keepdims=True)
    near = tpu_bands.Neighbours(band + 2 * halo, height, width, first - halo + offset)
    xc = x_padded[extended, :].astype(compute).astype(jnp.float32)
    columns = near.columns(xc, 1)
    moved_rows = near.conv_transpose_rows(dc, 1)
    dtaps = [(moved_rows[i][kept] * columns[j][kept]).sum(axis=0, keepdims=True)
             for i in range(3) for j in range(3)]
    dtaps_ref[0] += jnp.concatenate(dtaps, axis=0)
    # The conv's input was x in the compute dtype: its cotangent rounded to it.
    dxc = near.conv_transpose(moved_rows, taps_ref[...].astype(jnp.float32))[kept]
    dx = dx1[kept] + dxc.astype(compute).astype(jnp.float32)
    dx_flat[pl.ds(first, band), :] = dx.astype(dx_flat.dtype)

  tpu_bands.for_each_band(tokens, band, body)
  dx_ref[...] = dx_flat[...].reshape(dx_ref.shape)


def _shape(x, w, height, width, outputs, uses):
  dim = x.shape[-1]
  shape = Shape(x.shape[0] // height, height, width, dim, outputs, w.dtype.itemsize,
                x.dtype.itemsize, sum(uses))
  if shape.plan is None:
    raise ValueError(f'the block-head kernel does not fit {common.budget() / 2**20:.0f} MiB '
                     f'of VMEM for {dim} channels on {height} x {width} images (see '
                     "fits_vmem); use kernels='xla'")
  return shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _head(x, weights, height, width, eps, scales, interpret, uses):
  def forward(rows, weights):
    (x,) = rows
    shape = _shape(x, weights[4], height, width, len(scales), uses)
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    out += [jax.ShapeDtypeStruct(x.shape, weights[4].dtype)] * len(scales)
    return tuple(tpu_bands.call_on_rows(_forward_kernel, shape, (x,), weights, out, (),
                                        cost_estimates(shape)[0], interpret, eps=eps,
                                        scales=scales)), ()

  x1, *outs = common.per_device(forward, (x,), weights)[0]
  # The same array once per use: the cotangents come back apart.
  return (x1, *((out,) * n for out, n in zip(outs, uses)))


def _head_fwd(x, weights, height, width, eps, scales, interpret, uses):
  out = _head(x, weights, height, width, eps, scales, interpret, uses)
  return out, (x, out[0], weights)


def _head_bwd(height, width, eps, scales, interpret, uses, residuals, cotangents):
  x, x1, weights = residuals
  dx1, *dys = cotangents
  dys = [dy for out in dys for dy in out]  # each output's uses' in turn

  def backward(rows, weights):
    x = rows[0]
    shape = _shape(x, weights[4], height, width, len(scales), uses)
    dx, *grads = tpu_bands.call_on_rows(
        _backward_kernel, shape, rows, weights, [jax.ShapeDtypeStruct(x.shape, x.dtype)],
        weights, cost_estimates(shape)[1], interpret, eps=eps, scales=scales, uses=uses)
    return dx, common.core_sums(grads)

  compute = weights[4].dtype
  rows = (x, x1, dx1.astype(x1.dtype), *(dy.astype(compute) for dy in dys))
  dx, grads = common.per_device(backward, rows, weights)
  return dx, common.like_weights(grads, weights)


_head.defvjp(_head_fwd, _head_bwd)


def block_first_half(x: jax.Array, pos: tuple[jax.Array, jax.Array],
                     norm: tuple[jax.Array, jax.Array],
                     projections: Sequence[tuple[jax.Array, jax.Array]],
                     scales: Sequence[float], *, eps: float, dtype: jnp.dtype,
                     uses: Sequence[int] | None = None,
                     interpret: bool | None = None) -> tuple[Any, ...]:
  """x1 = x + pos(x) and (LN(x1) @ kernel_i + bias_i) * scales[i] for each projection, as a
  Pallas kernel pair.

  Args:
    x: (b, h, w, C), the residual stream (float32 or the compute dtype); x1 and dx come back
      in its dtype.
    pos: the 3 x 3 depthwise conv's (kernel (3, 3, 1, C), bias (C,)), cast to `dtype`.
    norm: the layer norm's (scale (C,), bias (C,)), applied in float32.
    projections: (kernel (C, C), bias (C,)) each, cast to `dtype`.
    scales: a constant per projection (1.0, or k's key_dim ** -0.5), applied in `dtype`.
    eps: the layer norm's epsilon.
    dtype: the compute dtype: of the conv, the matmuls and the projections' outputs.
    uses: consumers of each projection's output (default one each): the output comes back as
      a tuple of that many (the same array), and the backward kernel reads the cotangent of
      each and sums them in VMEM, where autodiff would add them in passes over HBM of their
      own (MaSA: q and k for the row and the column pass, v for the attention and LePE).
    interpret: Pallas's interpreter (True), Mosaic (False), or by the platform the computation
      is lowered for (None).

  Returns:
    (x1, *projections' outputs), each (b, h, w, C); with `uses`, each output a tuple of its
    uses. Differentiable in x and every parameter.
  """
  batch, height, width, dim = x.shape
  (taps, conv_bias), (scale, shift) = pos, norm
  if (taps.shape != (3, 3, 1, dim) or conv_bias.shape != (dim,)
      or any(p.shape != (dim,) for p in norm) or len(scales) != len(projections)
      or any(w.shape != (dim, dim) or b.shape != (dim,) for w, b in projections)):
    raise ValueError(f'a 3 x 3 depthwise conv, a norm and projections of {dim} channels with a '
                     f'scale each expected, got pos {[tuple(p.shape) for p in pos]}, norm '
                     f'{[tuple(p.shape) for p in norm]}, projections '
                     f'{[(tuple(w.shape), tuple(b.shape)) for w, b in projections]}, scales '
                     f'{tuple(scales)}')
  weights = (taps.reshape(9, dim).astype(dtype), conv_bias.reshape(1, dim).astype(dtype),
             scale.reshape(1, dim).astype(jnp.float32), shift.reshape(1, dim).astype(jnp.float32),
             jnp.concatenate([w.astype(dtype) for w, _ in projections], axis=1),
             jnp.concatenate([b.astype(dtype) for _, b in projections]).reshape(1, -1))
  count = (1,) * len(projections) if uses is None else tuple(uses)
  if len(count) != len(projections) or min(count) < 1:
    raise ValueError(f'a number of uses (at least one) per projection expected, got {uses}')
  x1, *outs = _head(x.reshape(batch * height, width, dim), weights, height, width, float(eps),
                    tuple(float(s) for s in scales), interpret, count)
  image = lambda a: a.reshape(batch, height, width, dim)
  outs = [tuple(map(image, out)) for out in outs]
  return (image(x1), *(outs if uses is not None else (out[0] for out in outs)))
