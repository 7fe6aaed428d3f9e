"""MaSA's output with LePE as Pallas kernels (`tpu_lepe`: attention + 5 x 5 depthwise conv of v)
against the plain form, in Pallas's interpreter; its plans, declared bytes, and its Mosaic
compile for a v5p and a v4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_libtpu
from kernel_checks import (STAGES, assert_bfloat16_within_its_rounding, assert_equals_plain,
                           assert_kernels_compile_for_a_v5p_and_a_v4,
                           assert_split_over_a_mesh_equals_one_device,
                           assert_the_official_fixtures_run_a_kernel_in_every_block,
                           values_and_gradients)
from rmt_jax.models import layers
from rmt_jax.kernels.tpu import lepe as tpu_lepe
from rmt_jax.kernels.tpu import common
from rmt_jax.kernels.tpu.lepe import Plan


def _plain(attention, v, kernel, bias):
  # The model's plain form (`DepthwiseConv`'s conv), in v's dtype.
  cast = lambda a: a.astype(v.dtype)
  return attention + layers.depthwise_conv(v, cast(kernel), cast(bias), 'xla')


def _kernel(attention, v, kernel, bias):
  return tpu_lepe.lepe_add(attention, v, kernel, bias, interpret=True)


def _inputs(batch, height, width, dim, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape, s=1.0: jnp.asarray(s * rng.normal(size=shape), jnp.float32)
  args = (normal(batch, height, width, dim).astype(dtype),
          normal(batch, height, width, dim).astype(dtype), normal(5, 5, 1, dim, s=0.2),
          normal(dim, s=0.1))
  return args, normal(batch, height, width, dim).astype(dtype)


@pytest.mark.parametrize('batch,height,width,dim,plan', [
    (2, 5, 6, 8, Plan(2, 60)),    # two images a step, one band
    (8, 4, 6, 8, Plan(4, 32)),    # bands straddle images
    (4, 8, 8, 16, Plan(1, 32)),   # one image a step, in two bands
    (3, 8, 8, 8, Plan(1, 16)),    # bands shorter than the halo
    (2, 3, 3, 8, Plan(1, 9))])    # images smaller than the conv
def test_values_and_gradients_equal_the_plain_form(batch, height, width, dim, plan,
                                                   monkeypatch):
  monkeypatch.setattr(tpu_lepe.Shape, 'plan', property(lambda self: plan))
  args, cotangent = _inputs(batch, height, width, dim)
  assert_equals_plain(_kernel, _plain, args, cotangent, ('o', 'attention', 'v', 'kernel', 'bias'))


def test_bfloat16_within_its_rounding_of_the_plain_form():
  args32, cotangent32 = _inputs(4, 6, 6, 16, seed=6)

  def run(dtype):
    args = (args32[0].astype(dtype), args32[1].astype(dtype), *args32[2:])
    cotangent = cotangent32.astype(dtype)
    return (values_and_gradients(_kernel, args, cotangent),
            values_and_gradients(_plain, args, cotangent))

  # Sums in float32 where the plain form may round some to bfloat16: no farther from the
  # float32 result than the plain form, and within two bfloat16 ulps of it.
  assert_bfloat16_within_its_rounding(run, of_float32=2 ** -7)


def test_split_over_a_mesh_equals_one_device():
  # o and the 4 gradients; each device's images, the conv's gradients summed over devices.
  assert_split_over_a_mesh_equals_one_device('''
    from rmt_jax.kernels.tpu import lepe as tpu_lepe
    shapes = [(8, 4, 4, 8), (8, 4, 4, 8), (5, 5, 1, 8), (8,)]
    args = [jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for s in shapes]
    dy = jnp.asarray(rng.normal(size=shapes[0]), jnp.float32)
    f = lambda a, v, k, b: tpu_lepe.lepe_add(a, v, k, b, interpret=True)
    def step(*args):
      y, vjp = jax.vjp(f, *args)
      return y, vjp(dy)
  ''', 5)


def test_plans():
  # Every stage of every variant has a plan within the budget (64 images per device, bfloat16
  # compute): whole images, stage 1 one image a step.
  for height, width, dim in STAGES:
    shape = tpu_lepe.Shape(64, height, width, dim, 2)
    plan = shape.plan
    assert plan is not None and tpu_lepe.fits_vmem((64, height, width, dim), 2)
    assert shape.vmem_bytes(plan) <= common.budget()
    assert 64 % plan.block_images == 0 and plan.block_images * height * width % plan.band == 0
    assert plan.block_images == 1 or height != 56


def test_a_masa_under_tpu_kernels_equals_the_plain_forms():
  # A small MaSA: the LePE kernel runs (plan), the same parameters as the other path.
  masa = lambda kernels: layers.ManhattanSelfAttention(4, 2.0, 4.0, True, kernels=kernels)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 8, 8, 32)), jnp.float32)
  variables = masa('xla').init(jax.random.key(0), x)
  assert tpu_lepe.fits_vmem(x.shape, 4)
  assert_equals_plain(lambda v, x: masa('tpu').apply(v, x),
                      lambda v, x: masa('xla').apply(v, x), (variables, x), x)


@pytest.mark.parametrize('images,size,c', [(16, 14, 32), (4, 56, 64)])
def test_declared_bytes_are_every_array_and_weight_once(images, size, c):
  # bfloat16 compute.
  n = images * size * size
  shape = tpu_lepe.Shape(images, size, size, c, 2)
  forward, backward = tpu_lepe.cost_estimates(shape)
  weights = 26 * c * 2
  assert forward.bytes_accessed == 3 * n * c * 2 + weights
  assert backward.bytes_accessed == 3 * n * c * 2 + weights + shape.cores * 26 * c * 4
  assert backward.flops > forward.flops > 2 * 25 * n * c


@needs_libtpu
def test_kernels_compile_for_a_v5p_and_a_v4():
  # RMT-S stages 1 (one 56 x 56 image a step), 2 and 3 (bfloat16), 2, 8 and 16 images per chip;
  # per chip of the mesh 4 images of 14 rows of 14 tokens: rows arrays of (56, 14, 32).
  assert_kernels_compile_for_a_v5p_and_a_v4('''
    from rmt_jax.kernels.tpu import lepe as tpu_lepe
    def step(a, v, k, b):
      y, vjp = jax.vjp(tpu_lepe.lepe_add, a, v, k, b)
      return y, vjp(y)
    def args(mesh, x_spec, batch, size, dim):
      arrays = [((batch, size, size, dim), x_spec, jnp.bfloat16)] * 2
      arrays += [((5, 5, 1, dim), PartitionSpec(), jnp.float32),
                 ((dim,), PartitionSpec(), jnp.float32)]
      return [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, p)) for s, p, d in arrays]
  ''', [(2, 56, 64), (8, 28, 128), (16, 14, 256)], (16, 14, 32), 'bf16[56,14,32]')


def test_the_official_fixtures_run_it_in_every_block():
  # The forward kernel: 5 blocks (v, the attention's output, taps, bias, o).
  assert_the_official_fixtures_run_a_kernel_in_every_block(0, 5)
