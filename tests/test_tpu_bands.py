"""Image tokens in bands (rmt_jax.kernels.tpu.bands), in Pallas's interpreter.

A depthwise k x k conv (k = 3, as the FFN kernel uses it, and 5), its transpose and its
kernel's gradient computed band by band from `Neighbours` against XLA's grouped convolution
and its VJP; the sizes the kernels choose from.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from conftest import relative_error
from rmt_jax.kernels.tpu import bands as tpu_bands


def _plain(x, kernel):
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=x.shape[-1])


def _kernel(x_ref, taps_ref, dz_ref, y_ref, dx_ref, dtaps_ref, x_padded, dz_padded, *, height,
            width, band, radius):
  halo = tpu_bands.halo(width, radius)
  size = 2 * radius + 1
  tpu_bands.with_halo(x_padded, x_ref, halo)
  tpu_bands.with_halo(dz_padded, dz_ref, halo)
  dtaps_ref[...] = jnp.zeros(dtaps_ref.shape, dtaps_ref.dtype)
  kept = slice(halo, halo + band)

  def body(first):
    x = x_padded[pl.ds(first, band + 2 * halo), :]
    dz = dz_padded[pl.ds(first, band + 2 * halo), :]
    near = tpu_bands.Neighbours(band + 2 * halo, height, width, first - halo)
    columns = near.columns(x, radius)
    y_ref[pl.ds(first, band), :] = near.conv(columns, taps_ref[...])[kept]
    moved_rows = near.conv_transpose_rows(dz, radius)
    dx_ref[pl.ds(first, band), :] = near.conv_transpose(moved_rows, taps_ref[...])[kept]
    dtaps_ref[...] += jnp.concatenate(
        [(moved_rows[i][kept] * columns[j][kept]).sum(axis=0, keepdims=True)
         for i in range(size) for j in range(size)], axis=0)

  tpu_bands.for_each_band(x_ref.shape[0], band, body)


# (batch, height, width, channels, k, band): bands that cut images (halo 16 for k = 3 on 8 x 8,
# 32 for k = 5), a band of the whole block, images one pixel wide.
@pytest.mark.parametrize('batch,height,width,channels,size,band', [
    (2, 8, 8, 8, 3, 32), (2, 8, 8, 8, 5, 64), (3, 5, 6, 4, 5, 90), (2, 8, 1, 4, 3, 16)])
def test_band_conv_its_transpose_and_kernel_gradient_equal_xla(batch, height, width, channels,
                                                               size, band):
  rng = np.random.default_rng(0)
  x, dz = (jnp.asarray(rng.normal(size=(batch, height, width, channels)), jnp.float32)
           for _ in range(2))
  kernel = jnp.asarray(rng.normal(size=(size, size, 1, channels)), jnp.float32)
  tokens = batch * height * width
  halo = tpu_bands.halo(width, size // 2)
  flat = lambda a: a.reshape(tokens, channels)
  y, dx, dtaps = pl.pallas_call(
      functools.partial(_kernel, height=height, width=width, band=band, radius=size // 2),
      out_shape=[jax.ShapeDtypeStruct((tokens, channels), jnp.float32)] * 2
      + [jax.ShapeDtypeStruct((size * size, channels), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((tokens + 2 * halo, channels), jnp.float32)] * 2,
      interpret=True)(flat(x), kernel.reshape(size * size, channels), flat(dz))
  want, vjp = jax.vjp(_plain, x, kernel)
  want_dx, want_dkernel = vjp(dz)
  assert relative_error(y, flat(want)) < 1e-6
  assert relative_error(dx, flat(want_dx)) < 1e-6
  assert relative_error(dtaps, want_dkernel.reshape(size * size, channels)) < 1e-6


def test_sizes_to_choose_from():
  assert tpu_bands.halo(56, 1) == 64 and tpu_bands.halo(14, 2) == 32 and tpu_bands.halo(7, 1) == 16
  # 64 images of 7 x 7: blocks of 16 images (784 tokens) fill whole tiles; one image does not.
  assert tpu_bands.image_blocks(64, 49, 2048) == [32, 16]
  assert tpu_bands.image_blocks(2, 49, 2048) == [2]  # all the images, not a whole tile
  assert tpu_bands.image_blocks(4, 3136, 2048) == [1]  # one image over the limit, the smallest
  # Bands divide the block in whole tiles, at least twice the halo; a block that is not a whole
  # number of tiles is one band.
  assert tpu_bands.bands(3136, 64) == [3136, 1568, 784, 448, 224]
  assert tpu_bands.bands(60, 16) == [60]
