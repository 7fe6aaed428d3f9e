"""The second half of a `RetBlock` as Pallas TPU kernels (`kernels='tpu'`):
x3 = x2 + s2 gamma2 FFN(LN(x2)), x2 = x1 + s1 gamma1 out_proj(o).

`block_second_half` computes `layers.block_second_half`: o is MaSA's output before its out_proj
(the attention plus LePE), x1 the residual stream after `pos`, s1 and s2 drop path's per-image
scales, gamma1 and gamma2 layerscale's. XLA runs the plain form as separate fusions: out_proj's
output, x2 and the norm's output each go to HBM and back, and are kept for the backward pass.
Here:

- The forward kernel reads o and x1 and writes x3; nothing else of the block's second half
  touches HBM. The backward kernel reads o, x1 and dx3, recomputes x2, the norm and the FFN's
  hidden layer, and writes dx1 (= dx2), do and the gradients of out_proj, the norm, the FFN and
  the gammas (gamma2's only with layerscale: it takes fc2 once more).
- It is the FFN kernel (`tpu_feed_forward`: whole images per grid step, bands with halos of a
  row and a pixel, hidden channels in chunks; the backward's chunk loop is shared) with out_proj,
  the residual and the norm in front: they are per token, so a band recomputes them on its halo
  tokens too.
- Arrays go in and out as image rows (b h, w, C) and are flattened in VMEM: flattening the rows
  of 14-56 tokens to (tokens, C) in HBM would be a relayout, which XLA inserts as copies (with
  2-D arrays a stand-in gained a third less).
- A grid step holds whole images where one fits VMEM (any whole number of them: the rows need
  no 16-token tiles in HBM), else part of one image, a divisor of its rows, with the row above
  and the row below read as blocks of one row each for the bands' halos (stage 1, whose
  56 x 56 image with five double-buffered arrays, 64 channels padded to 128 lanes, takes 9-13
  MiB on its own: 8 rows a step, two more read).
- Drop path's scales are per image, (2, b) float32 in SMEM (scalar prefetch); a token finds its
  image's scale by the same float floor as `tpu_bands.Neighbours` finds its row.
- `Shape.plan` chooses rows per step, band and chunk within `common.budget()` by its own
  estimate (`Shape.vmem_bytes`). Every plan it gives for RMT-T/S/B/L at 224 px and 64 images
  per chip compiles for a v4 and a v5p (float32 and bfloat16 streams): stages 1-3 of RMT-T and
  -S, 1-2 of RMT-B and -L. The others' weights with their float32 gradients leave too little
  VMEM (as for the FFN kernel): there (`fits_vmem`), `RetBlock` runs the plain second half.

Both kernels declare their true cost (`cost_estimates`). As the other kernels, they run per
device under a context mesh (`common.per_device`: a `shard_map` over images) and keep their
operands in HBM (`common.in_hbm`).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rmt_jax.kernels.tpu import bands as tpu_bands
from rmt_jax.kernels.tpu import feed_forward as ffn
from rmt_jax.kernels.tpu import common


def _token_scales(scales_ref, row, images, block, block_images, pixels, first, tokens):
  """Drop path's per-image scales (`scales_ref[row * images + image]`, SMEM) for `tokens`
  tokens from the block's token `first` (halo tokens beyond the block take its edge images'):
  (tokens, 1) float32. Images from a float floor, as `tpu_bands.Neighbours` (no vector integer
  division in Mosaic)."""
  t = (jax.lax.broadcasted_iota(jnp.int32, (tokens, 1), 0) + first).astype(jnp.float32)
  image = jnp.clip(jnp.floor((t + 0.5) * (1.0 / pixels)), 0, block_images - 1)
  out = jnp.zeros((tokens, 1), jnp.float32)
  for i in range(block_images):
    out = jnp.where(image == i, scales_ref[row * images + block * block_images + i], out)
  return out


def _second_half_input(o, x1, wo_ref, bo_ref, scale_ref, shift_ref, eps, s1, gamma1):
  """x2 = x1 + s1 gamma1 out_proj(o) (out_proj's output rounded to o's dtype, as the plain
  form's), and the norm: xhat, 1 / std and LN(x2) in the compute dtype; and out_proj's output
  p (float32), for gamma1's gradient."""
  p = (jnp.dot(o, wo_ref[...], preferred_element_type=jnp.float32).astype(o.dtype)
       + bo_ref[...]).astype(jnp.float32)
  branch = p * gamma1 * s1
  # The plain form's x2 is in the stream's dtype.
  x2 = (x1.astype(jnp.float32) + branch).astype(x1.dtype).astype(jnp.float32)
  xhat, rstd = common.normalise(x2, eps)
  xn = (xhat * scale_ref[...] + shift_ref[...]).astype(o.dtype)
  return x2, xhat, rstd, xn, p


def _forward_kernel(scales_ref, o_ref, x1_ref, wo_ref, bo_ref, scale_ref, shift_ref, w1_ref,
                    b1_ref, taps_ref, bias_ref, w2_ref, b2_ref, gamma_ref, *refs, height, width,
                    band, halo, chunk, eps, images, block_images, blocks_per_image):
  edges, (x3_ref, o_padded, x1_padded, x3_flat) = tpu_bands.split_edges(refs, 2,
                                                                     blocks_per_image)
  dim = o_ref.shape[-1]
  tokens = o_ref.size // dim
  tpu_bands.with_halo_rows(o_padded, o_ref, edges[0], halo, width)
  tpu_bands.with_halo_rows(x1_padded, x1_ref, edges[1], halo, width)
  kept = slice(halo, halo + band)
  block = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)  # grid step: image block
  offset = tpu_bands.block_offset(block, blocks_per_image, tokens)

  def body(first):
    extended = pl.ds(first, band + 2 * halo)
    scales = [_token_scales(scales_ref, r, images, block, block_images, height * width,
                            first - halo, band + 2 * halo) for r in range(2)]
    x2, _, _, xn, _ = _second_half_input(o_padded[extended, :], x1_padded[extended, :], wo_ref,
                                         bo_ref, scale_ref, shift_ref, eps, scales[0],
                                         gamma_ref[0:1, :])
    near = tpu_bands.Neighbours(band + 2 * halo, height, width, first - halo + offset)
    y = jnp.broadcast_to(b2_ref[...].astype(jnp.float32), (band, dim))
    for start in range(0, w1_ref.shape[1], chunk):
      channels = pl.ds(start, chunk)
      z = ffn._hidden(xn, w1_ref, b1_ref, taps_ref, bias_ref, near, channels)[3]
      y = y + jnp.dot(z[kept].astype(xn.dtype), w2_ref[channels, :],
                      preferred_element_type=jnp.float32)
    # The plain form's FFN returns y in the compute dtype; the residual add is float32.
    x3 = x2[kept] + (y.astype(xn.dtype).astype(jnp.float32) * gamma_ref[1:2, :]
                     * scales[1][kept])
    x3_flat[pl.ds(first, band), :] = x3.astype(x3_flat.dtype)

  tpu_bands.for_each_band(tokens, band, body)
  x3_ref[...] = x3_flat[...].reshape(x3_ref.shape)


def _backward_kernel(scales_ref, o_ref, x1_ref, dx3_ref, wo_ref, bo_ref, scale_ref, shift_ref,
                     w1_ref, b1_ref, taps_ref, bias_ref, w2_ref, b2_ref, gamma_ref,
                     *refs, height, width, band, halo, chunk, eps, images, block_images,
                     blocks_per_image, layerscale):
  edges, refs = tpu_bands.split_edges(refs, 3, blocks_per_image)
  (dx1_ref, do_ref, dwo_ref, dbo_ref, dscale_ref, dshift_ref, dw1_ref, db1_ref, dtaps_ref,
   dbias_ref, dw2_ref, db2_ref, dgamma_ref, o_padded, x1_padded, dx3_padded, dx1_flat,
   do_flat) = refs
  sums = (dwo_ref, dbo_ref, dscale_ref, dshift_ref, dw1_ref, db1_ref, dtaps_ref, dbias_ref,
          dw2_ref, db2_ref, dgamma_ref)

  @pl.when(pl.program_id(1) == 0)
  def _():
    for ref in sums:
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  dim = o_ref.shape[-1]
  tokens = o_ref.size // dim
  tpu_bands.with_halo_rows(o_padded, o_ref, edges[0], halo, width)
  tpu_bands.with_halo_rows(x1_padded, x1_ref, edges[1], halo, width)
  tpu_bands.with_halo_rows(dx3_padded, dx3_ref, edges[2], halo, width)
  kept = slice(halo, halo + band)
  compute = o_ref.dtype
  gamma1, gamma2 = gamma_ref[0:1, :], gamma_ref[1:2, :]
  block = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)  # grid step: image block
  offset = tpu_bands.block_offset(block, blocks_per_image, tokens)

  def body(first):
    extended = pl.ds(first, band + 2 * halo)
    scales = [_token_scales(scales_ref, r, images, block, block_images, height * width,
                            first - halo, band + 2 * halo) for r in range(2)]
    o = o_padded[extended, :]
    _, xhat, rstd, xn, p = _second_half_input(o, x1_padded[extended, :], wo_ref, bo_ref,
                                              scale_ref, shift_ref, eps, scales[0], gamma1)
    dx3 = dx3_padded[extended, :].astype(jnp.float32)
    # x3 = x2 + s2 gamma2 y, y the FFN's output in the compute dtype: its cotangent, rounded.
    dy = (dx3 * scales[1] * gamma2).astype(compute)
    db2_ref[0] += dy[kept].astype(jnp.float32).sum(axis=0, keepdims=True)
    near = tpu_bands.Neighbours(band + 2 * halo, height, width, first - halo + offset)
    dxn = jnp.zeros((band, dim), jnp.float32)
    y = jnp.broadcast_to(b2_ref[...].astype(jnp.float32), (band, dim))  # for gamma2's gradient
    for start in range(0, w1_ref.shape[1], chunk):
      channels = pl.ds(start, chunk)
      part, z = ffn.backward_chunk(xn, dy, near, kept, channels,
                                   (w1_ref, b1_ref, taps_ref, bias_ref, w2_ref),
                                   (dw1_ref, db1_ref, dtaps_ref, dbias_ref, dw2_ref))
      dxn = dxn + part
      if layerscale:  # gamma2's gradient needs the FFN's output: fc2 once more
        y = y + jnp.dot(z[kept].astype(compute), w2_ref[channels, :],
                        preferred_element_type=jnp.float32)
    # The norm's transpose (LN(x2) was rounded to the compute dtype: dxn arrives as its
    # cotangent), then the residual: dx2 = dx3 + LN'(dxn); x1's gradient is dx2.
    dxn = dxn.astype(compute).astype(jnp.float32)
    xhat_kept, rstd_kept = xhat[kept], rstd[kept]
    dscale_ref[0] += jnp.sum(dxn * xhat_kept, axis=0, keepdims=True)
    dshift_ref[0] += jnp.sum(dxn, axis=0, keepdims=True)
    dxhat = dxn * scale_ref[...]
    dx2 = dx3[kept] + common.normalise_transpose(dxhat, xhat_kept, rstd_kept)
    dx1_flat[pl.ds(first, band), :] = dx2.astype(dx1_flat.dtype)
    if layerscale:
      y = y.astype(compute).astype(jnp.float32)
      dgamma_ref[0, 1:2, :] += jnp.sum(dx3[kept] * scales[1][kept] * y, axis=0, keepdims=True)
      dgamma_ref[0, 0:1, :] += jnp.sum(dx2 * scales[0][kept] * p[kept], axis=0, keepdims=True)
    # out_proj's transpose: its output was rounded to the compute dtype.
    dp = (dx2 * scales[0][kept] * gamma1).astype(compute)
    dbo_ref[0] += dp.astype(jnp.float32).sum(axis=0, keepdims=True)
    dwo_ref[0] += jax.lax.dot_general(o[kept], dp, common.TRANS_A,
                                      preferred_element_type=jnp.float32)
    do = jax.lax.dot_general(dp, wo_ref[...], common.TRANS_B, preferred_element_type=jnp.float32)
    do_flat[pl.ds(first, band), :] = do.astype(do_flat.dtype)

  tpu_bands.for_each_band(tokens, band, body)
  dx1_ref[...] = dx1_flat[...].reshape(dx1_ref.shape)
  do_ref[...] = do_flat[...].reshape(do_ref.shape)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the kernels cover a device's image rows: grid blocks of rows, bands within a block.

  Attributes:
    block_rows: image rows per grid step: whole images (a multiple of the height); or, where no
      whole image fits VMEM, part of one image (a divisor of the height), the rows above and
      below it read as blocks of one row each for the band's halo.
    band: tokens per band, as `tpu_feed_forward.Plan`'s.
    chunk: hidden channels per inner step, as `tpu_feed_forward.Plan`'s.
  """
  block_rows: int
  band: int
  chunk: int


@dataclasses.dataclass(frozen=True)
class Shape(ffn.Shape):
  """`tpu_feed_forward.Shape` with the tail's arrays: the residual stream's itemsize, and a VMEM
  estimate and plan of its own (blocks of image rows).
  """
  stream_itemsize: int = 4

  def vmem_bytes(self, plan: Plan) -> int:
    """The backward kernel's VMEM under `plan`: o, x1, dx3 in and dx1, do out as
    double-buffered (rows, width padded to the sublane tile, C) blocks (and the rows above and
    below for a block of part of an image); flat copies of the three inputs with halos and of
    the two outputs; the weights once and their float32 gradient sums twice; the FFN kernel's
    float32 temporaries and ten (band + 2 halo, C) float32 ones for out_proj, the residual and
    the norm. Every plan this gives for RMT-T/S/B/L at 224 px and 64 images compiled for a v4
    and a v5p within `common.limit()`."""
    rows = plan.block_rows + (2 if plan.block_rows < self.height else 0)
    tokens = plan.block_rows * self.width
    extended = plan.band + 2 * self.halo
    lanes = tpu_bands.lanes(self.dim)
    padded = lambda itemsize: -(-self.width // (32 // itemsize)) * (32 // itemsize)
    compute, stream = self.itemsize, self.stream_itemsize
    blocks = 2 * rows * lanes * (padded(compute) * 2 * compute + padded(stream) * 3 * stream)
    flat = lanes * ((tokens + 2 * self.halo) * (compute + 2 * stream) + tokens * (compute + stream))
    matrices = (self.dim * tpu_bands.lanes(self.hidden) + self.hidden * lanes
                + self.dim * lanes)
    vectors = 48 * tpu_bands.lanes(self.hidden) + 40 * lanes
    weights = (matrices + vectors) * (compute + 2 * 4)
    temporaries = (26 * tpu_bands.lanes(plan.chunk) + 10 * lanes) * extended * 4
    return blocks + flat + weights + temporaries

  @functools.cached_property
  def plan(self) -> Plan | None:
    """The plan with the longest bands, then the widest chunks, then the most rows per step,
    within `common.budget()`: blocks of whole images (any whole number of them, up to the FFN
    kernel's tokens per step) where one fits, else of part of an image (rows dividing the
    height, in whole bfloat16 tiles of tokens; the most rows before the widest chunks); None if
    none fits."""
    pixels = self.height * self.width
    chunks = [c for c in range(self.hidden, 0, -128) if self.hidden % c == 0]
    images = [d * self.height for d in range(self.images, 0, -1)
              if self.images % d == 0 and d * pixels <= ffn._BLOCK_TOKENS] or [self.height]
    parts = [r for r in range(self.height - 1, 0, -1)
             if self.height % r == 0 and (r * self.width) % tpu_bands.TILE == 0]
    # Blocks of part of an image read two rows more of each input: there, more rows per step
    # come before wider chunks.
    for rows, key in ((images, lambda p: (p.band, p.chunk, p.block_rows)),
                      (parts, lambda p: (p.band, p.block_rows, p.chunk))):
      plans = [Plan(block_rows, band, chunk)
               for block_rows in rows
               for band in tpu_bands.bands(block_rows * self.width, self.halo)
               for chunk in chunks]
      fitting = [p for p in plans if self.vmem_bytes(p) <= common.budget()]
      if fitting:
        return max(fitting, key=key)
    return None

  @property
  def block_tokens(self) -> int:
    return self.plan.block_rows * self.width

  @property
  def steps(self) -> int:
    return self.images * self.height // self.plan.block_rows

  @property
  def blocks_per_image(self) -> int:
    """Grid steps per image: 1 for blocks of whole images."""
    return max(self.height // self.plan.block_rows, 1)


def fits_vmem(x_shape, hidden: int, itemsize: int, stream_itemsize: int) -> bool:
  """Whether `block_tail` has a plan within `common.budget()` for x of `x_shape` (b, h, w, C)
  and `hidden` channels, the batch split over the context mesh's devices."""
  batch, height, width, dim = x_shape
  return Shape(common.images_per_device(batch) * height * width, height, width, dim,
               tpu_bands.lanes(hidden), itemsize, stream_itemsize).plan is not None


def cost_estimates(shape: Shape, stream_itemsize: int,
                   layerscale: bool = False) -> tuple[pl.CostEstimate, pl.CostEstimate]:
  """The forward and backward kernels' costs: the FFN kernel's (`tpu_feed_forward`) plus
  out_proj (2 C^2 flops a token, recomputed on the halos; backward two more products on the
  band) and the norm; bytes: o and do in the compute dtype, x1, x3, dx3 and dx1 in the stream's,
  the weights (out_proj's, the norm's and the gammas too) once, and the float32 gradient sums
  once per core."""
  forward, backward = ffn.cost_estimates(shape)
  n, c, plan = shape.tokens, shape.dim, shape.plan
  extended = n // plan.band * (plan.band + 2 * shape.halo)
  array = n * c
  weights = (c * c + c) * shape.itemsize + 4 * c * 4  # out_proj; the norm's and gammas' f32
  # The FFN's own x / y / dx bytes are replaced by the tail's arrays.
  ffn_arrays_forward, ffn_arrays_backward = 2 * array * shape.itemsize, 3 * array * shape.itemsize
  # A block of part of an image also reads the rows above and below it, of each input.
  edge = (2 * shape.steps * shape.width * c if shape.blocks_per_image > 1 else 0)
  forward = pl.CostEstimate(
      flops=forward.flops + 2 * c * c * extended + 10 * c * extended,
      transcendentals=forward.transcendentals + extended,
      bytes_accessed=forward.bytes_accessed - ffn_arrays_forward + weights
      + array * (shape.itemsize + 2 * stream_itemsize) + edge * (shape.itemsize + stream_itemsize))
  backward = pl.CostEstimate(
      flops=backward.flops + 2 * c * c * extended + 4 * c * c * n + 20 * c * extended
      + (2 * n * shape.hidden * c if layerscale else 0),
      transcendentals=backward.transcendentals + extended,
      bytes_accessed=backward.bytes_accessed - ffn_arrays_backward + weights
      + shape.cores * (c * c + 5 * c) * 4
      + array * (2 * shape.itemsize + 3 * stream_itemsize)
      + edge * (shape.itemsize + 2 * stream_itemsize))
  return forward, backward


def _call(kernel, shape, scales, arrays, weights, outputs, grads, cost, interpret, **static):
  """`kernel` over blocks of image rows (`tpu_bands.call_on_rows`), the drop-path scales (2,
  images) in SMEM: for blocks of part of an image, each block's."""
  parts = shape.blocks_per_image
  if parts > 1:
    scales = jnp.repeat(scales, parts, axis=1)
  return tpu_bands.call_on_rows(
      kernel, shape, arrays, weights, outputs, grads, cost, interpret,
      scalars=(scales.reshape(-1),), chunk=shape.plan.chunk, images=shape.images * parts,
      block_images=max(shape.plan.block_rows // shape.height, 1), **static)


def _shape(o, w1, height, width, stream_itemsize):
  tokens, dim = o.shape[0] * o.shape[1], o.shape[2]
  shape = Shape(tokens, height, width, dim, w1.shape[1], o.dtype.itemsize, stream_itemsize)
  if shape.plan is None:
    raise ValueError(f'the block-tail kernel does not fit {common.budget() / 2**20:.0f} MiB '
                     f'of VMEM for {dim} -> {shape.hidden} channels on {height} x {width} images')
  return shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _tail(x1, o, weights, scales, height, width, eps, interpret, layerscale):
  common.images_per_device(scales.shape[1], (x1, o))

  def forward(arrays, weights):
    o, x1, scales = arrays
    shape = _shape(o, weights[4], height, width, x1.dtype.itemsize)
    out = [jax.ShapeDtypeStruct(x1.shape, x1.dtype)]
    cost = cost_estimates(shape, x1.dtype.itemsize)[0]
    return _call(_forward_kernel, shape, scales, (o, x1), weights, out, (), cost, interpret,
                 eps=eps)[0], ()

  # The drop-path scales (2, b) split along their images.
  return common.per_device(forward, (o, x1, scales), weights, split_axes=(0, 0, 1))[0]


def _tail_fwd(x1, o, weights, scales, height, width, eps, interpret, layerscale):
  return (_tail(x1, o, weights, scales, height, width, eps, interpret, layerscale),
          (x1, o, weights, scales))


def _tail_bwd(height, width, eps, interpret, layerscale, residuals, dx3):
  x1, o, weights, scales = residuals

  def backward(arrays, weights):
    o, x1, dx3, scales = arrays
    shape = _shape(o, weights[4], height, width, x1.dtype.itemsize)
    out = [jax.ShapeDtypeStruct(x1.shape, x1.dtype), jax.ShapeDtypeStruct(o.shape, o.dtype)]
    cost = cost_estimates(shape, x1.dtype.itemsize, layerscale)[1]
    dx1, do, *grads = _call(_backward_kernel, shape, scales, (o, x1, dx3), weights, out,
                            weights, cost, interpret, eps=eps, layerscale=layerscale)
    return (dx1, do), common.core_sums(grads)

  (dx1, do), grads = common.per_device(backward, (o, x1, dx3.astype(x1.dtype), scales), weights,
                                       split_axes=(0, 0, 0, 1))
  # Drop path's scales are not learned: no gradient.
  return (dx1, do, common.like_weights(grads, weights),
          jnp.zeros_like(scales))


_tail.defvjp(_tail_fwd, _tail_bwd)


def block_second_half(x1: jax.Array, o: jax.Array, out_proj: tuple[jax.Array, jax.Array],
                      norm: tuple[jax.Array, jax.Array], ffn: Any,
                      gammas: tuple[jax.Array, jax.Array] | None = None,
                      drop_scales: jax.Array | None = None, *, eps: float = 1e-6,
                      interpret: bool | None = None) -> jax.Array:
  """x2 + s2 gamma2 FFN(LN(x2)), x2 = x1 + s1 gamma1 out_proj(o): `layers.block_second_half`
  as a Pallas kernel pair.

  Args:
    x1: (b, h, w, C), the residual stream (float32 or the compute dtype).
    o: (b, h, w, C) in the compute dtype, MaSA's output before out_proj.
    out_proj: (kernel (C, C), bias (C,)); norm: (scale (C,), bias (C,)).
    ffn: (fc1, dwconv, fc2) as `tpu_feed_forward.feed_forward` takes them.
    gammas: layerscale's (gamma_1 (C,), gamma_2 (C,)), or None (ones).
    drop_scales: drop path's per-image scales (2, b) (0 or 1 / keep probability; row 0 the
      attention branch, row 1 the FFN's), or None (ones).
    eps: the norm's epsilon.
    interpret: Pallas's interpreter (True), Mosaic (False), or by the platform the computation
      is lowered for (None).
  """
  batch, height, width, dim = x1.shape
  (wo, bo), (scale, shift) = out_proj, norm
  (w1, b1), (taps, bias), (w2, b2) = ffn
  hidden = w1.shape[1]
  pad = tpu_bands.lanes(hidden) - hidden
  columns = lambda a: jnp.pad(a.reshape(-1, hidden), ((0, 0), (0, pad)))
  dt = o.dtype
  gamma = (jnp.ones((2, dim), jnp.float32) if gammas is None
           else jnp.stack(gammas).astype(jnp.float32))
  scales = (jnp.ones((2, batch), jnp.float32) if drop_scales is None
            else drop_scales.astype(jnp.float32))
  weights = (wo.astype(dt), bo.reshape(1, dim).astype(dt),
             scale.reshape(1, dim).astype(jnp.float32), shift.reshape(1, dim).astype(jnp.float32),
             columns(w1).astype(dt), columns(b1).astype(dt), columns(taps).astype(dt),
             columns(bias).astype(dt), jnp.pad(w2, ((0, pad), (0, 0))).astype(dt),
             b2.reshape(1, dim).astype(dt), gamma)
  rows = lambda a: a.reshape(batch * height, width, dim)
  return _tail(rows(x1), rows(o), weights, scales, height, width, eps, interpret,
               gammas is not None).reshape(x1.shape)
