"""The Pallas FFN (rmt_jax.kernels.tpu.feed_forward) against the plain form, in Pallas's
interpreter.

Values and the gradients of x and of every weight against fc1 -> GELU -> (+ XLA's grouped 3x3
conv) -> fc2 (float32 and bfloat16; one and several grid steps, two cores' partial sums, chunks
of hidden channels, images of one row or column), `layers.FeedForward` under `kernels='tpu'`
against `kernels='xla'`, the split over a mesh of CPU devices (per-device images, summed weight
gradients), the declared costs against the formula, and, with libtpu, Mosaic's compilation for
a v5p and a v4 (one chip) and a 4-chip v5p mesh.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_libtpu
from kernel_checks import (STAGES_WITH_HIDDEN, assert_bfloat16_within_its_rounding,
                           assert_equals_plain, assert_kernels_compile_for_a_v5p_and_a_v4,
                           assert_split_over_a_mesh_equals_one_device,
                           assert_tpu_form_equals_plain, blocks, kernel_calls,
                           values_and_gradients)
from rmt_jax.models import layers
from rmt_jax.kernels.tpu import feed_forward as tpu_feed_forward
from rmt_jax.kernels.tpu import common


def _plain(x, w1, b1, taps, bias, w2, b2):
  u = layers.gelu(jnp.dot(x, w1) + b1)
  conv = jax.lax.conv_general_dilated(u, taps, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=u.shape[-1])
  return jnp.dot(u + conv + bias, w2) + b2


def _kernel(x, w1, b1, taps, bias, w2, b2):
  return tpu_feed_forward.feed_forward(x, (w1, b1), (taps, bias), (w2, b2), interpret=True)


def _inputs(batch, height, width, dim, hidden, dtype, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(batch, height, width, dim), (dim, hidden), (hidden,), (3, 3, 1, hidden),
            (hidden,), (hidden, dim), (dim,), (batch, height, width, dim)]
  # Pre-activations of O(1): GELU is neither linear nor zero over them.
  scales = [1.0, dim ** -0.5, 0.5, 0.5, 0.5, hidden ** -0.5, 0.5, 1.0]
  return [jnp.asarray(rng.normal(size=s) * c, dtype) for s, c in zip(shapes, scales)]


NAMES = ('y', 'x', 'fc1 kernel', 'fc1 bias', 'conv kernel', 'conv bias', 'fc2 kernel',
         'fc2 bias')
Plan = tpu_feed_forward.Plan

# (batch, height, width, dim, hidden, plan): one step, band and chunk (60 tokens: not a whole
# bfloat16 tile, so the one band is the block); four steps over two cores, each of two 8 x 8
# images in four bands of 32 tokens (bands that cut images; halos of 16) and two chunks of 128
# hidden channels, the second with 56 of zero padding (200 -> 256); three steps (one core);
# images one row high and one column wide (every vertical or horizontal neighbour is outside).
CASES = [(2, 5, 6, 8, 24, Plan(2, 60, 128)),
         (8, 8, 8, 16, 200, Plan(2, 32, 128)),
         (3, 4, 4, 8, 16, Plan(1, 16, 128)),
         (2, 1, 8, 8, 16, Plan(2, 16, 128)),
         (2, 8, 1, 8, 16, Plan(2, 16, 128))]


@pytest.mark.parametrize('batch,height,width,dim,hidden,plan', CASES)
def test_values_and_gradients_equal_the_plain_form(batch, height, width, dim, hidden, plan,
                                                   monkeypatch):
  monkeypatch.setattr(tpu_feed_forward.Shape, 'plan', property(lambda self: plan))
  *args, cotangent = _inputs(batch, height, width, dim, hidden, jnp.float32)
  assert_equals_plain(_kernel, _plain, args, cotangent, NAMES)


@pytest.mark.parametrize('height,width,dim,hidden', STAGES_WITH_HIDDEN)
def test_plans_tile_the_tokens_within_the_vmem_budget(height, width, dim, hidden):
  padded = -(-hidden // 128) * 128
  shape = tpu_feed_forward.Shape(64 * height * width, height, width, dim, padded, 2)
  plan = shape.plan
  assert tpu_feed_forward.fits_vmem((64, height, width, dim), hidden, 2) == (plan is not None)
  # The weights stay in VMEM with their float32 gradients, which the last stage of RMT-S, -B
  # and -L (512 or 640 channels, 1536 or 1920 hidden) and the third of RMT-B and -L cannot do
  # within a v4's 16 MiB.
  assert (plan is None) == ((dim, hidden) in ((512, 1536), (320, 960), (448, 1344), (640, 1920)))
  if plan is None:
    return
  assert shape.vmem_bytes(plan) <= common.budget()
  tokens = plan.block_images * height * width
  assert 64 % plan.block_images == 0 and tokens % 16 == 0
  assert tokens % plan.band == 0 and plan.band % 16 == 0 and plan.band >= 2 * shape.halo
  assert padded % plan.chunk == 0 and plan.chunk % 128 == 0
  assert shape.halo >= width + 1 and shape.halo % 16 == 0


def test_bfloat16_within_its_rounding_of_the_plain_form():
  inputs = _inputs(4, 4, 4, 16, 48, jnp.float32, seed=1)

  def run(dtype):
    *args, cotangent = (a.astype(dtype) for a in inputs)
    return (values_and_gradients(_kernel, args, cotangent),
            values_and_gradients(_plain, args, cotangent))

  # The kernel keeps the hidden activations in float32 where the plain form rounds each step
  # to bfloat16: it is no farther from the float32 result, and within a few bfloat16 ulps
  # (2^-8) of the plain form.
  got = assert_bfloat16_within_its_rounding(run, NAMES, of_plain=2 ** -6)
  assert all(g.dtype == jnp.bfloat16 for g in got)


def test_feed_forward_under_tpu_kernels_equals_the_plain_form():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 5, 16)), jnp.float32)
  module = layers.FeedForward(48, kernels='xla')
  variables = module.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables['params']) == {
      'fc1': {'kernel': (16, 48), 'bias': (48,)},
      'dwconv': {'kernel': (3, 3, 1, 48), 'bias': (48,)},
      'fc2': {'kernel': (48, 16), 'bias': (16,)}}
  assert_tpu_form_equals_plain(module, x)


def test_weights_must_match_the_input():
  *args, _ = _inputs(2, 4, 4, 8, 16, jnp.float32)
  args[5] = jnp.zeros((16, 4))  # fc2 back to 4 channels, not 8
  with pytest.raises(ValueError, match='FFN weights for 8 -> 16 -> 8 channels'):
    _kernel(*args)


def test_split_over_a_mesh_equals_one_device():
  # y and the 7 gradients; each device's images and the weight gradients summed over devices.
  assert_split_over_a_mesh_equals_one_device('''
    from rmt_jax.kernels.tpu import feed_forward as tpu_feed_forward
    shapes = [(8, 4, 4, 8), (8, 16), (16,), (3, 3, 1, 16), (16,), (16, 8), (8,)]
    args = [jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32) for s in shapes]
    dy = jnp.asarray(rng.normal(size=shapes[0]), jnp.float32)
    f = lambda x, w1, b1, t, b, w2, b2: tpu_feed_forward.feed_forward(
        x, (w1, b1), (t, b), (w2, b2), interpret=True)
    def step(*args):
      y, vjp = jax.vjp(f, *args)
      return y, vjp(dy)
  ''', 8)


@pytest.mark.parametrize('batch,height,width,dim,hidden,dtype', [
    (64, 56, 56, 64, 192, jnp.bfloat16),  # RMT-T stage 1 at batch 64: one image a step, bands
    (64, 14, 14, 256, 768, jnp.bfloat16),  # RMT-S stage 3: several images a step, chunks
    (3, 4, 4, 8, 16, jnp.float32)])
def test_declared_costs_are_the_kernels_work(batch, height, width, dim, hidden, dtype):
  x = jax.ShapeDtypeStruct((batch, height, width, dim), dtype)
  weights = [jax.ShapeDtypeStruct(s, dtype) for s in [(dim, hidden), (hidden,),
                                                      (3, 3, 1, hidden), (hidden,),
                                                      (hidden, dim), (dim,)]]
  ffn = lambda x, w1, b1, t, b, w2, b2: tpu_feed_forward.feed_forward(
      x, (w1, b1), (t, b), (w2, b2), interpret=False)
  # The forward kernel has 8 operands (x, 6 weights -> y), the backward 14.
  forward, backward = kernel_calls(jax.make_jaxpr(lambda *a: jax.vjp(ffn, *a)[1](a[0]))(
      x, *weights))
  size = jnp.dtype(dtype).itemsize
  tokens = batch * height * width
  hidden = -(-hidden // 128) * 128  # the kernels see the hidden channels padded to 128 lanes
  shape = tpu_feed_forward.Shape(tokens, height, width, dim, hidden, size)
  plan = shape.plan
  # Each band computes fc1, GELU and the conv on itself and a halo on either side.
  bands = tokens // plan.band
  extended = bands * (plan.band + 2 * shape.halo)
  array = tokens * dim * size
  weight_elements = 2 * dim * hidden + 11 * hidden + dim
  product = 2 * dim * hidden  # a matmul's flops per token
  for eqn, flops, exps, arrays, extra in (
      (forward, product * (extended + tokens) + 18 * hidden * extended,
       hidden * extended, 2, 0),
      (backward, product * (2 * extended + 3 * tokens) + 18 * hidden * (2 * extended + tokens),
       hidden * (extended + 2 * tokens), 3, shape.cores * weight_elements * 4)):
    cost = eqn.params['cost_estimate']
    assert (cost.flops, cost.transcendentals, cost.bytes_accessed) == (
        flops, exps, arrays * array + weight_elements * size + extra)
    # Every token block is read or written once: the grid tiles the tokens exactly.
    cores, steps = eqn.params['grid_mapping'].grid
    token_blocks = [b for b in blocks(eqn) if b == (shape.block_tokens, dim)]
    assert len(token_blocks) == arrays and cores * steps * shape.block_tokens == tokens
    assert shape.block_tokens % (height * width) == 0
  if height == 56:
    assert plan.block_images == 1 and bands > 1  # a stage-1 image is cut into bands
  if hidden == 768:
    assert plan.block_images > 1 and shape.cores == 2


@needs_libtpu
def test_kernels_compile_for_a_v5p_and_a_v4():
  # RMT-S stages 1 (one 56 x 56 image a step, in bands) and 3; per chip of the mesh 4
  # images of 14 x 14 = 784 tokens.
  assert_kernels_compile_for_a_v5p_and_a_v4('''
    from rmt_jax.kernels.tpu import feed_forward as tpu_feed_forward
    def step(x, *weights):
      f = lambda x, w1, b1, t, b, w2, b2: tpu_feed_forward.feed_forward(
          x, (w1, b1), (t, b), (w2, b2))
      y, vjp = jax.vjp(f, x, *weights)
      return y, vjp(y)
    def args(mesh, x_spec, batch, size, dim, hidden):
      arrays = [((batch, size, size, dim), x_spec)] + [(s, PartitionSpec()) for s in (
          (dim, hidden), (hidden,), (3, 3, 1, hidden), (hidden,), (hidden, dim), (dim,))]
      return [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, p))
              for s, p in arrays]
  ''', [(4, 56, 64, 256), (32, 14, 256, 768)], (16, 14, 32, 96), 'bf16[784,32]')
