"""The Pallas layer norm + q/k/v projections (rmt_jax.kernels.tpu.projections) against the plain
form, in Pallas's interpreter.

Values and the gradients of x, the norm's scale and bias and every weight against flax's
LayerNorm -> matmuls (float32 and bfloat16; one and several grid steps, two cores' partial
sums, rows of 7 tokens, output width unlike the input's), `layers.RetBlock` under
`kernels='tpu'` against `kernels='xla'` where the first-half kernel does not fit, the split
over a mesh of CPU devices, the plans for every stage of the four variants, the declared costs
against the formula, and, with libtpu, Mosaic's compilation for a v5p and a v4 (one chip) and a
4-chip v5p mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_libtpu
from kernel_checks import (assert_bfloat16_within_its_rounding, assert_equals_plain,
                           assert_kernels_compile_for_a_v5p_and_a_v4,
                           assert_split_over_a_mesh_equals_one_device,
                           assert_tpu_form_equals_plain, blocks, kernel_calls,
                           values_and_gradients)
from rmt_jax.models import layers, variants
from rmt_jax.kernels.tpu import block_head as tpu_block_head
from rmt_jax.kernels.tpu import projections as tpu_projections
from rmt_jax.kernels.tpu import common

SCALES = (1.0, 0.25, 1.0)


def _plain(x, scale, bias, *weights, dtype):
  xn = layers.apply_layer_norm(x, scale, bias).astype(dtype)
  return tuple((jnp.dot(xn, w.astype(dtype)) + b.astype(dtype)) * jnp.asarray(s, dtype)
               for w, b, s in zip(weights[::2], weights[1::2], SCALES))


def _kernel(x, scale, bias, *weights, dtype):
  return tpu_projections.normalized_projections(
      x, (scale, bias), tuple(zip(weights[::2], weights[1::2])), SCALES, eps=1e-6,
      dtype=dtype, interpret=True)


def _inputs(batch, height, width, dim, features, seed=0):
  rng = np.random.default_rng(seed)
  # A stream with a mean and a spread per token, as the residual stream has.
  x = rng.normal(size=(batch, height, width, dim)) * rng.uniform(0.5, 2, size=(1, 1, 1, dim))
  arrays = [x + 0.7, 1 + 0.3 * rng.normal(size=dim), 0.3 * rng.normal(size=dim)]
  for _ in SCALES:
    arrays += [rng.normal(size=(dim, features)) * dim ** -0.5, 0.3 * rng.normal(size=features)]
  cotangents = [rng.normal(size=(batch, height, width, features)) for _ in SCALES]
  return [jnp.asarray(a, jnp.float32) for a in arrays], [jnp.asarray(c) for c in cotangents]


# (batch, height, width, dim, features, block tokens, rows per step, cores): everything in one
# step; rows of 7 tokens, 4 per step over 2 cores; 3 steps (one core), 8 -> 16 channels.
CASES = [(2, 5, 6, 8, 8, 2048, 10, 1),
         (4, 4, 7, 16, 16, 28, 4, 2),
         (3, 2, 4, 8, 16, 8, 2, 1)]


@pytest.mark.parametrize('batch,height,width,dim,features,block_tokens,rows,cores', CASES)
def test_values_and_gradients_equal_the_plain_form(batch, height, width, dim, features,
                                                   block_tokens, rows, cores, monkeypatch):
  monkeypatch.setattr(tpu_projections, '_BLOCK_TOKENS', block_tokens)
  shape = tpu_projections.Shape(batch * height, width, dim, features, 3, 4, 4)
  assert (shape.block_rows, shape.cores) == (rows, cores)
  args, cotangents = _inputs(batch, height, width, dim, features)
  got = assert_equals_plain(functools.partial(_kernel, dtype=jnp.float32),
                            functools.partial(_plain, dtype=jnp.float32), args, tuple(cotangents))
  # q, k, v; then x, the norm's scale and bias, 3 kernels and 3 biases.
  assert len(got) == 3 + 9


def test_bfloat16_within_its_rounding_of_the_plain_form():
  args, cotangents = _inputs(2, 4, 4, 16, 16, seed=1)

  def run(dtype):
    cts = tuple(c.astype(dtype) for c in cotangents)
    return tuple(values_and_gradients(functools.partial(f, dtype=dtype), args, cts)
                 for f in (_kernel, _plain))

  # x stays float32 (the residual stream), the outputs are bfloat16; the kernel sums its
  # float32 products where the plain form rounds each to bfloat16: no farther from the float32
  # result, within a few bfloat16 ulps (2^-8) of the plain form.
  assert_bfloat16_within_its_rounding(run, of_plain=2 ** -6)


def test_block_under_tpu_kernels_equals_the_plain_form(monkeypatch):
  # Where the first-half kernel (`tpu_block_head`) has no plan (RMT-L's third stage), the block
  # runs `pos` plainly and this kernel after it.
  monkeypatch.setattr(tpu_block_head, 'fits_vmem', lambda *args, **kwargs: False)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 6, 16)), jnp.float32)
  block = layers.RetBlock(2, 2.0, 4.0, True, 3, kernels='xla')
  params = block.init(jax.random.key(0), x)['params']
  # The norm keeps its place and names: checkpoints and the converter are unaffected.
  assert jax.tree.map(jnp.shape, params['retention_layer_norm']) == {'scale': (16,),
                                                                     'bias': (16,)}
  assert 'retention_layer_norm' not in params['retention']
  assert_tpu_form_equals_plain(block, x)


def test_weights_must_match_the_input():
  args, _ = _inputs(2, 4, 4, 8, 8)
  args[5] = jnp.zeros((8, 4))  # k to 4 channels, q and v to 8
  with pytest.raises(ValueError, match='projections 8 -> 8'):
    _kernel(*args, dtype=jnp.float32)


@pytest.mark.parametrize('name', variants.VARIANTS)
def test_every_stage_but_the_widest_has_a_plan_at_64_images(name):
  size = 56
  for dim in variants.VARIANTS[name]['embed_dims']:
    shape = tpu_projections.Shape(64 * size, size, dim, dim, 3, 4, 2)
    if dim == 640:
      # RMT-L's last stage: q/k/v weights (2.3 MiB) and their float32 gradient sums (9.4 MiB,
      # double-buffered) leave too little of 16 MiB; it runs the plain form.
      assert shape.block_rows is None
      assert not tpu_projections.fits_vmem((64, size, size, dim), dim, 3, 4, 2)
      continue
    assert shape.block_rows is not None, (name, dim)
    assert shape.vmem_bytes(shape.block_rows) <= common.budget()
    assert shape.block_rows * size <= tpu_projections._BLOCK_TOKENS
    size //= 2


def test_split_over_a_mesh_equals_one_device():
  # q, k, v and the 9 gradients; each device's rows, the weight gradients summed over devices.
  assert_split_over_a_mesh_equals_one_device('''
    from rmt_jax.kernels.tpu import projections as tpu_projections
    shapes = [(8, 4, 4, 8), (8,), (8,)] + [(8, 8), (8,)] * 3
    args = [jnp.asarray(rng.normal(size=s) * 0.5 + 0.2, jnp.float32) for s in shapes]
    cts = tuple(jnp.asarray(rng.normal(size=shapes[0]), jnp.float32) for _ in range(3))
    f = lambda x, s, b, *w: tpu_projections.normalized_projections(
        x, (s, b), tuple(zip(w[::2], w[1::2])), (1.0, 0.5, 1.0), eps=1e-6,
        dtype=jnp.float32, interpret=True)
    def step(*args):
      out, vjp = jax.vjp(f, *args)
      return out, vjp(cts)
  ''', 12)


@pytest.mark.parametrize('batch,height,width,dim,dtype', [
    (64, 56, 56, 64, jnp.bfloat16),  # RMT-S stage 1 at batch 64
    (64, 7, 7, 512, jnp.bfloat16),  # RMT-S stage 4: rows of 7 tokens
    (3, 2, 4, 8, jnp.float32)])
def test_declared_costs_are_the_kernels_work(batch, height, width, dim, dtype):
  x = jax.ShapeDtypeStruct((batch, height, width, dim), jnp.float32)
  vector = jax.ShapeDtypeStruct((dim,), jnp.float32)
  weights = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(dim, dim), (dim,)] * 3]
  f = lambda x, s, b, *w: tpu_projections.normalized_projections(
      x, (s, b), tuple(zip(w[::2], w[1::2])), SCALES, eps=1e-6, dtype=dtype, interpret=False)
  # The forward kernel has 8 operands (x, norm, weights -> q, k, v), the backward 12.
  forward, backward = kernel_calls(jax.make_jaxpr(
      lambda *a: jax.vjp(f, *a)[1]((jnp.zeros(x.shape, dtype),) * 3))(x, vector, vector, *weights))
  size = jnp.dtype(dtype).itemsize
  tokens = batch * height * width
  shape = tpu_projections.Shape(batch * height, width, dim, dim, 3, 4, size)
  weight_bytes = (3 * dim * dim + 3 * dim) * size + 2 * dim * 4
  sums = shape.cores * (3 * dim * dim + 3 * dim + 2 * dim) * 4
  for eqn, flops, x_arrays, row_arrays, extra in (
      (forward, 6 * tokens * dim * dim + 8 * tokens * dim, 1, 4, 0),
      (backward, 12 * tokens * dim * dim + 16 * tokens * dim, 2, 5, sums)):
    cost = eqn.params['cost_estimate']
    assert (cost.flops, cost.transcendentals, cost.bytes_accessed) == (
        flops, tokens, tokens * dim * (4 * x_arrays + 3 * size) + weight_bytes + extra)
    # Every block of rows is read or written once: the grid tiles the rows exactly.
    cores, steps = eqn.params['grid_mapping'].grid
    assert blocks(eqn).count((shape.block_rows, width, dim)) == row_arrays
    assert cores * steps * shape.block_rows == batch * height


@needs_libtpu
def test_kernels_compile_for_a_v5p_and_a_v4():
  # RMT-L's stage-1 and RMT-B's stage-4 shapes (rows of 56 and of 7 tokens); per chip of
  # the mesh 4 images of 14 rows.
  assert_kernels_compile_for_a_v5p_and_a_v4('''
    from rmt_jax.kernels.tpu import projections as tpu_projections
    def step(x, s, b, *w):
      f = lambda x, s, b, *w: tpu_projections.normalized_projections(
          x, (s, b), tuple(zip(w[::2], w[1::2])), (1.0, 0.25, 1.0), eps=1e-6,
          dtype=jnp.bfloat16)
      out, vjp = jax.vjp(f, x, s, b, *w)
      return out, vjp(out)
    def args(mesh, x_spec, batch, size, dim):
      arrays = [((batch, size, size, dim), x_spec)] + [(s, PartitionSpec()) for s in (
          (dim,), (dim,)) + ((dim, dim), (dim,)) * 3]
      return [jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, p))
              for s, p in arrays]
  ''', [(8, 56, 112), (64, 7, 512)], (16, 14, 64), 'f32[56,14,64]')
