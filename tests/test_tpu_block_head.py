"""The block's first half up to the attention as Pallas kernels (`tpu_block_head`: x1 = x +
pos(x) and MaSA's q, k, v) against the plain form, in Pallas's interpreter; its plans, declared
bytes, and its Mosaic compile for a v5p and a v4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_libtpu, relative_error
from kernel_checks import (STAGES, assert_bfloat16_within_its_rounding, assert_equals_plain,
                           assert_kernels_compile_for_a_v5p_and_a_v4,
                           assert_split_over_a_mesh_equals_one_device,
                           assert_the_official_fixtures_run_a_kernel_in_every_block,
                           pallas_calls, values_and_gradients)
from rmt_jax.models import layers
from rmt_jax.kernels.tpu import block_head as tpu_block_head
from rmt_jax.kernels.tpu import common
from rmt_jax.kernels.tpu.block_head import Plan

SCALES = (1.0, 0.25, 1.0)


def _plain(x, taps, conv_bias, scale, shift, *weights, dtype=jnp.float32):
  # The model's plain forms: `DepthwiseConv`'s conv in the compute dtype, then MaSA's norm and
  # projections (`tpu_projections`' reference).
  cast = lambda a: a.astype(dtype)
  x1 = x + layers.depthwise_conv(cast(x), cast(taps), cast(conv_bias), 'xla')
  xn = layers.apply_layer_norm(x1, scale, shift).astype(dtype)
  return (x1, *((jnp.dot(xn, cast(w)) + cast(b)) * jnp.asarray(s, dtype)
                for w, b, s in zip(weights[::2], weights[1::2], SCALES)))


def _kernel(x, taps, conv_bias, scale, shift, *weights, dtype=jnp.float32):
  return tpu_block_head.block_first_half(
      x, (taps, conv_bias), (scale, shift), tuple(zip(weights[::2], weights[1::2])), SCALES,
      eps=1e-6, dtype=dtype, interpret=True)


def _inputs(batch, height, width, dim, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape, s=1.0: jnp.asarray(s * rng.normal(size=shape), jnp.float32)
  args = (normal(batch, height, width, dim), normal(3, 3, 1, dim, s=0.3), normal(dim, s=0.1),
          1 + normal(dim, s=0.1), normal(dim, s=0.1))
  for _ in SCALES:
    args += (normal(dim, dim, s=dim ** -0.5), normal(dim, s=0.1))
  cotangents = tuple(normal(batch, height, width, dim) for _ in range(4))
  return args, cotangents


NAMES = ('x', 'pos kernel', 'pos bias', 'norm scale', 'norm bias', 'q kernel', 'q bias',
         'k kernel', 'k bias', 'v kernel', 'v bias')


@pytest.mark.parametrize('batch,height,width,dim,plan', [
    (2, 5, 6, 8, Plan(10, 60)),   # two images a step, one band
    (8, 4, 6, 8, Plan(16, 32)),   # bands straddle images
    (4, 8, 8, 16, Plan(8, 32)),   # one image a step, in two bands
    # Blocks of part of an image (the rows above and below read as halos): half an image a
    # step; a quarter of one, in bands shorter than the halo.
    (2, 8, 8, 16, Plan(4, 32)),
    (3, 8, 8, 8, Plan(2, 16))])
def test_values_and_gradients_equal_the_plain_form(batch, height, width, dim, plan,
                                                   monkeypatch):
  monkeypatch.setattr(tpu_block_head.Shape, 'plan', property(lambda self: plan))
  args, cotangents = _inputs(batch, height, width, dim)
  assert_equals_plain(_kernel, _plain, args, cotangents, ('x1', 'q', 'k', 'v') + NAMES)


@pytest.mark.parametrize('uses', [(2, 2, 2), (1, 1, 2)])
def test_the_cotangents_of_several_uses_are_summed(uses, monkeypatch):
  # MaSA's q, k, v each for two consumers (axial), or v alone (whole attention): each use's
  # cotangent apart, summed in the backward kernel; half an image a step.
  monkeypatch.setattr(tpu_block_head.Shape, 'plan', property(lambda self: Plan(4, 32)))
  args, (dx1, *dys) = _inputs(2, 8, 8, 16, seed=2)
  rng = np.random.default_rng(3)
  kernel = lambda *a: tpu_block_head.block_first_half(
      a[0], (a[1], a[2]), (a[3], a[4]), tuple(zip(a[5::2], a[6::2])), SCALES, eps=1e-6,
      dtype=jnp.float32, uses=uses, interpret=True)
  got, got_vjp = jax.vjp(kernel, *args)
  assert [len(out) for out in got[1:]] == list(uses)
  assert all(bool((t == out[0]).all()) for out in got[1:] for t in out)
  cotangents = [tuple(jnp.asarray(rng.normal(size=dy.shape), jnp.float32) for _ in range(n))
                for dy, n in zip(dys, uses)]
  want, want_vjp = jax.vjp(_plain, *args)
  for g, w in zip((got[0], *(out[0] for out in got[1:])), want):
    assert relative_error(g, w) < 1e-5
  summed = (dx1, *(sum(c) for c in cotangents))
  for name, g, w in zip(NAMES, got_vjp((dx1, *cotangents)), want_vjp(summed)):
    assert relative_error(g, w) < 1e-5, name


def test_bfloat16_within_its_rounding_of_the_plain_form():
  # bfloat16 compute, float32 stream as in the official recipe.
  args, cotangents = _inputs(4, 4, 4, 16, seed=6)

  def run(dtype):
    cts = (cotangents[0], *(c.astype(dtype) for c in cotangents[1:]))
    return (values_and_gradients(lambda *a: _kernel(*a, dtype=dtype), args, cts),
            values_and_gradients(lambda *a: _plain(*a, dtype=dtype), args, cts))

  # Sums in float32 where the plain form rounds some to bfloat16 (its bias gradients are 2-12
  # times farther from the float32 result): no farther from that than the plain form, and
  # within two bfloat16 ulps of it.
  assert_bfloat16_within_its_rounding(run, of_float32=2 ** -7)


def test_split_over_a_mesh_equals_one_device():
  # x1, q, k, v and the 11 gradients; each device's images, the weight gradients summed.
  assert_split_over_a_mesh_equals_one_device('''
    from rmt_jax.kernels.tpu import block_head as tpu_block_head
    shapes = [(8, 4, 4, 8), (3, 3, 1, 8), (8,), (8,), (8,)] + [(8, 8), (8,)] * 3
    args = [jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for s in shapes]
    dy = tuple(jnp.asarray(rng.normal(size=shapes[0]), jnp.float32) for _ in range(4))
    f = lambda x, t, cb, s, b, wq, bq, wk, bk, wv, bv: tpu_block_head.block_first_half(
        x, (t, cb), (s, b), ((wq, bq), (wk, bk), (wv, bv)), (1.0, 0.5, 1.0), eps=1e-6,
        dtype=jnp.float32, interpret=True)
    def step(*args):
      y, vjp = jax.vjp(f, *args)
      return y, vjp(dy)
  ''', 15)


@pytest.mark.parametrize('stream', [4, 2])
def test_plans(stream):
  # Which stages get a plan within the budget (64 images per device, bfloat16 compute) with one
  # cotangent per projection, with v's two (whole attention: v for the attention and LePE) and
  # with each of q, k, v's two (axial): all but RMT-L's last two (its weights with their float32
  # gradients leave too little VMEM), and with more cotangents fewer. MaSA takes the most uses
  # that fit (`layers.ManhattanSelfAttention`). Stage 1 in blocks of part of an image.
  unplanned = {}
  for uses in ((1, 1, 1), (1, 1, 2), (2, 2, 2)):
    unplanned[uses] = []
    for height, width, dim in STAGES:
      shape = tpu_block_head.Shape(64, height, width, dim, 3, 2, stream, sum(uses))
      plan = shape.plan
      assert tpu_block_head.fits_vmem((64, height, width, dim), 3, 2, stream, uses) == (
          plan is not None)
      if plan is None:
        unplanned[uses].append((height, dim))
        continue
      assert shape.vmem_bytes(plan) <= common.budget()
      rows = plan.block_rows
      assert (rows % height == 0 and 64 % (rows // height) == 0) or height % rows == 0
      assert rows * width % plan.band == 0
      assert rows < height or height != 56, (height, dim, plan)
  rmt_l = [(14, 448), (7, 640)]
  assert unplanned[(1, 1, 1)] == rmt_l
  assert unplanned[(1, 1, 2)] == ([(14, 320)] if stream == 4 else []) + rmt_l
  assert unplanned[(2, 2, 2)] == [(7, 512)] + ([(14, 320)] if stream == 4 else []) + rmt_l


def test_a_block_under_tpu_kernels_equals_the_plain_forms():
  # A small block: the head kernel runs (plan), the same parameters as the block's other path.
  block = lambda kernels: layers.RetBlock(4, 2.0, 4.0, True, 3.0, kernels=kernels)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 8, 8, 32)), jnp.float32)
  variables = block('xla').init(jax.random.key(0), x)
  assert tpu_block_head.fits_vmem(x.shape, 3, 4, 4)
  assert_equals_plain(lambda v, x: block('tpu').apply(v, x),
                      lambda v, x: block('xla').apply(v, x), (variables, x), x)


def test_a_block_takes_one_cotangent_per_output_where_every_use_does_not_fit(monkeypatch):
  # RMT-B's third stage with a float32 stream: the kernel with one cotangent per output, and
  # autodiff adds the other uses' (the same function).
  fits = tpu_block_head.fits_vmem
  monkeypatch.setattr(tpu_block_head, 'fits_vmem',
                      lambda *args, uses=None: fits(*args, uses=uses) and max(uses or (1,)) == 1)
  block = lambda kernels: layers.RetBlock(4, 2.0, 4.0, True, 3.0, kernels=kernels)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 8, 8, 32)), jnp.float32)
  variables = block('xla').init(jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(jax.grad(lambda v: block('tpu').apply(v, x).sum()))(variables)
  # The backward kernel: x, x1, dx1, one cotangent per output, six weights and the outputs.
  assert any(len(eqn.params['grid_mapping'].block_mappings) == 3 + 3 + 6 + 7
             for eqn in pallas_calls(jaxpr.jaxpr))
  assert_equals_plain(lambda v, x: block('tpu').apply(v, x),
                      lambda v, x: block('xla').apply(v, x), (variables, x), x)


@pytest.mark.parametrize('stream', [4, 2])
@pytest.mark.parametrize('images,size,c', [
    (16, 14, 32),   # whole images
    (4, 56, 64)])   # RMT-S stage 1: blocks of part of an image's 56 rows
def test_declared_bytes_are_every_array_and_weight_once(stream, images, size, c):
  # bfloat16 compute.
  n = images * size * size
  shape = tpu_block_head.Shape(images, size, size, c, 3, 2, stream)
  forward, backward = tpu_block_head.cost_estimates(shape)
  weights = (3 * c * c + 3 * c + 10 * c) * 2 + 2 * c * 4
  gradients = shape.cores * (3 * c * c + 3 * c + 12 * c) * 4
  # A block of part of an image reads the row above and the row below it of each input.
  rows = shape.plan.block_rows
  edges = 0 if rows >= size else 2 * (images * size // rows) * size * c
  assert (edges > 0) == (size == 56)
  assert forward.bytes_accessed == n * c * (2 * stream + 3 * 2) + weights + edges * stream
  assert backward.bytes_accessed == (n * c * (4 * stream + 3 * 2) + weights + gradients
                                     + edges * (3 * stream + 3 * 2))
  assert backward.flops > forward.flops > 2 * n * c * 3 * c


@needs_libtpu
def test_kernels_compile_for_a_v5p_and_a_v4():
  # RMT-S stages 1 (blocks of part of an image's 56 rows), 2 and 3 (float32 stream, bfloat16
  # compute, two uses of each projection as MaSA's axial stages), 2, 8 and 16 images per chip;
  # per chip of the mesh 4 images of 14 rows of 14 tokens: rows arrays of (56, 14, 32).
  assert_kernels_compile_for_a_v5p_and_a_v4('''
    from rmt_jax.kernels.tpu import block_head as tpu_block_head
    def step(x, t, cb, s, b, wq, bq, wk, bk, wv, bv):
      f = lambda x, t, cb, s, b, wq, bq, wk, bk, wv, bv: tpu_block_head.block_first_half(
          x, (t, cb), (s, b), ((wq, bq), (wk, bk), (wv, bv)), (1.0, 0.25, 1.0), eps=1e-6,
          dtype=jnp.bfloat16, uses=(2, 2, 2))
      y, vjp = jax.vjp(f, x, t, cb, s, b, wq, bq, wk, bk, wv, bv)
      return y, vjp(y)
    def args(mesh, x_spec, batch, size, dim):
      arrays = [((batch, size, size, dim), x_spec, jnp.float32), ((3, 3, 1, dim),), ((dim,),),
                ((dim,),), ((dim,),)] + [((dim, dim),), ((dim,),)] * 3
      return [jax.ShapeDtypeStruct(a[0], a[2] if len(a) > 2 else jnp.float32,
                                   sharding=NamedSharding(mesh, a[1] if len(a) > 1
                                                          else PartitionSpec()))
              for a in arrays]
  ''', [(2, 56, 64), (8, 28, 128), (16, 14, 256)], (16, 14, 32), 'f32[56,14,32]')


def test_the_official_fixtures_run_it_in_every_block():
  # The forward kernel: 11 blocks (x, 6 weights, x1, q, k, v).
  assert_the_official_fixtures_run_a_kernel_in_every_block(0, 11)
