"""Image tokens in bands inside Pallas TPU kernels, for kernels with a depthwise convolution.

The FFN kernel (`tpu_feed_forward`) takes activations as (tokens, channels): the tokens of
whole images in raster order, channels on the lane axis. A grid step holds whole images;
inside it the kernel goes through them in bands of tokens, each with a halo on either side
(the rows and pixels its convolution reaches), read from a VMEM copy of the block with zeros
around it (`with_halo`), so that a band's temporaries are bounded whatever the image size.
Here:

- `halo`, `image_blocks` and `bands`: the sizes a kernel may choose from (bfloat16 tiles of 16
  rows, whole images per block).
- `Neighbours`: a band's shifts to a pixel's neighbours. A neighbour `dx` columns away is `dx`
  tokens away, `dy` rows away `dy * width` tokens away: rotations of the sublane axis
  (`pltpu.roll`), zeroed where the neighbour falls outside its image, with positions from an
  iota. A k x k depthwise cross-correlation (zero padding k // 2) is separable into column
  shifts, per-row tap sums and row shifts (`conv`); its transpose is the opposite shifts
  (`conv_transpose`).
- `with_halo` and `for_each_band`: the VMEM copy and the loop over bands.
- `with_halo_rows`, `block_offset`, `edge_rows`, `split_edges` and `call_on_rows`: the same for
  kernels whose grid steps take image rows, either whole images or part of one image with the
  rows above and below it read as blocks of one row (`tpu_block_head`, `tpu_block_tail`).
"""

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rmt_jax.kernels.tpu import common

# The sublane tile of bfloat16 (16 rows): band and block offsets stay multiples of it.
TILE = 16


def lanes(n: int) -> int:
  """n rounded up to the TPU's 128 lanes (what an axis of n takes in VMEM)."""
  return -(-n // 128) * 128


def halo(width: int, radius: int) -> int:
  """Tokens a band needs on either side for a (2 radius + 1)^2 conv: `radius` rows and pixels,
  in whole tiles."""
  return -(-(radius * width + radius) // TILE) * TILE


def image_blocks(images: int, pixels: int, max_tokens: int) -> list[int]:
  """Images per grid step to choose from, most first: divisors of `images` whose tokens fill
  whole tiles (or all the images), within `max_tokens` where any is (else the smallest)."""
  whole = [d for d in range(images, 0, -1) if images % d == 0
           and (d == images or (d * pixels) % TILE == 0)]
  return [d for d in whole if d * pixels <= max_tokens] or whole[-1:]


def bands(tokens: int, halo_tokens: int) -> list[int]:
  """Band lengths to choose from, longest first: divisors of a block's `tokens` in whole tiles
  and at least twice the halo (or the whole block, the only band of a block that is not a
  whole number of tiles)."""
  if tokens % TILE:
    return [tokens]
  return [b for b in range(tokens, 0, -TILE) if tokens % b == 0
          and (b >= 2 * halo_tokens or b == tokens)]


class Neighbours:
  """Shifts of a band's tokens to a pixel's neighbours, inside a kernel.

  `shift(v, dy, dx)[t]` is v at the pixel dy rows and dx columns from token t where that pixel
  lies in t's image, else 0. Token t of the band is token `first + t` of the block, whose
  images are in raster order; rows and columns come from a float floor (Mosaic has no vector
  integer division): (t + 0.5) / W is at least 0.5 / W away from an integer, far beyond
  float32's rounding at these sizes. A band's halo tokens are only read as neighbours: their
  own masks do not matter, nor does the rotation's wrap-around.

  A shift is one rotation and one select. `pltpu.roll` follows `jnp.roll` (Mosaic's rotate
  and the interpreter both; jax's TPU tests compare it with `np.roll`), so the neighbour
  `offset` tokens ahead is a rotation by -offset. The border test is one compare: a neighbour
  dx > 0 columns away can only fall off the right edge, dx < 0 off the left (rows alike).
  Each mask is made once per band and shared by every shift by the same amount (a conv's
  columns and rows, a backward pass's several convolutions); so a `Neighbours` belongs to the
  trace that builds it (a band's body), not to loops or branches inside it that shift first.
  """

  def __init__(self, tokens: int, height: int, width: int, first: jax.Array | int):
    self.tokens, self.height, self.width = tokens, height, width
    t = jax.lax.broadcasted_iota(jnp.int32, (tokens, 1), 0)
    position = (t + first).astype(jnp.float32)
    raster_row = jnp.floor((position + 0.5) * np.float32(1.0 / width))
    self.column = position - raster_row * width
    self.row = raster_row - jnp.floor((raster_row + 0.5) * np.float32(1.0 / height)) * height
    self._inside: dict[tuple[int, int], jax.Array] = {}

  def inside(self, dy: int, dx: int) -> jax.Array:
    """Whether the pixel (row + dy, column + dx) lies in the image, (tokens, 1); one of dy, dx
    is 0."""
    if (dy, dx) not in self._inside:
      position, size, d = (self.row, self.height, dy) if dy else (self.column, self.width, dx)
      self._inside[dy, dx] = position < size - d if d > 0 else position >= -d
    return self._inside[dy, dx]

  def shift(self, v: jax.Array, dy: int, dx: int) -> jax.Array:
    """v at (row + dy, column + dx), zero outside the image; one of dy, dx is 0."""
    if dy == dx == 0:
      return v
    offset = dy * self.width + dx
    return jnp.where(self.inside(dy, dx), pltpu.roll(v, (-offset) % self.tokens, 0), 0.0)

  def columns(self, v: jax.Array, radius: int) -> list[jax.Array]:
    """v at columns x - radius ... x + radius: a conv's taps along a row."""
    return [self.shift(v, 0, dx) for dx in range(-radius, radius + 1)]

  def conv(self, columns: Sequence[jax.Array], taps: jax.Array) -> jax.Array:
    """The k x k cross-correlation (zero padding k // 2) from `columns(v, k // 2)`; taps
    (k * k, channels), row-major over (k, k), float32."""
    k = len(columns)
    rows = [sum(taps[k * i + j] * columns[j] for j in range(k)) for i in range(k)]
    return sum(self.shift(rows[i], i - k // 2, 0) for i in range(k))

  def conv_transpose_rows(self, dz: jax.Array, radius: int) -> list[jax.Array]:
    """The row shifts' transposes applied to dz, one per tap row: each shift's transpose is the
    opposite shift (with its mask)."""
    return [self.shift(dz, radius - i, 0) for i in range(2 * radius + 1)]

  def conv_transpose(self, moved_rows: Sequence[jax.Array], taps: jax.Array) -> jax.Array:
    """The conv's transpose from `conv_transpose_rows(dz, k // 2)`; taps (k * k, channels).

    The kernel's gradient needs no function of its own: tap (i, j)'s is the sum over tokens
    of `moved_rows[i] * columns(v)[j]`.
    """
    k = len(moved_rows)
    sums = [sum(taps[k * i + j] * moved_rows[i] for i in range(k)) for j in range(k)]
    return sum(self.shift(sums[j], 0, k // 2 - j) for j in range(k))


def with_halo(padded_ref, ref, halo_tokens: int) -> None:
  """padded_ref = [zeros(halo); ref; zeros(halo)] (VMEM scratch): every band reads its halo
  from one array, the block's edges reading zeros (which the masks never use)."""
  channels = ref.shape[-1]
  tokens = ref.size // channels  # (tokens, C), or (rows, width, C) flattened here
  zeros = jnp.zeros((halo_tokens, channels), padded_ref.dtype)
  padded_ref[pl.ds(0, halo_tokens), :] = zeros
  padded_ref[pl.ds(halo_tokens + tokens, halo_tokens), :] = zeros
  padded_ref[pl.ds(halo_tokens, tokens), :] = ref[...].reshape(tokens, channels)


def with_halo_rows(padded_ref, ref, edge, halo, width):
  """padded_ref = the block's tokens with `halo` tokens either side: zeros
  (`with_halo`), or, for a block of part of an image (`edge` = the refs of the rows
  above and below it), those rows next to the block and zeros beyond them. A halo of an image's
  edge holds another image's row (or a repeated one): the masks never read it."""
  if edge is None:
    with_halo(padded_ref, ref, halo)
    return
  channels = ref.shape[-1]
  tokens = ref.size // channels
  above, below = edge
  zeros = jnp.zeros((halo - width, channels), padded_ref.dtype)
  padded_ref[pl.ds(0, halo - width), :] = zeros
  padded_ref[pl.ds(halo - width, width), :] = above[...].reshape(width, channels)
  padded_ref[pl.ds(halo, tokens), :] = ref[...].reshape(tokens, channels)
  padded_ref[pl.ds(halo + tokens, width), :] = below[...].reshape(width, channels)
  padded_ref[pl.ds(halo + tokens + width, halo - width), :] = zeros


def block_offset(block, blocks_per_image, tokens):
  """The block's first token within its image: 0 for blocks of whole images."""
  if blocks_per_image == 1:
    return 0
  return jax.lax.rem(block, blocks_per_image) * tokens


def edge_rows(arrays: Sequence[jax.Array], block_rows: int,
              step: Callable[..., jax.Array]) -> tuple[list[pl.BlockSpec], tuple[jax.Array, ...]]:
  """For blocks of part of an image, of `block_rows` rows of each of `arrays` (image rows
  (b h, w, C)): the blocks of the rows above and below the block, one row each (clamped at the
  ends of the array: a halo beyond the image is masked anyway), and their operands (each array
  twice), to follow the kernel's other inputs (`split_edges` finds them in the kernel).
  `step(c, s)` is the block of grid step (c, s) (`common.CoreGrid.step`)."""
  last, shape = arrays[0].shape[0] - 1, (1, *arrays[0].shape[1:])
  above = pl.BlockSpec(shape, lambda c, s, *_: (jnp.maximum(step(c, s) * block_rows - 1, 0),
                                                0, 0))
  below = pl.BlockSpec(shape, lambda c, s, *_: (jnp.minimum((step(c, s) + 1) * block_rows, last),
                                                0, 0))
  return [above, below] * len(arrays), tuple(a for a in arrays for _ in range(2))


def call_on_rows(kernel: Callable[..., None], shape: Any, arrays: Sequence[jax.Array],
                 weights: Sequence[jax.Array], outputs: Sequence[jax.ShapeDtypeStruct],
                 grads: Sequence[jax.Array], cost: pl.CostEstimate, interpret: bool | None,
                 scalars: Sequence[jax.Array] = (), **static) -> Any:
  """`kernel` over blocks of image rows (`tpu_block_head`, `tpu_block_tail`), by `common.call`.

  Args:
    kernel: takes `scalars`' refs, the arrays', the weights', the edge rows' (`edge_rows`,
      where a block is part of an image), the outputs', then the scratch: a flat copy with
      halos of each array (`with_halo_rows`) and a flat copy of each output; and as static
      arguments height, width, band, halo, blocks_per_image and `static`.
    shape: the call's `Shape`: images of `height` x `width` tokens of `dim` channels, `steps`
      blocks of `plan.block_rows` rows (whole images, or part of one image), in bands of
      `plan.band` tokens with `halo` tokens either side.
    arrays: image rows (b h, w, C), by blocks of rows.
    weights: whole at every step.
    outputs: rows arrays' structs.
    grads: arrays whose gradients' float32 sums per core follow the outputs (`common.CoreGrid`).
    cost: the kernel's declared cost.
    interpret: as `common.call`.
    scalars: one array to prefetch into SMEM, or none.
  """
  grid = common.CoreGrid(shape.steps)
  rows, parts = shape.plan.block_rows, shape.blocks_per_image
  # Arrays are image rows: flattening them to tokens in HBM would be a relayout.
  row_block = grid.blocks((rows, shape.width, shape.dim))
  sums, sum_specs = grid.sums(grads)
  in_specs = [row_block] * len(arrays) + [common.whole(w) for w in weights]
  operands = (*scalars, *arrays, *weights)
  if parts > 1:
    edges, edge_operands = edge_rows(arrays, rows, grid.step)
    in_specs, operands = in_specs + edges, operands + edge_operands
  tokens = rows * shape.width
  scratch = ([pltpu.VMEM((tokens + 2 * shape.halo, shape.dim), a.dtype) for a in arrays]
             + [pltpu.VMEM((tokens, shape.dim), struct.dtype) for struct in outputs])
  return common.call(
      functools.partial(kernel, height=shape.height, width=shape.width, band=shape.plan.band,
                        halo=shape.halo, blocks_per_image=parts, **static),
      operands, out_shape=[*outputs, *sums], grid=grid.shape, in_specs=in_specs,
      out_specs=[row_block] * len(outputs) + sum_specs, scratch_shapes=scratch, cost=cost,
      interpret=interpret, scalar_prefetch=len(scalars))


def split_edges(refs, arrays, blocks_per_image):
  """Splits a kernel's trailing refs: the (above, below) row refs of each of `arrays` token
  inputs when a block is part of an image, and the rest."""
  if blocks_per_image == 1:
    return [None] * arrays, refs
  return [(refs[2 * i], refs[2 * i + 1]) for i in range(arrays)], refs[2 * arrays:]


def for_each_band(tokens: int, band: int, body: Callable[[jax.Array | int], None]) -> None:
  """body(first token of the band) for each band of a block: a loop, or one call."""
  if band == tokens:
    body(0)
    return

  def step(b, carry):
    body(pl.multiple_of(b * band, TILE))
    return carry

  jax.lax.fori_loop(0, tokens // band, step, 0)
