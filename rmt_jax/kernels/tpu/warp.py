"""RandAugment's affine warp as a Pallas TPU kernel: each image sampled at an affine map of its
pixels in two 1-D linear passes (along x, then along y), the function of
`rmt_jax.data.batch_augment.affine` (the plain form, which the caller passes in).

A pass samples line l of an image at position `s m + o(l)` for output position m: one scale s
per image and pass (1 for flips, shears and translations, not for rotations) and an offset o(l)
linear in l (the shear and the translation). With k = floor(o(l)) and f = o(l) - k, linear
interpolation at that position is exactly

    sum_j hat(frac(s m) + f - j) * line_l[floor(s m) + k + j],  j = 0, 1, 2,

with hat(t) = max(0, 1 - |t|), so the pass is three steps a plain XLA program has no cheap form
of, in VMEM:

- the shift of each line by its own integer k (zeros outside the image): one rotation and one
  select per bit of k modulo the padded line, the bits chosen per line;
- the taps `floor(s m) + j`: for s = 1, the shifted line rotated by j; else a product with a 0/1
  selection matrix shared by every line (MXU work for the rotated images only, `pl.when`);
- the weights, elementwise.

The images enter and leave as uint8 planes (channel, row, column): the kernel subtracts the fill
colour (sampling zeros outside and adding the fill back blends the edges with it, as the plain
form does) and rounds and clips its output to [0, 255]. A pass along x keeps lines on sublanes
and positions on lanes, a pass along y the other way round, so no pass transposes. A map that
mirrors horizontally (a negative scale along x) samples the mirrored image at the mirrored
positions, the kernel reversing the lines first.

`Shape.max_scale` bounds |s| for the lines' padding: a caller whose maps scale more gets zeros
(the fill) where a line would be read past its padding; `rmt_jax.data.batch_augment` derives the
bound from its policy (`warp_scale_bound`). One grid step per image, 'parallel' (a megacore chip
splits the images between its TensorCores).
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import numpy as np

from rmt_jax.kernels.tpu import common

_TAPS = 3  # floor(s m) + k + j for j = 0, 1, 2 (see the module docstring)
_F32 = jnp.float32


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Shape:
  """The static description of one call.

  Attributes:
    images, height, width: the batch and its images' size in pixels (3 channels).
    max_scale: the largest |s| of any image's passes (see the module docstring).
  """
  images: int
  height: int
  width: int
  max_scale: float

  @property
  def rows(self) -> int:
    """Rows of a float32 plane in VMEM: whole 8-sublane tiles."""
    return _round_up(self.height, 8)

  @property
  def columns(self) -> int:
    """Columns of a plane: whole 128-lane tiles."""
    return _round_up(self.width, 128)

  @property
  def line_lanes(self) -> int:
    """The padded line of the pass along x: every tap floor(s m) + 2 of the image's columns."""
    return max(self.columns, _reversal_lanes(self.width),
               _round_up(int(self.max_scale * (self.width - 1)) + _TAPS, 128))

  @property
  def line_rows(self) -> int:
    """The padded line (a column) of the pass along y."""
    return max(self.rows, _round_up(int(self.max_scale * (self.height - 1)) + _TAPS, 8))

  def vmem_bytes(self) -> int:
    """The kernel's VMEM: the double-buffered uint8 planes in and out (tiles of 32 sublanes);
    the float32 scratch (a padded line buffer per pass, the first pass' output, the taps); and
    float32 temporaries, eight of the larger padded pass (the shifted lines, their rotation, the
    masks, the selection matrix, the weights and the sum)."""
    plane = self.rows * self.columns
    planes = 2 * 2 * 3 * _round_up(self.height, 32) * self.columns
    scratch = 4 * (self.rows * self.line_lanes + self.line_rows * self.columns
                   + 3 * plane + _TAPS * plane)
    padded = max(self.rows * self.line_lanes, self.line_rows * self.columns)
    return planes + scratch + 8 * 4 * padded

  @property
  def fits_vmem(self) -> bool:
    return self.vmem_bytes() <= common.budget()


def fits_vmem(images_shape: Sequence[int], max_scale: float) -> bool:
  """Whether `affine_warp` runs its kernel for uint8 images of `images_shape` (B, H, W, 3)."""
  batch, height, width, _ = images_shape
  return Shape(batch, height, width, max_scale).fits_vmem


def cost_estimate(shape: Shape, scaled_share: float) -> pl.CostEstimate:
  """The kernel's cost: its uint8 planes read and written once, each image's 6 parameters and 3
  flags once; per channel and pass the shift's rotation and select per bit, the mask and the
  weighted sum of the taps (~4 x the bits + 16 operations per element of the padded lines,
  declared as flops), and the selection products of the `scaled_share` of images whose passes
  scale (2 x 3 taps x the product's MACs)."""
  along_x = shape.rows * shape.line_lanes
  along_y = shape.line_rows * shape.columns
  elementwise = sum((4 * (size - 1).bit_length() + 16) * elements
                    for size, elements in ((shape.line_lanes, along_x),
                                           (shape.line_rows, along_y)))
  products = 2 * _TAPS * (along_x * shape.columns + along_y * shape.rows)
  per_image = 3 * (elementwise + scaled_share * products)
  return pl.CostEstimate(flops=int(shape.images * per_image), transcendentals=0,
                         bytes_accessed=shape.images * (2 * 3 * shape.height * shape.width
                                                        + (6 + 3) * 4))


def _split(offset: jax.Array, lines: int, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(k, f, the rotation that brings line[n + k] to n) for offsets o = k + f of lines padded to
  `lines`, k an integer (int32) and f in [0, 1); offsets beyond any overlap are clipped (the
  whole line reads outside the image, at any k that far)."""
  offset = jnp.clip(offset, -float(lines + size), float(lines + size))
  k = jnp.floor(offset)
  minus = -k
  rotation = minus - lines * jnp.floor(minus / lines)  # (-k) mod lines, exact on integers
  return k.astype(jnp.int32), offset - k, rotation.astype(jnp.int32)


def _shift(v: jax.Array, rotation: jax.Array, axis: int) -> jax.Array:
  """Each line of `v` (along `axis`) rotated by its own amount (`rotation`, broadcast against
  v): one rotation of the whole array and a select per bit."""
  for bit in range((v.shape[axis] - 1).bit_length()):
    take = ((rotation >> bit) & 1) == 1
    v = jnp.where(take, pltpu.roll(v, 1 << bit, axis), v)
  return v


def _reversal_lanes(width: int) -> int:
  """R: the power of 2 of lanes (at least 128) over which `_reverse` mirrors a line."""
  return max(128, 1 << (width - 1).bit_length())


def _reverse(v: jax.Array) -> jax.Array:
  """v with its lanes (a power of 2 of them) reversed: lane n takes lane n XOR (R - 1), one
  exchange of lanes n and n XOR 2^b per bit b (two rotations and a select)."""
  size = v.shape[1]
  n = jax.lax.broadcasted_iota(jnp.int32, (1, size), 1)
  for bit in range((size - 1).bit_length()):
    step = 1 << bit
    v = jnp.where((n & step) != 0, pltpu.roll(v, step, 1), pltpu.roll(v, size - step, 1))
  return v


def _hat(t: jax.Array) -> jax.Array:
  return jnp.maximum(0.0, 1.0 - jnp.abs(t))


def _pass(v, valid, rotation, base, t, scaled, taps_ref, *, axis: int, keep: int):
  """One pass over one channel's padded lines `v`: shift each line, take the three taps (a
  rotation where the image's scale is 1, else a selection product), weight and sum them.

  Args:
    v: float32, lines along the other axis than `axis`, positions along `axis` (padded).
    valid: where line[n + k] lies inside the image (bool, v's shape).
    rotation: per line, the shift's rotation (int32, broadcast against v).
    base: floor(s m) per output position (int32; (1, keep) along lanes or (keep, 1) along
      sublanes).
    t: frac(s m) + f per output (float32, the output's shape).
    scaled: whether this image's scale differs from 1 (a scalar, int32).
    taps_ref: float32 scratch (3, rows, columns) for the taps.
    axis: 1 (positions on lanes: the pass along x) or 0 (on sublanes: along y).
    keep: output positions along `axis`.

  Returns:
    The pass' output, float32: `keep` positions along `axis`.
  """
  v = jnp.where(valid, _shift(v, rotation, axis), 0.0)
  size = v.shape[axis]
  cut = (lambda a: a[:, :keep]) if axis == 1 else (lambda a: a[:keep])

  @pl.when(scaled == 0)
  def _():
    for j in range(_TAPS):
      taps_ref[j] = cut(v if j == 0 else pltpu.roll(v, size - j, axis))

  @pl.when(scaled != 0)
  def _():
    if axis == 1:
      n = jax.lax.broadcasted_iota(jnp.int32, (size, keep), 0)
      for j in range(_TAPS):
        select = (n == base + j).astype(_F32)
        taps_ref[j] = jnp.dot(v, select, precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=_F32)
    else:
      n = jax.lax.broadcasted_iota(jnp.int32, (keep, size), 1)
      for j in range(_TAPS):
        select = (n == base + j).astype(_F32)
        taps_ref[j] = jnp.dot(select, v, precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=_F32)

  return sum(_hat(t - j) * taps_ref[j] for j in range(_TAPS))


def _kernel(params_ref, flags_ref, planes_ref, out_ref, line_ref, column_ref, half_ref,
            taps_ref, *, height, width, fill):
  image = pl.program_id(0)
  s1, beta1, gamma1, s2, beta2, gamma2 = (params_ref[image, i] for i in range(6))
  scaled_x, scaled_y, mirrored = (flags_ref[image, i] for i in range(3))
  rows, lanes = line_ref.shape
  line_rows, columns = column_ref.shape

  # Along x: line q (a row, on sublanes) sampled at s1 p + beta1 q + gamma1.
  q = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0).astype(_F32)
  # A mirrored image's line is the reversed padded line r (`_reverse`) read from R - W on.
  reach = _reversal_lanes(width)
  k, f, rotation = _split(beta1 * q + gamma1 + (reach - width) * mirrored.astype(_F32), lanes,
                          width)
  k = k - (reach - width) * mirrored
  n = jax.lax.broadcasted_iota(jnp.int32, (1, lanes), 1)
  valid = (n + k >= 0) & (n + k < width)
  position = s1 * jax.lax.broadcasted_iota(jnp.int32, (1, columns), 1).astype(_F32)
  base = jnp.floor(position)
  t = (position - base) + f
  for c in range(3):
    line_ref[:height, :width] = planes_ref[0, c].astype(_F32) - fill[c]

    @pl.when(mirrored != 0)
    def _():
      line_ref[:, :reach] = _reverse(line_ref[:, :reach])

    half_ref[c] = _pass(line_ref[...], valid, rotation, base.astype(jnp.int32), t, scaled_x,
                        taps_ref, axis=1, keep=columns)

  # Along y: line x (a column, on lanes) sampled at s2 y + beta2 x + gamma2.
  x = jax.lax.broadcasted_iota(jnp.int32, (1, columns), 1).astype(_F32)
  k, f, rotation = _split(beta2 * x + gamma2, line_rows, height)
  n = jax.lax.broadcasted_iota(jnp.int32, (line_rows, 1), 0)
  valid = (n + k >= 0) & (n + k < height)
  position = s2 * jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0).astype(_F32)
  base = jnp.floor(position)
  t = (position - base) + f
  for c in range(3):
    column_ref[:rows, :] = half_ref[c]
    out = _pass(column_ref[...], valid, rotation, base.astype(jnp.int32), t,
                scaled_y, taps_ref, axis=0, keep=rows)
    out = jnp.clip(jnp.round(out + fill[c]), 0.0, 255.0)
    out_ref[0, c] = out[:height, :width].astype(jnp.int32).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=('fill', 'max_scale', 'scaled_share', 'interpret'))
def affine_warp(images: jax.Array, matrices: jax.Array, *, fill: tuple[int, int, int],
                max_scale: float, scaled_share: float = 1.0,
                interpret: bool | None = None) -> jax.Array:
  """Each image sampled at its affine map, outside -> `fill` (`batch_augment.affine`'s function).

  Args:
    images: uint8 (B, H, W, 3).
    matrices: float32 (B, 6), PIL's `Image.AFFINE` data per image: output (x, y) reads the
      input at (a x + b y + c, d x + e y + f); 0 < e <= max_scale and
      |a - b d / e| <= max_scale (no vertical mirror: RandAugment's maps have none).
    fill: the colour outside the image (integers).
    max_scale: the bound on the passes' scales (`Shape.max_scale`).
    scaled_share: the expected share of images whose passes scale (rotations), for the cost
      estimate XLA sees (the selection products run for those only).
    interpret: Pallas's interpreter (True), Mosaic (False), or by the platform (None).

  Returns:
    uint8 (B, H, W, 3).
  """
  batch, height, width, _ = images.shape
  shape = Shape(batch, height, width, max_scale)
  a, b, c, d, e, f = (matrices[:, i].astype(_F32) for i in range(6))
  # The plain form's positions: along x, (a - b d / e) p + (b / e) q + (c - b f / e); along y,
  # e y + d x + f. Where the first scale is negative the kernel mirrors the image and samples
  # the mirror at the mirrored positions: scale -s1, offset W - 1 - the offset.
  s1 = a - b * d / e
  mirrored = s1 < 0
  sign = jnp.where(mirrored, -1.0, 1.0)
  params = jnp.stack([sign * s1, sign * b / e,
                      jnp.where(mirrored, width - 1.0, 0.0) + sign * (c - b * f / e), e, d, f],
                     axis=1)
  flags = jnp.stack([jnp.abs(s1) != 1.0, e != 1.0, mirrored], axis=1).astype(jnp.int32)
  planes = images.transpose(0, 3, 1, 2)
  block = pl.BlockSpec((1, 3, height, width), lambda i, *_: (i, 0, 0, 0))
  kernel = functools.partial(_kernel, height=height, width=width,
                             fill=tuple(float(v) for v in fill))
  (out,) = common.call(
      kernel, (params, flags, planes),
      out_shape=[jax.ShapeDtypeStruct(planes.shape, jnp.uint8)], grid=(batch,),
      in_specs=[block], out_specs=[block],
      scratch_shapes=[pltpu.VMEM((shape.rows, shape.line_lanes), _F32),
                      pltpu.VMEM((shape.line_rows, shape.columns), _F32),
                      pltpu.VMEM((3, shape.rows, shape.columns), _F32),
                      pltpu.VMEM((_TAPS, shape.rows, shape.columns), _F32)],
      dimension_semantics=('parallel',), cost=cost_estimate(shape, scaled_share),
      interpret=interpret, scalar_prefetch=2)
  return out.transpose(0, 2, 3, 1)


def sample(images_shape: Sequence[int], rng: np.random.Generator, *,
           max_scale: float) -> tuple[jax.Array, jax.Array]:
  """Arguments for checking the kernel on a device (`rmt_jax.kernels.check`): uint8 images of
  `images_shape` (B, H, W, 3) uniform in [0, 255], and per image a map as RandAugment's warps
  draw them: a rotation about the centre (up to 30 degrees), a shear, a translation (up to
  0.45 of the size) and a horizontal mirror, each with probability 1/2; maps that scale beyond
  `max_scale` replaced by the identity."""
  batch, height, width, _ = images_shape
  images = rng.integers(0, 256, images_shape, dtype=np.uint8)
  maps = []
  for _ in range(batch):
    m = np.eye(3)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    if rng.random() < 0.5:
      angle = np.deg2rad(rng.uniform(-30, 30))
      cos, sin = np.cos(angle), np.sin(angle)
      m = m @ np.array([[cos, sin, cx - cos * cx - sin * cy],
                        [-sin, cos, cy + sin * cx - cos * cy], [0, 0, 1]])
    if rng.random() < 0.5:
      shear = rng.uniform(-0.3, 0.3)
      m = m @ (np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]]) if rng.random() < 0.5 else
               np.array([[1, 0, 0], [shear, 1, 0], [0, 0, 1]]))
    if rng.random() < 0.5:
      m = m @ np.array([[1, 0, rng.uniform(-0.45, 0.45) * width],
                        [0, 1, rng.uniform(-0.45, 0.45) * height], [0, 0, 1]])
    if rng.random() < 0.5:
      m = np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]]) @ m
    (a, b, _), (d, e, _) = m[0], m[1]
    if not (0 < e <= max_scale and abs(a - b * d / e) <= max_scale):
      m = np.eye(3)
    maps.append(m[:2].reshape(6))
  return jnp.asarray(images), jnp.asarray(np.stack(maps), jnp.float32)
