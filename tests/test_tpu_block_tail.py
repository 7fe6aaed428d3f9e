"""The block's second half as Pallas kernels (`tpu_block_tail`) against the model's plain form
(`layers.block_second_half`), in Pallas's interpreter; its plans, declared bytes, and its Mosaic
compile for a v5p and a v4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_libtpu
from kernel_checks import (STAGES_WITH_HIDDEN, assert_bfloat16_within_its_rounding,
                           assert_equals_plain, assert_kernels_compile_for_a_v5p_and_a_v4,
                           assert_split_over_a_mesh_equals_one_device,
                           assert_the_official_fixtures_run_a_kernel_in_every_block,
                           values_and_gradients)
from rmt_jax.models import layers
from rmt_jax.kernels.tpu import block_tail as tpu_block_tail
from rmt_jax.kernels.tpu import common
from rmt_jax.kernels.tpu.block_tail import Plan


def _plain(x1, o, wo, bo, scale, shift, w1, b1, taps, bias, w2, b2, gammas=None, scales=None):
  # The model's plain form; `RetBlock` hands it the FFN's weights in the compute dtype.
  cast = lambda *a: tuple(w.astype(o.dtype) for w in a)
  return layers.block_second_half(x1, o, (wo, bo), (scale, shift),
                                  (cast(w1, b1), cast(taps, bias), cast(w2, b2)), gammas, scales)


def _kernel(x1, o, wo, bo, scale, shift, w1, b1, taps, bias, w2, b2):
  return tpu_block_tail.block_second_half(x1, o, (wo, bo), (scale, shift),
                                          ((w1, b1), (taps, bias), (w2, b2)))


def _inputs(batch, height, width, dim, hidden, dtype, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape, s=1.0: jnp.asarray(s * rng.normal(size=shape), jnp.float32)
  x1 = normal(batch, height, width, dim)
  o = normal(batch, height, width, dim).astype(dtype)
  return (x1, o, normal(dim, dim, s=dim ** -0.5), normal(dim, s=0.1), 1 + normal(dim, s=0.1),
          normal(dim, s=0.1), normal(dim, hidden, s=dim ** -0.5), normal(hidden, s=0.1),
          normal(3, 3, 1, hidden, s=0.3), normal(hidden, s=0.1),
          normal(hidden, dim, s=hidden ** -0.5), normal(dim, s=0.1),
          normal(batch, height, width, dim))


@pytest.mark.parametrize('batch,height,width,dim,hidden,plan', [
    (2, 5, 6, 8, 24, Plan(10, 60, 128)),   # two images a step, one band
    (8, 8, 8, 16, 200, Plan(16, 32, 128)),
    (3, 4, 4, 8, 16, Plan(4, 16, 128)),
    # Blocks of part of an image (the rows above and below read as halos): half an image a
    # step; a quarter of one, in bands shorter than the halo.
    (2, 8, 8, 16, 48, Plan(4, 32, 128)),
    (3, 8, 8, 8, 16, Plan(2, 16, 128))])
def test_values_and_gradients_equal_the_plain_form(batch, height, width, dim, hidden, plan,
                                                   monkeypatch):
  monkeypatch.setattr(tpu_block_tail.Shape, 'plan', property(lambda self: plan))
  *args, cotangent = _inputs(batch, height, width, dim, hidden, jnp.float32)
  assert_equals_plain(_kernel, _plain, args, cotangent,
                      ('x3', 'x1', 'o', 'out_proj kernel', 'out_proj bias', 'norm scale',
                       'norm bias', 'fc1 kernel', 'fc1 bias', 'conv kernel', 'conv bias',
                       'fc2 kernel', 'fc2 bias'))


@pytest.mark.parametrize('batch,height,width,dim,hidden,plan', [
    (8, 4, 6, 8, 16, Plan(16, 32, 128)),   # bands straddle images
    (4, 5, 6, 8, 24, Plan(10, 60, 128)),   # one band of two images
    (4, 8, 8, 8, 16, Plan(4, 16, 128))])   # half an image a step, in two bands
def test_drop_path_and_layerscale_equal_the_plain_form(batch, height, width, dim, hidden, plan,
                                                       monkeypatch):
  monkeypatch.setattr(tpu_block_tail.Shape, 'plan', property(lambda self: plan))
  *args, cotangent = _inputs(batch, height, width, dim, hidden, jnp.float32, seed=3)
  rng = np.random.default_rng(4)
  gammas = jnp.asarray(rng.normal(size=(2, dim)), jnp.float32)
  keep = 0.8
  scales = jnp.asarray(rng.integers(0, 2, size=(2, batch)) / keep, jnp.float32)
  assert 0 < float(scales.mean()) < 1 / keep  # some images dropped, some kept

  def kernel(*a):
    return tpu_block_tail.block_second_half(
        a[0], a[1], (a[2], a[3]), (a[4], a[5]), ((a[6], a[7]), (a[8], a[9]), (a[10], a[11])),
        gammas=(a[12][0], a[12][1]), drop_scales=scales)

  plain = lambda *a: _plain(*a[:12], gammas=(a[12][0], a[12][1]), scales=scales)
  assert_equals_plain(kernel, plain, (*args, gammas), cotangent)


def test_split_over_a_mesh_equals_one_device():
  # x3 and the 14 gradients; each device's images, the weight gradients summed over devices.
  assert_split_over_a_mesh_equals_one_device('''
    from rmt_jax.kernels.tpu import block_tail as tpu_block_tail
    shapes = [(8, 4, 4, 8), (8, 4, 4, 8), (8, 8), (8,), (8,), (8,), (8, 16), (16,),
              (3, 3, 1, 16), (16,), (16, 8), (8,), (2, 8)]
    args = [jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for s in shapes]
    dy = jnp.asarray(rng.normal(size=shapes[0]), jnp.float32)
    scales = jnp.asarray([[1.25, 0, 1.25, 1.25, 0, 1.25, 1.25, 1.25],
                          [0, 1.25, 1.25, 1.25, 1.25, 0, 1.25, 1.25]], jnp.float32)
    f = lambda x1, o, wo, bo, s, b, w1, b1, t, cb, w2, b2, g: tpu_block_tail.block_second_half(
        x1, o, (wo, bo), (s, b), ((w1, b1), (t, cb), (w2, b2)), gammas=(g[0], g[1]),
        drop_scales=scales, interpret=True)
    def step(*args):
      y, vjp = jax.vjp(f, *args)
      return y, vjp(dy)
  ''', 14)


@pytest.mark.parametrize('stream', [4, 2])
def test_plans(stream):
  # Which stages get a plan within the budget (64 images per device, bfloat16 compute): all but
  # the last of RMT-T and -S and the first two of RMT-B and -L (the others' weights with their
  # float32 gradients leave too little VMEM); stage 1 in blocks of part of an image. Each of
  # these plans compiles for a v4 and a v5p at 64 images (the suite compiles three at fewer,
  # below).
  planned, parts = [], []
  for height, width, dim, hidden in STAGES_WITH_HIDDEN:
    shape = tpu_block_tail.Shape(64 * height * width, height, width, dim,
                                 -(-hidden // 128) * 128, 2, stream)
    plan = shape.plan
    fits = tpu_block_tail.fits_vmem((64, height, width, dim), hidden, 2, stream)
    assert fits == (plan is not None)
    if plan is None:
      continue
    assert shape.vmem_bytes(plan) <= common.budget()
    rows = plan.block_rows
    assert (rows % height == 0 and 64 % (rows // height) == 0) or height % rows == 0
    assert rows * width % plan.band == 0 and hidden <= shape.hidden
    planned.append((height, dim, hidden))
    if rows < height:
      parts.append(height)
  assert planned == [(56, 64, 192), (28, 128, 384), (14, 256, 768), (56, 64, 256),
                     (28, 128, 512), (56, 80, 320), (28, 160, 640), (56, 112, 448),
                     (28, 224, 896)]
  assert 56 in parts and 14 not in parts


@pytest.mark.parametrize('layerscale,drop_path', [(False, 0.0), (True, 0.0), (True, 0.5)])
def test_a_block_under_tpu_kernels_equals_the_plain_forms(layerscale, drop_path):
  # Stage-2-like block, small: the tail kernel runs (plan), the same parameters and dropout
  # masks as the block's other path.
  block = lambda kernels: layers.RetBlock(4, 2.0, 4.0, True, 3.0, drop_path=drop_path,
                                          layerscale=layerscale, layer_init_values=0.5,
                                          kernels=kernels)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 8, 8, 32)), jnp.float32)
  variables = block('xla').init(jax.random.key(0), x)
  rngs = {'dropout': jax.random.key(1)}
  assert tpu_block_tail.fits_vmem(x.shape, 96, 4, 4)
  assert_equals_plain(lambda v, x: block('tpu').apply(v, x, True, rngs=rngs),
                      lambda v, x: block('xla').apply(v, x, True, rngs=rngs), (variables, x), x)


def test_bfloat16_within_its_rounding_of_the_plain_form():
  # bfloat16 compute (o and the weights), float32 stream (x1) as in the official recipe.
  inputs = _inputs(4, 4, 4, 16, 48, jnp.float32, seed=6)

  def run(dtype):
    x1, o, *weights, cotangent = inputs
    args = (x1, o.astype(dtype), *weights)
    return (values_and_gradients(_kernel, args, cotangent),
            values_and_gradients(_plain, args, cotangent))

  # The kernel keeps the branches, the norm and the hidden activations in float32 where the
  # plain form rounds some steps to bfloat16: no farther from the float32 result, and within a
  # few bfloat16 ulps of the plain form.
  assert_bfloat16_within_its_rounding(run, of_plain=2 ** -6)


@pytest.mark.parametrize('stream', [4, 2])
@pytest.mark.parametrize('images,size,c,h', [
    (16, 14, 32, 128),   # 16 images of 14 x 14 x 32 -> 96 hidden (padded to 128), whole images
    (4, 56, 64, 256)])   # RMT-S stage 1: blocks of 8 of an image's 56 rows
def test_declared_bytes_are_every_array_and_weight_once(stream, images, size, c, h):
  # bfloat16 compute.
  n = images * size * size
  shape = tpu_block_tail.Shape(n, size, size, c, h, 2, stream)
  forward, backward = tpu_block_tail.cost_estimates(shape, stream)
  weights = (2 * c * h + 11 * h + c) * 2 + (c * c + c) * 2 + 4 * c * 4
  gradients = shape.cores * ((2 * c * h + 11 * h + c) + (c * c + c) + 4 * c) * 4
  # A block of part of an image reads the row above and the row below it of each input.
  rows = shape.plan.block_rows
  edges = 0 if rows >= size else 2 * (images * size // rows) * size * c
  assert (edges > 0) == (size == 56)
  assert forward.bytes_accessed == n * c * (2 + 2 * stream) + weights + edges * (2 + stream)
  assert backward.bytes_accessed == (n * c * (2 * 2 + 3 * stream) + weights + gradients
                                     + edges * (2 + 2 * stream))
  assert backward.flops > forward.flops > 2 * n * c * (c + 2 * h)


@needs_libtpu
def test_kernels_compile_for_a_v5p_and_a_v4():
  # RMT-S stages 1 (blocks of 8 of an image's 56 rows), 2 and 3 (float32 stream, bfloat16
  # compute), 2, 8 and 16 images per chip; per chip of the mesh 4 images of 14 rows of 14
  # tokens: rows arrays of (56, 14, 32).
  assert_kernels_compile_for_a_v5p_and_a_v4('''
    from rmt_jax.kernels.tpu import block_tail as tpu_block_tail
    def step(x1, o, scales, wo, bo, s, b, w1, b1, t, cb, w2, b2, g):
      f = lambda x1, o, wo, bo, s, b, w1, b1, t, cb, w2, b2, g: (
          tpu_block_tail.block_second_half(x1, o, (wo, bo), (s, b), ((w1, b1), (t, cb), (w2, b2)),
                                           gammas=(g[0], g[1]), drop_scales=scales))
      y, vjp = jax.vjp(f, x1, o, wo, bo, s, b, w1, b1, t, cb, w2, b2, g)
      return y, vjp(y)
    def args(mesh, x_spec, batch, size, dim, hidden):
      arrays = [((batch, size, size, dim), x_spec, jnp.float32),
                ((batch, size, size, dim), x_spec, jnp.bfloat16),
                ((2, batch), PartitionSpec(None, *x_spec), jnp.float32)]
      arrays += [(s, PartitionSpec(), jnp.float32) for s in ((dim, dim), (dim,), (dim,), (dim,))]
      arrays += [(s, PartitionSpec(), jnp.bfloat16) for s in (
          (dim, hidden), (hidden,), (3, 3, 1, hidden), (hidden,), (hidden, dim), (dim,))]
      arrays += [((2, dim), PartitionSpec(), jnp.bfloat16)]
      return [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, p)) for s, p, d in arrays]
  ''', [(2, 56, 64, 256), (8, 28, 128, 512), (16, 14, 256, 768)], (16, 14, 32, 96),
      'f32[56,14,32]')


def test_the_official_fixtures_run_it_in_every_block():
  # The forward kernel: a scalar-prefetch operand (the drop scales) and 14 blocks (o, x1, 11
  # weights, x3).
  assert_the_official_fixtures_run_a_kernel_in_every_block(1, 14)
