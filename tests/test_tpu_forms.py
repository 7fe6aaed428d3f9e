"""The TPU forms (rmt_jax.kernels.tpu.attention) against the plain form, in Pallas's interpreter.

The Pallas decayed attention and its backward kernel against `layers._decayed_attention` with
the decay tables of `decay.py` (values and the three input gradients, float32 and bfloat16, the
axial and the whole-image layouts), the rotary shift applied inside the kernels against
`layers.theta_shift` before them, MaSA under `kernels='tpu'` against `kernels='xla'`, the
kernels' declared costs against the formula, and, with libtpu, Mosaic's compilation for a v5p.
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from conftest import needs_libtpu, official_case, relative_error
from kernel_checks import (COMPILE_HEAD, KERNELS_IN_HBM, assert_bfloat16_within_its_rounding,
                           assert_equals_plain, assert_split_over_a_mesh_equals_one_device,
                           assert_tpu_form_equals_plain, blocks, kernel_calls,
                           official_model_kernels, run_script, values_and_gradients)
from rmt_jax.models import decay, layers
from rmt_jax.kernels.tpu import attention as tpu_forms
from rmt_jax.kernels.tpu import common

RATES = (2.0, 4.0)  # initial_value, heads_range: heads decay at different rates


def _plain(q, k, v, heads, width):
  """The plain form on (problems, tokens, heads * d) arrays, with the tables of decay.py."""
  problems, length, channels = q.shape
  split = lambda t: t.reshape(problems, length, heads, -1).transpose(0, 2, 1, 3)
  if width is None:
    bias = decay.axial_decay(length, heads, *RATES)
  else:
    bias = decay.manhattan_decay(length // width, width, heads, *RATES)
  out = layers._decayed_attention(split(q), split(k), split(v), bias, v.dtype)
  return out.transpose(0, 2, 1, 3).reshape(problems, length, channels)


def _inputs(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  # Logits of O(1..10), as trained q and k give: the softmax is neither flat nor one-hot.
  return [jnp.asarray(rng.normal(size=shape) * scale, dtype) for scale in (2.0, 1.0, 1.0, 1.0)]


def _rotary_tables(*shape, seed):
  rng = np.random.default_rng(seed)
  angles = rng.uniform(-3, 3, size=shape)
  return jnp.asarray(np.sin(angles), jnp.float32), jnp.asarray(np.cos(angles), jnp.float32)


# (problems, tokens, heads, head_dim, width): a 1-d axis (|i - j|), and whole maps of 3 x 4 and
# 5 x 5 tokens (Manhattan distance), with more problems than fit one block in the last.
LAYOUTS = [(6, 7, 2, 8, None), (4, 12, 3, 8, 4), (3, 25, 4, 16, 5)]


@pytest.mark.parametrize('problems,length,heads,head_dim,width', LAYOUTS)
def test_values_and_gradients_equal_the_plain_form(problems, length, heads, head_dim, width):
  shape = (problems, length, heads * head_dim)
  q, k, v, cotangent = _inputs(shape, jnp.float32)
  log_gamma = decay.log_gamma(heads, *RATES)
  assert len(set(log_gamma.tolist())) == heads
  kernel = lambda q, k, v: tpu_forms.decayed_attention(q, k, v, log_gamma, width=width,
                                                       interpret=True)
  got = assert_equals_plain(kernel, lambda q, k, v: _plain(q, k, v, heads, width), (q, k, v),
                            cotangent, ('out', 'dq', 'dk', 'dv'))
  assert all(g.shape == shape and g.dtype == jnp.float32 for g in got)


@pytest.mark.parametrize('width', [None, 4])
def test_bfloat16_within_its_rounding_of_the_plain_form(width):
  shape, heads = (4, 12, 24), 3
  inputs = _inputs(shape, jnp.float32, seed=1)
  log_gamma = decay.log_gamma(heads, *RATES)

  kernel = lambda q, k, v: tpu_forms.decayed_attention(q, k, v, log_gamma, width=width,
                                                       interpret=True)
  plain = lambda q, k, v: _plain(q, k, v, heads, width)

  def run(dtype):
    *qkv, cotangent = (x.astype(dtype) for x in inputs)
    return tuple(values_and_gradients(f, qkv, cotangent) for f in (kernel, plain))

  # Both bfloat16 forms round products and probabilities to 8 bits: each is as far from the
  # float32 result as the other, and they agree within a few bfloat16 ulps (2^-8).
  got = assert_bfloat16_within_its_rounding(run, ('out', 'dq', 'dk', 'dv'), of_plain=2 ** -6)
  assert all(g.dtype == jnp.bfloat16 for g in got)


@pytest.mark.parametrize('axial', [True, False])
def test_masa_under_tpu_kernels_equals_the_plain_form(axial):
  # kernels='tpu' on this CPU host runs the kernels in Pallas's interpreter.
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 5, 32)), jnp.float32)
  assert_tpu_form_equals_plain(
      layers.ManhattanSelfAttention(4, *RATES, axial=axial, kernels='xla'), x)


@pytest.mark.parametrize('shape,heads,width,dtype,tables', [
    ((3584, 56, 64), 4, None, jnp.bfloat16, (56, 56, 64)),  # stage 1's row pass at batch 64
    ((64, 56, 56, 64), 4, None, jnp.bfloat16, (56, 56, 64)),  # its column pass
    ((64, 14, 14, 256), 8, None, jnp.float32, (14, 14, 256)),  # stage 3's column pass, f32
    ((64, 196, 256), 8, 14, jnp.bfloat16, (1, 196, 256)),  # stage 3's whole attention
    ((6, 7, 16), 2, None, jnp.float32, None)])
def test_declared_costs_are_the_kernels_work(shape, heads, width, dtype, tables):
  columns = len(shape) == 4  # the column layout: (images, tokens h, columns w, channels)
  args = [jax.ShapeDtypeStruct(shape, dtype)] * 3
  log_gamma = decay.log_gamma(heads, *RATES)
  rotary = None if tables is None else (jnp.zeros(tables, dtype),) * 2
  attention = lambda q, k, v: tpu_forms.decayed_attention(q, k, v, log_gamma, width=width,
                                                          rotary=rotary, interpret=False)
  # The forward kernel has 4 operands (q, k, v -> out), the backward 7 (q, k, v, dout -> dq,
  # dk, dv).
  forward, backward = kernel_calls(jax.make_jaxpr(
      lambda q, k, v: jax.vjp(attention, q, k, v)[1](v))(*args))
  itemsize = jnp.dtype(dtype).itemsize
  array = np.prod(shape) * itemsize
  # The two tables (sin with its sign, cos), each read once.
  table_bytes = 0 if tables is None else 2 * np.prod(tables) * itemsize
  length, channels = shape[1], shape[-1]
  sequences = np.prod(shape) // (length * channels)
  product = 2 * sequences * length * length * channels  # one L x L x d product, every head
  scores = sequences * heads * length * length
  for eqn, products, arrays in ((forward, 2, 4), (backward, 5, 7)):
    cost = eqn.params['cost_estimate']
    assert (cost.flops, cost.transcendentals, cost.bytes_accessed) == (
        products * product, scores, arrays * array + table_bytes)
    # Every block is read or written once: the grid tiles the arrays exactly (in the column
    # layout, the columns on the outer axis where there are several steps of them). The
    # tables follow the inputs (q, k, v[, dout]); their block is all of them, or a column
    # step's share, and changes only with the outer axis: each is fetched once.
    inputs = 3 if arrays == 4 else 4
    shapes = blocks(eqn)
    table_blocks = [] if tables is None else shapes[inputs:inputs + 2]
    tiled = shapes[:inputs] + shapes[inputs + len(table_blocks):]
    assert len(tiled) == arrays and len(set(tiled)) == 1
    block = tiled[0]
    assert _problems_tiled(eqn.params['grid_mapping'].grid, block, shape, columns)
    assert table_blocks == ([] if tables is None else
                            [block[1:] if columns else tables] * 2)


def _problems_tiled(grid, block, shape, columns) -> bool:
  """Whether `grid` steps of `block` tile `shape` exactly, whole but for the leading axis (and
  in the column layout, the columns: a multiple of 8 of them or all, the outer grid axis)."""
  if not columns:
    return grid == (shape[0] // block[0],) and block[1:] == shape[1:] and not shape[0] % block[0]
  steps = (shape[0] // block[0],)
  if block[2] != shape[2]:
    steps = (shape[2] // block[2], *steps)
  return (grid == steps and block[1] == shape[1] and block[3] == shape[3]
          and (block[2] % 8 == 0 or block[2] == shape[2]) and not shape[2] % block[2]
          and not shape[0] % block[0])


_COMPILE = COMPILE_HEAD + KERNELS_IN_HBM + textwrap.dedent('''
    from rmt_jax.models import decay
    from rmt_jax.kernels.tpu import attention as tpu_forms
    device = topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x1').devices[0]
    replicated = NamedSharding(Mesh(np.array([device]), ('d',)), PartitionSpec())
    # With rotary tables applied in the kernels: 28 for 112 problems (4 images x 28 rows); the
    # column layout of 64 images of stage 1 (7 column steps) and of RMT-B's stage 2 (160
    # channels: two 128-lane chunks).
    for shape, heads, width, tables in (
        ((112, 56, 64), 4, None, (28, 56, 64)), ((8, 49, 256), 8, 7, (1, 49, 256)),
        ((64, 56, 56, 64), 4, None, (56, 56, 64)), ((64, 28, 28, 160), 5, None, (28, 28, 160))):
      log_gamma = decay.log_gamma(heads, 2.0, 4.0)
      rotary = (jnp.ones(tables, jnp.bfloat16),) * 2
      attention = lambda q, k, v: tpu_forms.decayed_attention(q, k, v, log_gamma, width=width,
                                                              rotary=rotary)
      def step(q, k, v):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(v)
      args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=replicated)] * 3
      text = jax.jit(step).lower(*args).compile().as_text()
      print(shape, in_hbm(text), text.count('custom_call_target="tpu_custom_call"'))
    # Under a mesh of four chips (the context mesh, as the trainer sets it while tracing), each
    # runs the kernels on its share of the problems: no gathering.
    mesh = Mesh(np.array(topologies.get_topology_desc(
        platform='tpu', topology_name='v5p:2x2x1').devices), ('data',))
    log_gamma, width = decay.log_gamma(4, 2.0, 4.0), None
    rotary = (jnp.ones((28, 56, 64), jnp.bfloat16),) * 2  # one image of 28 rows per device
    def traced(q, k, v):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return step(q, k, v)
    args = [jax.ShapeDtypeStruct((112, 56, 64), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, PartitionSpec('data')))] * 3
    text = jax.jit(traced).lower(*args).compile().as_text()
    print('sharded', text.count('custom_call_target="tpu_custom_call"'), 'all-gather' in text,
          '<28x56x64>' in text or 'bf16[28,56,64]' in text)
''')


@needs_libtpu
def test_kernels_compile_for_a_v5p():
  # Forward and backward kernel, for the row, whole and column layouts, operands in HBM.
  assert run_script(_COMPILE, with_libtpu=True)[:5] == [
      '(112, 56, 64) 2 2', '(8, 49, 256) 2 2', '(64, 56, 56, 64) 2 2', '(64, 28, 28, 160) 2 2',
      'sharded 2 False True']


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_pairs_swapped_in_a_kernel_by_lane_rotation_as_by_reversal(dtype):
  # The kernels' rotary shift swaps channel pairs by rotating lanes (in Pallas's interpreter).
  x = jnp.arange(2 * 3 * 24, dtype=dtype).reshape(2, 3, 24)

  def kernel(x_ref, o_ref):
    o_ref[...] = tpu_forms._swap_pairs(x_ref[...], tpu_forms._pair_lanes(x.shape))

  got = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       interpret=True)(x)
  np.testing.assert_array_equal(got, layers._reverse_pairs(x))


@pytest.mark.parametrize('problems,length,heads,head_dim,width,tables', [
    (6, 7, 2, 8, None, 3),  # a row pass: problem p = image * rows + row takes table p % rows
    (3, 12, 3, 8, 4, 1)])   # a whole map: one table
def test_rotary_applied_in_the_kernels_equals_theta_shift_before(problems, length, heads,
                                                                  head_dim, width, tables):
  shape = (problems, length, heads * head_dim)
  q, k, v, cotangent = _inputs(shape, jnp.float32, seed=4)
  sin, cos = _rotary_tables(tables, length, heads * head_dim, seed=5)
  log_gamma = decay.log_gamma(heads, *RATES)
  per_problem = lambda t: jnp.tile(t, (problems // tables, 1, 1))  # table p % T for problem p

  assert_equals_plain(
      lambda q, k, v: tpu_forms.decayed_attention(q, k, v, log_gamma, width=width,
                                                  rotary=(sin, cos), interpret=True),
      lambda q, k, v: _plain(layers.theta_shift(q, per_problem(sin), per_problem(cos)),
                             layers.theta_shift(k, per_problem(sin), per_problem(cos)), v,
                             heads, width),
      (q, k, v), cotangent, ('out', 'dq', 'dk', 'dv'))


@pytest.mark.parametrize('images,height,width,heads,head_dim,dtype', [
    (3, 5, 16, 4, 8, jnp.float32),    # 8 columns per step: two column steps, 3 image steps
    (2, 4, 3, 2, 8, jnp.float32),     # all 3 columns in one step
    (2, 3, 4, 10, 16, jnp.float32),   # 160 channels: two 128-lane chunks, heads split 8 + 2
    (2, 5, 16, 4, 8, jnp.bfloat16)])
def test_column_layout_equals_the_transposed_plain_form(images, height, width, heads, head_dim,
                                                       dtype, monkeypatch):
  # The column pass on the (b, h, w, C) map itself, against the plain form on its columns
  # transposed into rows, (b * w, h, C), each with the table of its column. Blocks of 2 KiB:
  # an image per step, and 8 columns where there are 16.
  monkeypatch.setattr(tpu_forms, '_BLOCK_BYTES', 2048)
  channels = heads * head_dim
  shape = (images, height, width, channels)
  inputs = _inputs(shape, jnp.float32, seed=6)
  sin, cos = _rotary_tables(height, width, channels, seed=7)
  log_gamma = decay.log_gamma(heads, *RATES)
  problem = tpu_forms._problem(inputs[0], heads, None, (sin,))
  assert problem.grid == (2, images) if width == 16 else len(problem.grid) == 1
  assert len(tpu_forms._chunks(heads, head_dim)) == (2 if channels > 128 else 1)

  def got(q, k, v):  # the tables in the compute dtype, as `layers._tpu_attention` gives them
    rotary = tuple(t.astype(q.dtype) for t in (sin, cos))
    return tpu_forms.decayed_attention(q, k, v, log_gamma, rotary=rotary, interpret=True)

  columns = lambda t: t.transpose(0, 2, 1, 3).reshape(images * width, height, channels)
  back = lambda t: t.reshape(images, width, height, channels).transpose(0, 2, 1, 3)

  def rows(q, k, v):  # the kernel on the transposed columns, column x's tables
    rotary = tuple(t.transpose(1, 0, 2).astype(q.dtype) for t in (sin, cos))
    return back(tpu_forms.decayed_attention(*map(columns, (q, k, v)), log_gamma,
                                            rotary=rotary, interpret=True))

  def want(q, k, v):
    table = lambda t: jnp.tile(t.transpose(1, 0, 2), (images, 1, 1)).astype(q.dtype)
    rotate = lambda t: layers.theta_shift(columns(t), table(sin), table(cos))
    return back(_plain(rotate(q), rotate(k), columns(v), heads, None))

  def run(form, dtype):
    q, k, v, cotangent = (x.astype(dtype) for x in inputs)
    out, vjp = jax.vjp(form, q, k, v)
    return (out, *vjp(cotangent))

  exact = run(want, jnp.float32)
  for name, g, r, w, e in zip(('out', 'dq', 'dk', 'dv'), run(got, dtype), run(rows, dtype),
                              run(want, dtype), exact):
    assert g.dtype == dtype and g.shape == shape, name
    # The same arithmetic as the transposed form, bit for bit (float32 copies are exact).
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32), name)
    if dtype == jnp.float32:
      assert relative_error(g, w) < 1e-5, name
    else:  # no farther from float32 than the plain form in bfloat16
      assert relative_error(g, e) < 1.5 * relative_error(w, e) + 2 ** -9, name


def test_column_layout_split_over_a_mesh_equals_one_device():
  # Under a mesh each device runs the kernels on its images (the leading axis) with the whole
  # tables.
  assert_split_over_a_mesh_equals_one_device('''
    from rmt_jax.models import decay
    from rmt_jax.kernels.tpu import attention as tpu_forms
    shapes = [(8, 3, 4, 16)] * 4 + [(3, 4, 16)] * 2
    q, k, v, dout, sin, cos = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    args = [q, k, v]
    log_gamma = decay.log_gamma(2, 2.0, 4.0)
    f = lambda q, k, v: tpu_forms.decayed_attention(q, k, v, log_gamma, rotary=(sin, cos),
                                                    interpret=True)
    def step(*args):
      y, vjp = jax.vjp(f, *args)
      return y, vjp(dout)
  ''', 4)


def test_column_layout_plans_fit_vmem_for_every_axial_stage():
  # Every axial stage of RMT-T/S/B/L at 224 pixels, 64 images per chip: the column layout
  # where its VMEM estimate is within the budget, i.e. every bfloat16 plan; float32 maps of 28
  # columns with more than 128 channels (RMT-B/L's stage 2) take the transposes.
  stages = {(56, 64, 4), (28, 128, 4), (14, 256, 8), (56, 80, 5), (28, 160, 5), (14, 320, 10),
            (56, 112, 7), (28, 224, 14), (14, 448, 28)}
  for size, channels, heads in stages:
    for itemsize in (2, 4):
      fits = tpu_forms.columns_fit_vmem((64, size, size, channels), heads, itemsize)
      assert fits == (itemsize == 2 or size != 28 or channels <= 128), (size, channels)
      problem = tpu_forms.Problem(64, size, heads, channels // heads, None, itemsize, 1, size)
      vmem = problem.column_vmem_bytes(problem.block, problem.column_block)
      assert (vmem <= common.budget()) == fits


def test_masa_takes_the_transposes_where_the_column_layout_does_not_fit(monkeypatch):
  monkeypatch.setattr(tpu_forms, 'columns_fit_vmem', lambda *args: False)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 5, 32)), jnp.float32)
  assert_tpu_form_equals_plain(
      layers.ManhattanSelfAttention(4, *RATES, axial=True, kernels='xla'), x)


def test_the_official_fixtures_run_the_column_layout_in_every_axial_block():
  # test_model.py's parity under kernels='tpu': each axial block's column pass is a forward
  # kernel on the (b, h, w, C) map itself (4-d blocks, q, k, v, sin, cos -> out), twice per
  # block (`platform_dependent` stages Mosaic and the interpreter); no transposes around it.
  calls, _ = official_model_kernels()
  kwargs = official_case('b')['kwargs']
  axial = sum(d for d, a in zip(kwargs['depths'], kwargs['chunkwise_recurrents']) if a)
  assert axial == 4 and calls.count((0, 6, 4)) == 2 * axial


def test_rotary_tables_must_fit_the_problems():
  q = jnp.zeros((6, 7, 16))
  sin, cos = _rotary_tables(4, 7, 16, seed=0)  # 4 does not divide 6 problems
  with pytest.raises(ValueError, match='T dividing 6 problems'):
    tpu_forms.decayed_attention(q, q, q, decay.log_gamma(2, *RATES), rotary=(sin, cos),
                                interpret=True)
