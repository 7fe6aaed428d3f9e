"""Forms of RMT's operations written for TPUs (`kernels='tpu'`): the decayed attention in Pallas.

`decayed_attention` computes `layers._decayed_attention`'s function, softmax(q k^T + decay) v,
for many small problems at once. XLA runs the plain form as separate passes that write every
score to HBM and read it back (logits, bias, max, exp, sum, product): RMT's attention problems
are tiny (axial: one per image, row and head with 14-56 tokens; whole: 49 or 196 tokens) and
their scores outnumber q, k and v by L / d, so the plain form is bound by HBM traffic. Here each
grid step holds a block of whole problems in VMEM and the scores never leave it:

- q, k, v stay in the layout the projections give, (b, h, w, heads * head_dim): heads and
  channels share the lane axis, and no pass needs a transpose. The row pass and the whole
  attention see it as (problems, tokens, channels). The column pass takes it as it is: a block
  is a few images' tokens of a few columns, (images, h, columns, channels), which the grid's
  DMA gathers from HBM; inside, each column's (h, d) slices are strided VMEM loads (one
  sublane of each (8, 128) tile) from a float32 copy of the block, one 128-lane chunk at a time
  (Mosaic compiles neither a single-row load from a packed bfloat16 tile nor one at a dynamic
  row of a buffer wider than 128 lanes), and the results strided stores. In the plain form the
  column pass transposes q, k, the row pass' output, its own output and all their cotangents:
  eight copies of a stream-sized array per block and step, a third of a stage-1 block's
  estimate. Where the column layout's blocks do not fit VMEM (`columns_fit_vmem`), the caller
  transposes the columns into rows as the plain form does.
- The decay, log(gamma_h) * distance, is computed inside the kernel from token positions (axial:
  |i - j|; whole: the Manhattan distance of raster positions), never read from memory: the same
  float32 products as `decay.axial_decay` / `decay.manhattan_decay`, bit for bit.
- The rotary shift (`layers.theta_shift`) is applied to q and k inside the kernels, from sin
  and cos tables that stay in VMEM (one per row or map, problem p taking table p % T; in the
  column layout, the map's, column x taking [:, x]), the channel pairs swapped by lane
  rotations: rotated copies of q and k never pass through HBM (outside, the shift and its
  transpose were a fifth of stage 1's traffic). The backward
  kernel rotates again and applies the shift's transpose to dq and dk.
- The softmax runs in float32 and is normalised after the product with v, as in the plain form.
- The backward pass is a second kernel that recomputes the probabilities from q and k (their
  max and sum included: saving the log-sum-exp would cost an HBM array whose minor axis of
  `heads` entries the TPU pads to 128 lanes, more traffic than the reductions it saves) and
  gives dq, dk and dv. The decay has no gradient: it is not a parameter.

Both kernels declare their true cost (`pl.CostEstimate`): the matrix products' flops, one exp
per score, and every HBM byte the grid reads and writes (each block exactly once). XLA's TPU
cost model uses these numbers for the custom calls; `cost_estimates` gives them from the shapes.
Bytes are counted at the arrays' logical size, as XLA counts its own operations; in HBM the TPU
tiles the last two axes to multiples of (16, 128) for bfloat16, so stage 1's 64 channels occupy
128 lanes and the traffic there is up to twice the declared one.

As the other kernels, they run per device under a context mesh (`common.per_device`: a
`shard_map` that gives each device its share of the problems) and keep their operands in HBM
(`common.in_hbm`): the grid's pipeline brings each block into VMEM.
"""

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rmt_jax.kernels.tpu import bands as tpu_bands
from rmt_jax.kernels.tpu import common

# A block's q (problems x tokens x channels) is kept near this many bytes: big enough that a
# grid step's fixed cost (~0.35 us) is small against its DMA, small enough that the backward's
# seven double-buffered blocks (lanes padded to 128) fit a v4's scoped VMEM (16 MiB).
_BLOCK_BYTES = 256 * 1024

_LANES = 128  # a vector register's (and a VMEM tile's) lane axis


@dataclasses.dataclass(frozen=True)
class Problem:
  """The static description of a batch of decayed-attention problems.

  Attributes:
    problems: entries of the arrays' leading axis: sequences (images x rows, or images), or,
      with `columns`, images of `columns` sequences each.
    length: tokens per sequence.
    heads: heads; head h has decay rate log_gamma[h] and channels [h*d, (h+1)*d).
    head_dim: channels per head, d.
    width: None for a 1-d axis (distance |i - j|); else the raster width W of a
      (length // W) x W map (Manhattan distance).
    itemsize: bytes per element of q, k, v (and of the outputs and their gradients).
    tables: None, or T, the number of rotary tables (T, tokens, heads * d) that the kernels
      apply to q and k themselves (problem p takes table p % T; `decayed_attention`); with
      `columns`, 1: the (tokens, columns, heads * d) tables of the map.
    columns: None for (problems, tokens, heads * d) arrays; W for the column layout, (images,
      tokens, W, heads * d): attention along the tokens of each of an image's W columns.
  """
  problems: int
  length: int
  heads: int
  head_dim: int
  width: int | None
  itemsize: int
  tables: int | None = None
  columns: int | None = None

  @property
  def channels(self) -> int:
    return self.heads * self.head_dim

  def column_vmem_bytes(self, block: int, column_block: int) -> int:
    """The column layout's backward kernel's VMEM (the larger) with `block` images of
    `column_block` columns per step: q, k, v, dout in and dq, dk, dv out as double-buffered
    blocks and the two tables' blocks (columns padded to the sublane tile, channels to 128
    lanes), and the float32 copies (`_column_scratch`): one 128-lane chunk of one image's
    block for each of the seven arrays, all of the step's tables."""
    sublanes = 32 // self.itemsize
    padded = -(-column_block // sublanes) * sublanes
    lanes = tpu_bands.lanes(self.channels)
    tile = self.length * padded * lanes * self.itemsize
    copy = self.length * -(-column_block // 8) * 8 * _LANES * 4
    return 2 * 7 * block * tile + 2 * 2 * tile + (7 + 2 * lanes // _LANES) * copy

  @property
  def column_block(self) -> int:
    """Columns per grid step (column layout): the most that are a multiple of 8 (a sublane
    tile) or all of them, with one image's block within `_BLOCK_BYTES` and the VMEM within
    `common.budget()`; else the fewest that are."""
    per_column = self.length * self.channels * self.itemsize
    legal = [c for c in range(1, self.columns + 1)
             if self.columns % c == 0 and (c % 8 == 0 or c == self.columns)]
    within = [c for c in legal if c * per_column <= _BLOCK_BYTES
              and self.column_vmem_bytes(1, c) <= common.budget()]
    return max(within) if within else min(legal)

  @property
  def block(self) -> int:
    """Entries per grid step: the largest divisor of `problems` whose block is within
    `_BLOCK_BYTES` (and in the column layout, whose VMEM is within `common.budget()`), or
    one."""
    per_entry = self.length * self.channels * self.itemsize
    if self.columns is not None:
      per_entry *= self.column_block
    limit = max(1, _BLOCK_BYTES // per_entry)
    fits = lambda p: (self.columns is None or p == 1 or
                      self.column_vmem_bytes(p, self.column_block) <= common.budget())
    return max(p for p in range(1, min(limit, self.problems) + 1)
               if self.problems % p == 0 and fits(p))

  @property
  def fits_vmem(self) -> bool:
    """Whether the kernels' VMEM is within `common.budget()` (the column layout's estimate;
    the other layouts' blocks are `_BLOCK_BYTES` at most, which always fits)."""
    return (self.columns is None or
            self.column_vmem_bytes(self.block, self.column_block) <= common.budget())

  @property
  def grid(self) -> tuple[int, ...]:
    """(entry steps,); in the column layout with more than one column block (column steps,
    entry steps): the columns outermost, so that the rotary tables' block, which follows the
    columns only, is fetched once per column step."""
    steps = self.problems // self.block
    if self.columns is None or self.column_block == self.columns:
      return (steps,)
    return (self.columns // self.column_block, steps)


def cost_estimates(problem: Problem) -> tuple[pl.CostEstimate, pl.CostEstimate]:
  """The forward and backward kernels' costs, from the shapes alone.

  Flops are the matrix products' (2 L^2 d per product per problem and head: two forward,
  five backward: scores, dP, dV, dQ, dK); transcendentals one exp per score (both passes
  recompute the scores); bytes every array's block read or written once per grid step, which
  covers each array exactly once (forward: q, k, v in, out; backward: q, k, v, dout in, dq, dk,
  dv out), and with rotary tables, the two tables once each (their block is all of them, the
  same at every step, or in the column layout a column step's share of them, which changes
  only with the grid's outer axis: each fetched once).
  """
  sequences = problem.problems * (problem.columns or 1)
  pairs = sequences * problem.heads * problem.length ** 2
  array_bytes = sequences * problem.length * problem.channels * problem.itemsize
  tables = 0 if problem.tables is None else (problem.columns or problem.tables)
  table_bytes = 2 * tables * problem.length * problem.channels * problem.itemsize
  product = 2 * pairs * problem.head_dim
  forward = pl.CostEstimate(flops=2 * product, transcendentals=pairs,
                            bytes_accessed=4 * array_bytes + table_bytes)
  backward = pl.CostEstimate(flops=5 * product, transcendentals=pairs,
                             bytes_accessed=7 * array_bytes + table_bytes)
  return forward, backward


def _log_decay(length: int, width: int | None, rate: float) -> jax.Array:
  """log(gamma) * distance for all token pairs, float32 (length, length), from iotas.

  Row and column of a raster index come from a float floor (Mosaic has no vector integer
  division): (i + 0.5) / W is at least 0.5 / W away from an integer, far beyond float32's
  rounding at these sizes, so the floor is exact.
  """
  i = jax.lax.broadcasted_iota(jnp.int32, (length, length), 0).astype(jnp.float32)
  j = jax.lax.broadcasted_iota(jnp.int32, (length, length), 1).astype(jnp.float32)
  if width is None:
    distance = jnp.abs(i - j)
  else:
    row_i = jnp.floor((i + 0.5) * np.float32(1.0 / width))
    row_j = jnp.floor((j + 0.5) * np.float32(1.0 / width))
    col_i, col_j = i - row_i * width, j - row_j * width
    distance = jnp.abs(row_i - row_j) + jnp.abs(col_i - col_j)
  return distance * np.float32(rate)


def _pair_lanes(shape: tuple[int, ...]) -> jax.Array:
  """For `_swap_pairs` on arrays of `shape`: where a rotation by one lane brings each element's
  partner (x0 <-> x1, x2 <-> x3, ...), as a boolean mask. It depends on the shape only, so a
  kernel computes it once, outside its loops: in the loops it would be most of the rotary
  shift's vector work (an iota, the partner's index, a rotation and a compare per call).

  The mask comes from rotating the lane index itself, so that the result does not depend on
  the rotation's direction convention.
  """
  axis = len(shape) - 1
  lane = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
  return pltpu.roll(lane, 1, axis) == (lane ^ 1)


def _swap_pairs(x: jax.Array, pairs: jax.Array) -> jax.Array:
  """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) on the lane axis, inside a kernel: two lane
  rotations and a select by `pairs` (`_pair_lanes(x.shape)`)."""
  axis, lanes = x.ndim - 1, x.shape[-1]
  return jnp.where(pairs, pltpu.roll(x, 1, axis), pltpu.roll(x, lanes - 1, axis))


def _rotate(x: jax.Array, signed_sin: jax.Array, cos: jax.Array, pairs: jax.Array) -> jax.Array:
  """`layers.theta_shift` inside a kernel: x cos + swap_pairs(x) signed_sin, in x's dtype (the
  tables in float32)."""
  x32 = x.astype(jnp.float32)
  return (x32 * cos + _swap_pairs(x32, pairs) * signed_sin).astype(x.dtype)


def _unrotate(dy: jax.Array, signed_sin: jax.Array, cos: jax.Array,
              pairs: jax.Array) -> jax.Array:
  """The transpose of `_rotate` (float32, the tables too): dy cos + swap_pairs(dy signed_sin)."""
  return dy * cos + _swap_pairs(dy * signed_sin, pairs)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, decay: jax.Array) -> jax.Array:
  """softmax(q k^T + decay) v of one problem and head, inside a kernel (normalised last)."""
  logits = jax.lax.dot_general(q, k, common.TRANS_B, preferred_element_type=jnp.float32) + decay
  weights = jnp.exp(logits - logits.max(axis=1, keepdims=True))
  out = jnp.dot(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out / weights.sum(axis=1, keepdims=True)


def _attend_backward(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array,
                     decay: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """dq, dk, dv (float32) of `_attend` for the cotangent do, the probabilities recomputed."""
  logits = jax.lax.dot_general(q, k, common.TRANS_B, preferred_element_type=jnp.float32) + decay
  weights = jnp.exp(logits - logits.max(axis=1, keepdims=True))
  probs = weights * (1.0 / weights.sum(axis=1, keepdims=True))
  dprobs = jax.lax.dot_general(do, v, common.TRANS_B, preferred_element_type=jnp.float32)
  dv = jnp.dot(probs.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dlogits = probs * (dprobs - (probs * dprobs).sum(axis=1, keepdims=True))
  dq = jnp.dot(dlogits.astype(k.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.dot(dlogits.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return dq, dk, dv


def _row_kernel(*refs, attend, inputs, outputs, log_gamma, head_dim, width, block, rotary):
  """The row and whole layouts' kernel around `attend`: for each problem of the block (a loop)
  and each head, attend(q, k, v, ..., decay) on its (tokens, d) slices (q and k rotated with
  the problem's tables), the results stored into the outputs' slices.

  refs: the `inputs` blocks (q, k, v, ...), the tables (signed sin, cos) whole if `rotary`,
  then the `outputs` blocks.
  attend: (q, k, v, *rest, decay) -> `outputs` float32 values; the first two are unrotated
    after it when rotary (dq, dk of the backward).
  """
  in_refs = refs[:inputs]
  table_refs = refs[inputs:inputs + 2] if rotary else ()
  out_refs = refs[-outputs:]
  length = in_refs[0].shape[1]
  decays = [_log_decay(length, width, rate) for rate in log_gamma]
  first = pl.program_id(0) * block  # this step's first problem (read outside the loop body)
  pairs = _pair_lanes((length, head_dim)) if rotary else None

  def problem(p, carry):
    if rotary:
      table = (first + p) % table_refs[0].shape[0]
    for h, decay in enumerate(decays):
      channels = pl.ds(h * head_dim, head_dim)
      args = [ref[p, :, channels] for ref in in_refs]
      if rotary:
        sin, cos = (ref[table, :, channels].astype(jnp.float32) for ref in table_refs)
        args[:2] = _rotate(args[0], sin, cos, pairs), _rotate(args[1], sin, cos, pairs)
      results = attend(*args, decay)
      if rotary and outputs == 3:  # dq, dk: the rotation's transpose
        results = (_unrotate(results[0], sin, cos, pairs),
                   _unrotate(results[1], sin, cos, pairs), *results[2:])
      for ref, value in zip(out_refs, results):
        ref[p, :, channels] = value.astype(ref.dtype)
    return carry

  jax.lax.fori_loop(0, in_refs[0].shape[0], problem, 0)


def _chunks(heads: int, head_dim: int) -> list[tuple[int, int, list[int]]]:
  """(first channel, channels, heads) of each 128-lane chunk of the channels: a column-layout
  copy holds one chunk (a strided load at a dynamic column of a copy more than 128 lanes wide
  does not compile). Heads of 16 or 32 channels never straddle two chunks."""
  channels = heads * head_dim
  return [(c, min(_LANES, channels - c),
           [h for h in range(heads) if c <= h * head_dim < c + _LANES])
          for c in range(0, channels, _LANES)]


def _column_scratch(problem: Problem, arrays: int, tables: int) -> list[Any]:
  """float32 VMEM copies for the column layout: one chunk of one image's block (tokens,
  columns, lanes) for each of `arrays` inputs and outputs, then all chunks of the step's block
  of each of `tables` tables."""
  chunks = _chunks(problem.heads, problem.head_dim)
  shape = (problem.length, problem.column_block, chunks[0][1])
  return ([pltpu.VMEM(shape, jnp.float32) for _ in range(arrays)]
          + [pltpu.VMEM((len(chunks), *shape), jnp.float32) for _ in range(tables)])


def _column_kernel(*refs, attend, inputs, outputs, log_gamma, head_dim, rotary):
  """The column layout's kernel around `attend`: for each image of the block and each 128-lane
  chunk of its channels, float32 copies of the inputs' chunk; for each column (a loop) and head
  of the chunk, attend(q, k, v, ..., decay) on (tokens, d) strided loads from them (q and k
  rotated with the tables' column), the results stored strided into float32 copies of the
  outputs' chunk, which go out to the output blocks in their dtype.

  refs: the `inputs` blocks (q, k, v, ...), the tables' blocks (signed sin, cos) if `rotary`,
  the `outputs` blocks, then `_column_scratch`'s copies (inputs, outputs, tables).
  attend: (q, k, v, *rest, decay) -> `outputs` float32 values; the first two are unrotated
    after it when rotary (dq, dk of the backward).
  """
  tables = 2 if rotary else 0
  in_refs, table_refs = refs[:inputs], refs[inputs:inputs + tables]
  out_refs = refs[inputs + tables:inputs + tables + outputs]
  scratch = refs[inputs + tables + outputs:]
  in_copies, out_copies = scratch[:inputs], scratch[inputs:inputs + outputs]
  table_copies = scratch[inputs + outputs:]
  q_ref = in_refs[0]
  heads = len(log_gamma)
  decays = [_log_decay(q_ref.shape[1], None, rate) for rate in log_gamma]
  pairs = _pair_lanes((q_ref.shape[1], head_dim)) if rotary else None
  chunks = _chunks(heads, head_dim)
  for copy, ref in zip(table_copies, table_refs):  # this column step's tables, once
    for c, (first, lanes, _) in enumerate(chunks):
      copy[c, :, :, :lanes] = ref[:, :, first:first + lanes].astype(jnp.float32)

  def image(p, carry):
    for c, (first, lanes, chunk_heads) in enumerate(chunks):
      for copy, ref in zip(in_copies, in_refs):
        copy[:, :, :lanes] = ref[p, :, :, first:first + lanes].astype(jnp.float32)

      def column(x, carry):
        for h in chunk_heads:
          lane = h * head_dim - first
          # (tokens, d) of column x: strided loads, one sublane of each tile.
          lanes_h = pl.ds(lane, head_dim)
          # The copies hold the inputs' values exactly: q and k are rotated from them in
          # float32, and every operand goes to the MXU in the inputs' dtype.
          args = [copy[:, x, lanes_h] for copy in in_copies]
          if rotary:
            sin, cos = (copy[c, :, x, lanes_h] for copy in table_copies)
            args[:2] = _rotate(args[0], sin, cos, pairs), _rotate(args[1], sin, cos, pairs)
          results = attend(*(a.astype(q_ref.dtype) for a in args), decays[h])
          if rotary and outputs == 3:  # dq, dk: the rotation's transpose
            results = (_unrotate(results[0], sin, cos, pairs),
                       _unrotate(results[1], sin, cos, pairs), *results[2:])
          for copy, value in zip(out_copies, results):
            copy[:, x, lanes_h] = value
        return carry

      jax.lax.fori_loop(0, q_ref.shape[2], column, 0)
      for ref, copy in zip(out_refs, out_copies):
        ref[p, :, :, first:first + lanes] = copy[:, :, :lanes].astype(ref.dtype)
    return carry

  jax.lax.fori_loop(0, q_ref.shape[0], image, 0)


def _call(kernel, problem: Problem, inputs: Sequence[jax.Array], tables: Sequence[jax.Array],
          out_dtypes, cost, interpret):
  """The kernel over blocks of problems of `inputs`; `tables` whole at every step (the column
  layout: the column step's share of them)."""
  scratch = []
  if problem.columns is None:
    block = pl.BlockSpec((problem.block, problem.length, problem.channels), lambda i: (i, 0, 0))
    whole = [pl.BlockSpec(t.shape, lambda i: (0, 0, 0)) for t in tables]
  else:
    shape = (problem.block, problem.length, problem.column_block, problem.channels)
    table_shape = shape[1:]
    if len(problem.grid) == 1:
      block = pl.BlockSpec(shape, lambda i: (i, 0, 0, 0))
      whole = [pl.BlockSpec(table_shape, lambda i: (0, 0, 0)) for _ in tables]
    else:
      block = pl.BlockSpec(shape, lambda j, i: (i, 0, j, 0))
      whole = [pl.BlockSpec(table_shape, lambda j, i: (0, j, 0)) for _ in tables]
    scratch = _column_scratch(problem, len(inputs) + len(out_dtypes), len(tables))
  shape = inputs[0].shape
  return common.call(
      kernel, (*inputs, *tables),
      out_shape=[jax.ShapeDtypeStruct(shape, dtype) for dtype in out_dtypes], grid=problem.grid,
      in_specs=[block] * len(inputs) + whole, out_specs=[block] * len(out_dtypes),
      scratch_shapes=scratch, dimension_semantics=('parallel',) * len(problem.grid), cost=cost,
      interpret=interpret)


def _problem(q: jax.Array, heads: int, width: int | None, tables: Sequence[jax.Array]) -> Problem:
  if q.ndim == 4:  # the column layout
    images, length, columns, channels = q.shape
    if channels % heads:
      raise ValueError(f'{channels} channels do not split into {heads} heads')
    if width is not None:
      raise ValueError('the column layout is attention along one axis: no width')
    if tables and tables[0].shape != q.shape[1:]:
      raise ValueError(f'rotary tables of shape {q.shape[1:]} (the map) expected for the '
                       f'column layout, got {tables[0].shape}')
    return Problem(images, length, heads, channels // heads, None, q.dtype.itemsize,
                   1 if tables else None, columns)
  problems, length, channels = q.shape
  if channels % heads:
    raise ValueError(f'{channels} channels do not split into {heads} heads')
  if width is not None and length % width:
    raise ValueError(f'{length} tokens are not a raster of width {width}')
  if tables and (tables[0].shape[1:] != (length, channels) or problems % tables[0].shape[0]):
    raise ValueError(f'rotary tables of shape (T, {length}, {channels}) with T dividing '
                     f'{problems} problems expected, got {tables[0].shape}')
  return Problem(problems, length, heads, channels // heads, width, q.dtype.itemsize,
                 tables[0].shape[0] if tables else None)


def _kernel(backward: bool, problem: Problem, log_gamma):
  rotary = problem.tables is not None
  attend = _attend_backward if backward else (lambda *args: (_attend(*args),))
  common_args = dict(attend=attend, inputs=4 if backward else 3, outputs=3 if backward else 1,
                     log_gamma=log_gamma, head_dim=problem.head_dim, rotary=rotary)
  if problem.columns is not None:
    return functools.partial(_column_kernel, **common_args)
  return functools.partial(_row_kernel, width=problem.width, block=problem.block, **common_args)


def _forward(q, k, v, tables, log_gamma, width, interpret):
  problem = _problem(q, len(log_gamma), width, tables)
  return _call(_kernel(False, problem, log_gamma), problem, (q, k, v), tables,
               (v.dtype,), cost_estimates(problem)[0], interpret)[0]


def _backward(q, k, v, dout, tables, log_gamma, width, interpret):
  problem = _problem(q, len(log_gamma), width, tables)
  return tuple(_call(_kernel(True, problem, log_gamma), problem, (q, k, v, dout),
                     tables, (q.dtype, k.dtype, v.dtype), cost_estimates(problem)[1],
                     interpret))


def _check_split(q: jax.Array, tables: Sequence[jax.Array]) -> None:
  """Under a mesh, each device takes its share of the problems (the leading axis) and the
  rotary tables whole: a device's first problem must be a multiple of T (the problems are
  images x rows, split by image), so that problem p still takes table p % T; the column
  layout's leading axis is images."""
  devices = common.devices((q, tables))
  if devices == 1:
    return
  local = q.shape[0] // devices
  rows = tables and q.ndim == 3  # problem p takes table p % T
  if q.shape[0] % devices or (rows and local % tables[0].shape[0]):
    raise ValueError(f'{q.shape[0]} attention problems do not split over {devices} devices'
                     + (' by image' if tables else ''))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, tables, log_gamma, width, interpret):
  _check_split(q, tables)
  forward = lambda arrays, tables: (_forward(*arrays, tables, log_gamma, width, interpret), ())
  return common.per_device(forward, (q, k, v), tables)[0]


def _attention_fwd(q, k, v, tables, log_gamma, width, interpret):
  return _attention(q, k, v, tables, log_gamma, width, interpret), (q, k, v, tables)


def _attention_bwd(log_gamma, width, interpret, residuals, dout):
  q, k, v, tables = residuals
  backward = lambda arrays, tables: (_backward(*arrays, tables, log_gamma, width, interpret), ())
  grads = common.per_device(backward, (q, k, v, dout.astype(v.dtype)), tables)[0]
  # The rotary tables are position encodings, not parameters: no gradient.
  return (*grads, jax.tree.map(jnp.zeros_like, tables))


_attention.defvjp(_attention_fwd, _attention_bwd)


def columns_fit_vmem(shape: Sequence[int], heads: int, itemsize: int) -> bool:
  """Whether `decayed_attention`'s column layout of a (b, h, w, heads * d) map in this itemsize
  fits VMEM (`common.budget()`): all but float32 maps of 28 columns with more than 128
  channels (RMT-B and RMT-L's stage 2 at 224 pixels computing in float32)."""
  images, length, columns, channels = shape
  return Problem(images, length, heads, channels // heads, None, itemsize, 1, columns).fits_vmem


def decayed_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_gamma: Sequence[float], *,
                      width: int | None = None,
                      rotary: tuple[jax.Array, jax.Array] | None = None,
                      interpret: bool | None = None) -> jax.Array:
  """softmax(q k^T + log_gamma[h] * distance) v per problem and head, as one Pallas kernel.

  Args:
    q: (problems, tokens, heads * d), already scaled; head h owns channels [h*d, (h+1)*d).
      Or the column layout, (b, h, w, heads * d): attention along h in each of the w columns
      of each image (the axial column pass, without transposing the map).
    k: like q.
    v: like q; the output takes its dtype.
    log_gamma: the per-head log decay rates (`decay.log_gamma`), static numbers.
    width: None for attention along one axis (distance |i - j|); the raster width W for
      attention over a whole (tokens // W) x W map (Manhattan distance).
    rotary: None if q and k are already rotated; else (sin, cos), each (T, tokens, heads * d)
      with T dividing `problems`, and the kernels apply `layers.theta_shift` to q and k of
      problem p with table p % T (for the row pass of a (b, h, w) map: the tables at (h, w)
      and T = h), so that the rotated q and k never pass through HBM; in the column layout
      (h, w, heads * d), the tables of the map (column x takes [:, x]). Not differentiated.
    interpret: True runs Pallas's interpreter, False the Mosaic kernel (TPU only); None (the
      default) chooses at lowering: Mosaic when lowered for a TPU, else the interpreter, which
      computes the same function slowly (so that `kernels='tpu'` can be tested on a CPU).

  Returns:
    q's shape, in v's dtype. Differentiable in q, k and v (a second kernel).
  """
  if not q.shape == k.shape == v.shape or q.ndim not in (3, 4):
    raise ValueError(f'q, k, v of one shape (problems, tokens, channels) or (images, tokens, '
                     f'columns, channels) expected, got {q.shape}, {k.shape}, {v.shape}')
  rates = tuple(float(r) for r in np.asarray(log_gamma, np.float32))
  tables = ()
  if rotary is not None:
    sin, cos = rotary
    if sin.shape != cos.shape or sin.ndim != 3:
      raise ValueError(f'rotary (sin, cos) of one 3-d shape expected, got '
                       f'{sin.shape}, {cos.shape}')
    # The sign of theta_shift's swapped term goes into the sin table, as there.
    signed_sin = (sin.reshape(*sin.shape[:-1], -1, 2) * np.array([-1, 1], sin.dtype)
                  ).reshape(sin.shape)
    tables = (signed_sin, cos)
  return _attention(q, k, v, tables, rates, width, interpret)
