"""`rmt_jax.analysis.tpu_floor`: the physical estimate of Pallas kernels, on kernels whose counts
are known by hand. The kernels are traced (`jax.make_jaxpr`), never run or compiled: the jaxpr
of a `pallas_call` is the same whether it would be interpreted or lowered by Mosaic."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import pytest

from rmt_jax.analysis import tpu_floor

V5P = tpu_floor.CHIPS['v5p']


def _call(kernel, grid, in_specs, out_spec, out_shape, semantics=('parallel',), cost=None):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      cost_estimate=cost)


def _only_kernel(f, *args):
  jaxpr = jax.make_jaxpr(f)(*args)
  [(eqn, runs)] = list(tpu_floor.pallas_calls(jaxpr.jaxpr))
  return jaxpr, eqn, runs


def test_a_matmul_counts_its_contraction_and_columns_padded_to_the_mxu():
  # Per grid step a (100, 200) x (200, 300) block: 100 x 256 x 384 MACs on a 128-wide MXU.
  def kernel(x_ref, w_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

  f = _call(kernel, (3,), [pl.BlockSpec((100, 200), lambda i: (i, 0)),
                           pl.BlockSpec((200, 300), lambda i: (0, 0))],
            pl.BlockSpec((100, 300), lambda i: (i, 0)),
            jax.ShapeDtypeStruct((300, 300), jnp.float32),
            cost=pl.CostEstimate(flops=2 * 300 * 200 * 300, transcendentals=0,
                                 bytes_accessed=10**6))
  _, eqn, _ = _only_kernel(f, jnp.zeros((300, 200), jnp.bfloat16),
                           jnp.zeros((200, 300), jnp.bfloat16))
  assert tpu_floor.body_work(eqn.params['jaxpr'], (3,), 128).mxu_macs == 100 * 256 * 384
  assert tpu_floor.body_work(eqn.params['jaxpr'], (3,), 256).mxu_macs == 100 * 256 * 512
  k = tpu_floor.kernel_estimate(eqn, V5P)
  assert k.mxu_macs == 3 * 100 * 256 * 384
  # 3 steps over v5p's two TensorCores: 2 on the busier one, 1.5 on each if even.
  assert k.balance == pytest.approx(2 / 1.5)
  assert k.mxu_seconds == pytest.approx(2 * k.mxu_macs / V5P.bf16_flops * 2 / 1.5)
  # Bytes: x's block (100 -> 104 rows, 200 -> 256 lanes) at each of 3 steps; w's once per
  # core (2); the output's (104 x 384 float32) at each step.
  assert k.hbm_bytes == 3 * 104 * 256 * 2 + 2 * 200 * 384 * 2 + 3 * 104 * 384 * 4
  # XLA's price: its declared bytes at XLA's measured 2.35 TB/s, above the flops at 394 TF/s.
  assert k.xla_seconds == pytest.approx(max(2 * 300 * 200 * 300 / 394e12, 1e6 / 2.35e12))
  assert k.seconds == max(k.mxu_seconds, k.vector_seconds, k.transcendental_seconds,
                          k.hbm_seconds)
  # A v4 device is one TensorCore (libtpu presents a v4 chip as two): no split, half the peak.
  v4 = tpu_floor.kernel_estimate(eqn, tpu_floor.CHIPS['v4'], devices_per_chip=2)
  assert v4.balance == 1.0
  assert v4.mxu_seconds == pytest.approx(2 * k.mxu_macs / (275e12 / 2))


def test_an_elementwise_op_counts_whole_vregs_of_its_padded_shape():
  # (10, 130) float32 fills 2 x 2 vregs of 8 x 128: 4 per operation; exp on its own unit.
  assert tpu_floor.vregs((10, 130)) == 4 and tpu_floor.vregs((3, 10, 130)) == 12
  assert tpu_floor.vregs(()) == 0 and tpu_floor.vregs((130,)) == 2

  def kernel(x_ref, o_ref):
    x = x_ref[...]
    o_ref[...] = jnp.exp(x * x + 1.0)

  f = _call(kernel, (2,), [pl.BlockSpec((10, 130), lambda i: (i, 0))],
            pl.BlockSpec((10, 130), lambda i: (i, 0)),
            jax.ShapeDtypeStruct((20, 130), jnp.float32))
  _, eqn, _ = _only_kernel(f, jnp.zeros((20, 130), jnp.float32))
  work = tpu_floor.body_work(eqn.params['jaxpr'], (2,), 128)
  assert (work.vector_ops, work.transcendental_ops, work.mxu_macs) == (2 * 4, 4, 0)
  k = tpu_floor.kernel_estimate(eqn, V5P)
  assert k.vector_ops == 2 * 2 * 4 and k.balance == 1.0
  # 2 steps, one per core: each core's 8 ops at 4 a cycle.
  assert k.vector_seconds == pytest.approx(2 * 4 * 2 / (4 * V5P.clock_hz * 2))


def test_a_block_moves_its_tiled_bytes_each_time_its_index_changes():
  # A (10, 130) float32 block occupies (16, 256) in (8, 128) tiles: 16 KiB.
  assert tpu_floor.tiled_bytes((10, 130), 4) == 16 * 256 * 4
  assert tpu_floor.tiled_bytes((2, 10, 130), 2) == 2 * 16 * 256 * 2

  def kernel(x_ref, y_ref, o_ref):
    o_ref[...] = x_ref[...] + y_ref[...]

  # x's index follows the outer axis only: fetched 4 times over the (4, 5) grid; y's follows
  # the inner one: 20 times; the output's too.
  f = _call(kernel, (4, 5), [pl.BlockSpec((10, 130), lambda i, j: (i, 0)),
                             pl.BlockSpec((10, 130), lambda i, j: (j, 0))],
            pl.BlockSpec((10, 130), lambda i, j: (i * 5 + j, 0)),
            jax.ShapeDtypeStruct((200, 130), jnp.float32), semantics=('parallel', 'arbitrary'))
  _, eqn, _ = _only_kernel(f, jnp.zeros((40, 130), jnp.float32),
                           jnp.zeros((50, 130), jnp.float32))
  k = tpu_floor.kernel_estimate(eqn, V5P)
  assert k.hbm_bytes == (4 + 20 + 20) * 16 * 256 * 4
  assert k.hbm_seconds == pytest.approx(k.hbm_bytes / V5P.hbm_bytes_per_second)


def test_the_leading_parallel_axis_splits_over_the_tensorcores():
  assert tpu_floor.balance((7, 3), ('parallel', 'arbitrary'), 2) == (4 / 3.5, 2)
  assert tpu_floor.balance((8,), ('parallel',), 2) == (1.0, 2)
  assert tpu_floor.balance((1, 9), ('parallel', 'arbitrary'), 2) == (2.0, 1)
  assert tpu_floor.balance((8,), ('arbitrary',), 2) == (2.0, 1)
  assert tpu_floor.balance((7,), ('parallel',), 1) == (1.0, 1)


def test_loops_and_first_step_branches_are_counted_by_how_often_they_run():
  def kernel(x_ref, o_ref):
    @pl.when(pl.program_id(1) == 0)
    def _():
      o_ref[...] = x_ref[...] * 2.0  # 4 vregs, once in 4 steps

    def body(i, acc):
      return acc + x_ref[...]  # 4 vregs, 3 times

    # The zeros are a scalar splat, free; the last add 4 vregs.
    o_ref[...] += jax.lax.fori_loop(0, 3, body, jnp.zeros((10, 130), jnp.float32))

  f = _call(kernel, (2, 4), [pl.BlockSpec((10, 130), lambda i, j: (i, 0))],
            pl.BlockSpec((10, 130), lambda i, j: (i, 0)),
            jax.ShapeDtypeStruct((20, 130), jnp.float32), semantics=('parallel', 'arbitrary'))
  _, eqn, _ = _only_kernel(f, jnp.zeros((20, 130), jnp.float32))
  work = tpu_floor.body_work(eqn.params['jaxpr'], (2, 4), 128)
  assert work.vector_ops == pytest.approx(4 / 4 + 3 * 4 + 4)
  assert work.unknown_loops == 0


def test_a_program_counts_the_tpu_branch_once_and_loops_by_their_length():
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0

  def double(x, interpret):
    return _call(kernel, (2,), [pl.BlockSpec((8, 128), lambda i: (i, 0))],
                 pl.BlockSpec((8, 128), lambda i: (i, 0)),
                 jax.ShapeDtypeStruct(x.shape, x.dtype))(x) if not interpret else (
                     pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    interpret=True)(x))

  def step(x):
    x = jax.lax.platform_dependent(x, tpu=lambda x: double(x, False),
                                   default=lambda x: double(x, True))
    return jax.lax.scan(lambda c, _: (double(c, False), None), x, None, length=5)[0]

  x = jnp.zeros((16, 128), jnp.float32)
  jaxpr = jax.make_jaxpr(step)(x)
  found = [(eqn.params['grid_mapping'].grid, runs)
           for eqn, runs in tpu_floor.pallas_calls(jaxpr.jaxpr)]
  assert found == [((2,), 1), ((2,), 5)]
  result = tpu_floor.floor(jaxpr, 'v5p', xla_step_seconds=1e-3)
  assert result['pallas_calls'] == 2
  [row] = result['kernels']
  assert (row['calls'], row['runs'], row['kernel']) == (2, 6, 'test_tpu_floor.kernel')
  assert result['step_seconds'] == pytest.approx(
      result['kernel_seconds'] + 1e-3 - result['kernel_xla_seconds'])
  # Without its vector work the kernel is bound by its bytes: 6 runs of 2 (8, 128) float32
  # blocks in and 2 out, one step per TensorCore.
  k = tpu_floor.kernel_estimate(next(tpu_floor.pallas_calls(jaxpr.jaxpr))[0], V5P)
  assert k.mxu_seconds == 0 and k.hbm_seconds > k.transcendental_seconds == 0
  assert k.hbm_seconds == pytest.approx(4 * 8 * 128 * 4 / V5P.hbm_bytes_per_second)
  assert result['kernel_seconds_without_vector'] == pytest.approx(6 * k.hbm_seconds)
  assert result['step_seconds_without_vector'] == pytest.approx(
      6 * k.hbm_seconds + 1e-3 - result['kernel_xla_seconds'])
  assert 'Pallas kernels per device on v5p' in tpu_floor.format_kernels(result)


def test_every_chip_has_its_figures_and_xla_rates_reproduce_v5p():
  assert set(tpu_floor.CHIPS) == {'v4', 'v5e', 'v5p', 'v6e'}
  # libtpu's device kinds name each chip once (tpu_compile reads memory and peak from here).
  assert sorted(tpu_floor.DEVICE_KINDS.values()) == sorted(tpu_floor.CHIPS)
  assert V5P.hbm_bytes == 95 * 2**30
  for chip in tpu_floor.CHIPS.values():
    # The published peak is the MXUs at their size and the clock (v6e's clock unverified).
    if chip.name != 'v6e':
      assert chip.bf16_flops == pytest.approx(
          chip.tensorcores * chip.mxus_per_core * chip.mxu_size**2 * 2 * chip.clock_hz,
          rel=0.01)
  assert tpu_floor.xla_rates(V5P) == pytest.approx(
      {'flops': 394e12, 'transcendentals': 3.07e12, 'bytes': 2.35e12})
