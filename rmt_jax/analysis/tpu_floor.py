"""What a TPU would spend on each Pallas kernel of a program: a physical estimate beside XLA's.

XLA's TPU cost model prices a Pallas kernel (a `tpu_custom_call`) by its declared cost alone:
max(declared flops / its MXU rate, transcendentals / its rate, declared bytes / its
bandwidth). It cannot see vector-unit work (undeclared work is free, vector work declared as
flops is charged at the MXU's speed), the MXU's padding of small contractions, the (8, 128)
tiling of the arrays in HBM, or a grid that splits unevenly over a chip's TensorCores. This
module reads each `pallas_call` of a program's jaxpr (its grid, blocks and kernel body) and
counts, per grid step:

- MXU work: each `dot_general` of the body as M x pad(K) x pad(N) multiply-accumulates, K and N
  padded to the MXU's size (the MXU holds a K x N operand tile; M streams through), times the
  trip counts of the body's loops;
- vector work: each elementwise or reduction primitive as one operation per vreg (8 sublanes x
  128 lanes of 32 bits) of its result (of its operand for reductions), per TensorCore (a
  scalar broadcast is free: vector operations take scalar operands);
  transcendentals (exp, log, rsqrt, ...) as one vreg each on their own unit; bfloat16 counted
  as float32 (see `VREG`);
- HBM bytes: each block (inputs and outputs) at its size in (8, 128) tiles of its two minor
  axes, each time its block index changes along the grid's order;

and the grid's balance: the leading 'parallel' axis split over the TensorCores of a device,
ceil(n / cores) / (n / cores) (a grid without one runs on one core). A kernel's estimate is the
largest of its MXU, vector, transcendental and HBM times after balance; a step's is the sum of
its kernels' plus XLA's own estimate for everything else (XLA's step estimate minus XLA's
charge for the kernels). What it cannot see: loads, stores and cross-lane work (transposes,
reshapes, the cross-lane part of reductions), loops of unknown trip count (counted once, and
reported), the overlap of a grid step's DMA with its work being imperfect, and XLA's own
operations (taken from XLA as they are). An estimate, not a measurement.

`CHIPS` holds the chip figures, each with its source; `floor(closed_jaxpr, chip)` the counts.

May import: jax, numpy.
"""

import dataclasses
import math
import os
from typing import Any, Iterator

import jax
import jax.extend  # jax.extend.core.Literal
import numpy as np

# A vreg: 8 sublanes x 128 lanes of 32 bits. A bfloat16 vreg packs 16 x 128, but the vector
# units of v4, v5e and v5p do their arithmetic in float32 (bfloat16 operands are unpacked), so
# every dtype is counted at 8 x 128 elements per operation; on a chip that computes bfloat16
# in its vector unit this overcounts bfloat16 work up to 2x.
VREG = (8, 128)
# The tiles of an array's two minor axes in HBM, as XLA lays them out for the TPU (`T(8,128)`
# in the compiled HLO's layouts; `rmt_jax.analysis.tpu_traffic` reads them there).
TILE = (8, 128)


@dataclasses.dataclass(frozen=True)
class ChipFigures:
  """One TPU chip's figures for the physical estimate.

  Attributes:
    name: the chip ('v5p', ...).
    tensorcores: TensorCores per chip.
    mxus_per_core: matrix units per TensorCore (for the record: the MXU rate is taken from
      `bf16_flops`, which counts them).
    mxu_size: an MXU's side: contractions and output columns pad to multiples of it.
    valu_per_cycle: vector ALU operations (each on a whole vreg) issued per cycle per
      TensorCore.
    eup_per_cycle: transcendental vreg operations per cycle per TensorCore.
    clock_hz: the TensorCore's clock.
    hbm_bytes_per_second: per chip.
    bf16_flops: dense bfloat16 peak per chip (2 x MACs).
    hbm_bytes: HBM capacity per chip.
  """
  name: str
  tensorcores: int
  mxus_per_core: int
  mxu_size: int
  valu_per_cycle: float
  eup_per_cycle: float
  clock_hz: float
  hbm_bytes_per_second: float
  bf16_flops: float
  hbm_bytes: int


# The chips, by name. Sources (Google Cloud TPU system architecture pages, one per version,
# cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}, and the TPU papers):
# - TensorCores, MXUs and their size: v4 "two TensorCores ... four MXUs" each (docs/v4 and
#   Jouppi et al., "TPU v4", ISCA 2023); v5e one TensorCore with four MXUs (docs/v5e); v5p
#   two TensorCores (docs/v5p: a 2x2x1 slice is 4 chips, 8 cores) with four MXUs each
#   (docs/v5p-training); v6e one TensorCore with two 256 x 256 MXUs (docs/v6e). v4, v5e and v5p
#   MXUs are 128 x 128 (docs/system-architecture-tpu-vm).
# - bf16 peak, HBM bandwidth and HBM capacity per chip: docs/{v4,v5e,v5p,v6e}: 275 TFLOP/s,
#   1200 GB/s and 32 GiB; 197, 819 and 16; 459, 2765 and 95; 918, 1640 and 32.
# - Clock: v4 1050 MHz (Jouppi et al. 2023, Table 2). v5e and v5p are not published; the peak
#   = TensorCores x MXUs x 128^2 x 2 x clock gives 1.5 GHz and 1.75 GHz. v6e's docs figures
#   would give 3.5 GHz by the same formula, which is not credible; 1.75 GHz is used UNVERIFIED
#   (the MXU rate is taken from the peak itself, so only the vector times depend on it).
# - Vector ALU ops per cycle per TensorCore: published for TPUv2/v3 as two ALUs per lane of
#   each sublane, 8 x 128 x 2 (Norrie et al., "The Design Process for Google's Training Chips:
#   TPUv2 and TPUv3", IEEE Micro 2021): 2 whole-vreg ops per cycle. For v4 on, no figure is
#   published; 4 per cycle (issue 30's count) is used UNVERIFIED, for every chip.
# - Transcendentals: one vreg per cycle per TensorCore, what XLA's own rate for them on v5p
#   implies (3.07e12/s = 0.86 x 8 x 128 x 2 cores x 1.75 GHz, measured on isolated calls).
# Correct a figure here once a chip measures it: nothing else holds these numbers.
CHIPS = {
    'v4': ChipFigures('v4', 2, 4, 128, 4, 1, 1.05e9, 1.2e12, 275e12, 32 * 2**30),
    'v5e': ChipFigures('v5e', 1, 4, 128, 4, 1, 1.5e9, 0.819e12, 197e12, 16 * 2**30),
    'v5p': ChipFigures('v5p', 2, 4, 128, 4, 1, 1.75e9, 2.765e12, 459e12, 95 * 2**30),
    'v6e': ChipFigures('v6e', 1, 2, 256, 4, 1, 1.75e9, 1.64e12, 918e12, 32 * 2**30),
}

# The chips by the `device_kind` that jax (libtpu) gives their devices.
DEVICE_KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5': 'v5p', 'TPU v6 lite': 'v6e'}

# XLA's price of a Pallas call, measured on isolated calls compiled for v5p with libtpu 0.0.42
# (issue 30): max(declared flops / 394e12, transcendentals / 3.07e12, declared bytes /
# 2.35e12), per chip. Other chips: the same fractions of their own peak, bandwidth and
# transcendental rate (not measured).
_XLA_V5P = {'flops': 394e12, 'transcendentals': 3.07e12, 'bytes': 2.35e12}


def xla_rates(chip: ChipFigures) -> dict[str, float]:
  """XLA's rates for a Pallas call's declared cost on `chip`, per chip (see `_XLA_V5P`)."""
  v5p = CHIPS['v5p']

  def eup(c: ChipFigures) -> float:
    return c.eup_per_cycle * VREG[0] * VREG[1] * c.tensorcores * c.clock_hz

  return {'flops': _XLA_V5P['flops'] * chip.bf16_flops / v5p.bf16_flops,
          'transcendentals': _XLA_V5P['transcendentals'] * eup(chip) / eup(v5p),
          'bytes': _XLA_V5P['bytes'] * chip.hbm_bytes_per_second / v5p.hbm_bytes_per_second}


# ---------------------------------------------------------------------------------------------
# Counting a kernel's body.

# One vector operation per vreg of the result.
_ELEMENTWISE = frozenset({
    'add', 'sub', 'mul', 'neg', 'max', 'min', 'abs', 'sign', 'floor', 'ceil', 'round',
    'select_n', 'clamp', 'eq', 'ne', 'lt', 'le', 'gt', 'ge', 'and', 'or', 'not', 'xor',
    'shift_left', 'shift_right_logical', 'shift_right_arithmetic', 'convert_element_type',
    'integer_pow', 'square', 'iota', 'broadcast_in_dim', 'nextafter', 'rem', 'is_finite',
    'add_any', 'copy', 'copy_p', 'population_count', 'bitcast_convert_type'})
# One vector operation per vreg of the operand.
_REDUCTIONS = frozenset({'reduce_sum', 'reduce_max', 'reduce_min', 'reduce_prod', 'reduce_and',
                         'reduce_or', 'argmax', 'argmin', 'cumsum', 'cummax', 'cummin',
                         'cumprod', 'cumlogsumexp'})
# One operation per vreg on the transcendental unit; `div` is a reciprocal there and a multiply.
_TRANSCENDENTAL = frozenset({'exp', 'exp2', 'log', 'log1p', 'expm1', 'tanh', 'logistic',
                             'rsqrt', 'sqrt', 'cbrt', 'erf', 'erfc', 'erf_inv', 'sin', 'cos',
                             'tan', 'atan2', 'pow', 'div'})
# Calls whose bodies run once where they stand.
_CALLS = frozenset({'jit', 'pjit', 'closed_call', 'run_scoped', 'custom_jvp_call',
                    'custom_vjp_call', 'remat', 'checkpoint'})
# Everything else has no vector ALU work of its own here: loads and stores (`get`, `swap`), the
# cross-lane unit's moves (transpose, roll, reshapes, slices, concatenation), DMAs. Those with
# array results are listed in `Work.not_counted` (loads and stores excepted).
_LOADS_AND_STORES = frozenset({'get', 'swap', 'load', 'store', 'masked_load', 'masked_swap'})


@dataclasses.dataclass
class Work:
  """Work per grid step of a kernel (or per iteration of a loop in its body).

  Attributes:
    mxu_macs: multiply-accumulates at the MXU's tile (K and N padded).
    vector_ops: vector ALU operations, one per vreg.
    transcendental_ops: transcendental-unit operations, one per vreg.
    unknown_loops: loops whose trip count could not be read (counted once).
    not_counted: primitives with array results that the count leaves out (moves, cross-lane).
  """
  mxu_macs: float = 0.0
  vector_ops: float = 0.0
  transcendental_ops: float = 0.0
  unknown_loops: int = 0
  not_counted: frozenset = frozenset()

  def __add__(self, other: 'Work') -> 'Work':
    return Work(self.mxu_macs + other.mxu_macs, self.vector_ops + other.vector_ops,
                self.transcendental_ops + other.transcendental_ops,
                self.unknown_loops + other.unknown_loops, self.not_counted | other.not_counted)

  def times(self, n: float) -> 'Work':
    return Work(self.mxu_macs * n, self.vector_ops * n, self.transcendental_ops * n,
                self.unknown_loops, self.not_counted)


def _pad(n: int, to: int) -> int:
  return -(-n // to) * to


def vregs(shape: tuple[int, ...]) -> int:
  """The vregs an array of `shape` occupies: its minor axis over 128 lanes, the next over 8
  sublanes, each rounded up, times the other axes (a scalar: none, it is the scalar unit's)."""
  if not shape:
    return 0
  lanes = -(-shape[-1] // VREG[1])
  sublanes = -(-shape[-2] // VREG[0]) if len(shape) > 1 else 1
  return int(np.prod(shape[:-2], dtype=np.int64)) * sublanes * lanes


def padded_macs(lhs: tuple[int, ...], rhs: tuple[int, ...], dimension_numbers: Any,
                mxu: int) -> int:
  """A dot_general's multiply-accumulates on an MXU of side `mxu`: batch x M x pad(K) x
  pad(N)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers

  def size(shape, axes):
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))

  batch = size(lhs, lhs_batch)
  k = size(lhs, lhs_contract)
  m = size(lhs, [a for a in range(len(lhs)) if a not in (*lhs_contract, *lhs_batch)])
  n = size(rhs, [a for a in range(len(rhs)) if a not in (*rhs_contract, *rhs_batch)])
  return batch * m * _pad(k, mxu) * _pad(n, mxu)


def _var(atom: Any) -> Any:
  """A jaxpr variable, or None for a literal (literals are not hashable)."""
  return None if isinstance(atom, jax.extend.core.Literal) else atom


def _shape(atom: Any) -> tuple[int, ...]:
  return tuple(getattr(atom.aval, 'shape', ()))


def _while_trips(eqn: Any) -> int | None:
  """The trip count of a `fori_loop`-shaped while (counter from a literal start, `lt` against a
  literal bound), else None."""
  cond = eqn.params['cond_jaxpr'].jaxpr
  body_nconsts, cond_nconsts = eqn.params['body_nconsts'], eqn.params['cond_nconsts']
  if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != 'lt':
    return None
  counter, bound = cond.eqns[0].invars
  carries = cond.invars[cond_nconsts:]
  if counter not in carries:
    return None
  start = eqn.invars[cond_nconsts + body_nconsts + carries.index(counter)]
  literal = jax.extend.core.Literal
  if not isinstance(bound, literal) or not isinstance(start, literal):
    return None
  return max(int(bound.val) - int(start.val), 0)


def body_work(jaxpr: Any, grid: tuple[int, ...], mxu: int) -> Work:
  """The work of one run of a kernel body (a jaxpr), per `Work`.

  `pl.when(pl.program_id(a) == v)` (a `cond` on that comparison with a scalar, e.g. the first
  or the last step of axis a) is weighted by how often it holds, 1 / grid[a]; other conds count
  their costliest branch.
  """
  work = Work()
  program_ids: dict[Any, int] = {}  # var -> grid axis
  once_per: dict[Any, int] = {}  # var -> grid axis, for `program_id(axis) == scalar`
  not_counted = set()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    outs = [v for v in eqn.outvars if hasattr(v.aval, 'shape')]
    if name == 'program_id':
      program_ids[eqn.outvars[0]] = eqn.params['axis']
    elif name == 'eq' and any(_var(v) in program_ids for v in eqn.invars) and all(
        not _shape(v) for v in eqn.invars):
      once_per[eqn.outvars[0]] = next(program_ids[_var(v)] for v in eqn.invars
                                        if _var(v) in program_ids)
    elif name == 'convert_element_type' and _var(eqn.invars[0]) in once_per:
      once_per[eqn.outvars[0]] = once_per[_var(eqn.invars[0])]
    if name == 'dot_general':
      work.mxu_macs += padded_macs(_shape(eqn.invars[0]), _shape(eqn.invars[1]),
                                   eqn.params['dimension_numbers'], mxu)
    elif name in _TRANSCENDENTAL:
      count = sum(vregs(_shape(v)) for v in outs)
      work.transcendental_ops += count
      work.vector_ops += count if name == 'div' else 0
    elif name == 'broadcast_in_dim' and not _shape(eqn.invars[0]):
      pass  # a scalar splat: vector operations take a scalar operand as it is
    elif name in _ELEMENTWISE:
      work.vector_ops += sum(vregs(_shape(v)) for v in outs)
    elif name in _REDUCTIONS:
      work.vector_ops += sum(vregs(_shape(v)) for v in eqn.invars)
    elif name == 'scan':
      work += body_work(eqn.params['jaxpr'].jaxpr, grid, mxu).times(eqn.params['length'])
    elif name == 'while':
      trips = _while_trips(eqn)
      inner = body_work(eqn.params['body_jaxpr'].jaxpr, grid, mxu)
      work += inner.times(trips if trips is not None else 1)
      work.unknown_loops += trips is None
    elif name == 'cond':
      branches = [body_work(b.jaxpr, grid, mxu) for b in eqn.params['branches']]
      axis = once_per.get(_var(eqn.invars[0]))
      if axis is not None and len(branches) == 2 and axis < len(grid) and grid[axis] > 0:
        once = 1 / grid[axis]
        work += branches[0].times(1 - once) + branches[1].times(once)
      else:
        costliest = max(branches, key=lambda w: (w.mxu_macs, w.vector_ops,
                                                 w.transcendental_ops))
        work += costliest
    elif name in _CALLS:
      for inner in _subjaxprs(eqn):
        work += body_work(inner, grid, mxu)
    elif name not in _LOADS_AND_STORES and any(_shape(v) for v in outs):
      not_counted.add(name)
  work.not_counted = work.not_counted | frozenset(not_counted)
  return work


# ---------------------------------------------------------------------------------------------
# A kernel's blocks, grid and estimate.

def _block_size(dim: Any) -> int:
  """A block dimension's extent: an int, `Blocked(n)` and friends, or 1 (squeezed)."""
  if isinstance(dim, (int, np.integer)):
    return int(dim)
  size = getattr(dim, 'block_size', None)
  return int(size) if isinstance(size, (int, np.integer)) else 1


def tiled_bytes(shape: tuple[int, ...], itemsize: int) -> int:
  """An array's bytes at the (8, 128) tiling of its two minor axes."""
  shape = list(shape) or [1]
  shape[-1] = _pad(shape[-1], TILE[1])
  if len(shape) > 1:
    shape[-2] = _pad(shape[-2], TILE[0])
  return int(np.prod(shape, dtype=np.int64)) * itemsize


def _grid_axes(index_map: Any, axes: int) -> set[int]:
  """The grid axes that a block's index map reads (through any of its equations)."""
  jaxpr = index_map.jaxpr
  depends: dict[Any, set[int]] = {v: {i} for i, v in enumerate(jaxpr.invars[:axes])}
  for v in jaxpr.invars[axes:]:  # scalar-prefetch operands: data, no grid axis of their own
    depends[v] = set()
  for eqn in jaxpr.eqns:
    reads = set().union(*(depends.get(_var(v), set()) for v in eqn.invars))
    for v in eqn.outvars:
      depends[v] = reads
  return set().union(*(depends.get(_var(v), set()) for v in jaxpr.outvars))


def fetches(grid: tuple[int, ...], axes: set[int], cores_used: int) -> int:
  """How often a block is copied over a grid run in row-major order (the last axis fastest):
  each time an axis its index reads changes, i.e. prod(grid[:j + 1]) for the innermost such
  axis j; a block whose index reads no axis, once per TensorCore that runs the grid."""
  if not axes:
    return cores_used
  return int(np.prod(grid[:max(axes) + 1], dtype=np.int64))


def _is_parallel(semantics: Any) -> bool:
  return 'parallel' in str(semantics).lower()


def dimension_semantics(params: dict[str, Any]) -> tuple[Any, ...]:
  compiler = params.get('compiler_params')
  if isinstance(compiler, dict):  # older jax: {'mosaic_tpu': CompilerParams or dict}
    compiler = compiler.get('mosaic_tpu', compiler.get('mosaic', {}))
  found = (compiler.get('dimension_semantics') if isinstance(compiler, dict)
           else getattr(compiler, 'dimension_semantics', None))
  return tuple(found or ())


def balance(grid: tuple[int, ...], semantics: tuple[Any, ...], cores: int) -> tuple[float, int]:
  """(the busiest TensorCore's share of the grid over an even split, cores used): the leading
  axis, where 'parallel', split over `cores`, ceil(n / cores) / (n / cores); else one core."""
  if cores <= 1:
    return 1.0, 1
  if grid and semantics and _is_parallel(semantics[0]):
    n = grid[0]
    return math.ceil(n / cores) / (n / cores), min(n, cores)
  return float(cores), 1


def _kernel_name(eqn: Any) -> str:
  """`module.function` of a kernel body (e.g. 'block_tail._forward_kernel')."""
  info = getattr(eqn.params['jaxpr'], 'debug_info', None)
  function = getattr(info, 'func_name', None) or eqn.params.get('name') or 'kernel'
  source = getattr(info, 'func_src_info', '') or ''
  module = ''
  if ' at ' in source:
    module = os.path.splitext(os.path.basename(source.split(' at ')[1].split(':')[0]))[0]
  return f'{module}.{function}' if module else function


@dataclasses.dataclass
class Kernel:
  """One pallas_call's estimate (per run; `runs` times per program)."""
  name: str
  grid: tuple[int, ...]
  runs: int
  mxu_macs: float  # per run, padded
  vector_ops: float
  transcendental_ops: float
  hbm_bytes: float  # at tiling
  balance: float
  mxu_seconds: float
  vector_seconds: float
  transcendental_seconds: float
  hbm_seconds: float
  seconds: float  # the largest of the four
  bound: str  # which
  declared: dict[str, float]
  xla_seconds: float  # XLA's price of the declared cost
  unknown_loops: int
  not_counted: tuple[str, ...]


def kernel_estimate(eqn: Any, chip: ChipFigures, devices_per_chip: int = 1,
                    runs: int = 1) -> Kernel:
  """The physical estimate of one `pallas_call` equation on one device of `chip`.

  Args:
    eqn: the equation (its params hold the grid mapping, blocks and body).
    chip: the chip's figures.
    devices_per_chip: devices the chip is presented as (2 for libtpu's v4 topologies: one per
      TensorCore); a device's share of the chip's cores, bandwidth and peak.
    runs: how many times the program runs it (loops around the call).
  """
  mapping = eqn.params['grid_mapping']
  grid = tuple(int(g) for g in mapping.grid)
  steps = int(np.prod(grid, dtype=np.int64))
  cores = max(chip.tensorcores // devices_per_chip, 1)
  share, cores_used = balance(grid, dimension_semantics(eqn.params), cores)
  work = body_work(eqn.params['jaxpr'], grid, chip.mxu_size).times(steps)
  hbm = 0
  for block in mapping.block_mappings:
    space = str(getattr(block.block_aval, 'memory_space', '')).lower()
    if 'any' in space or 'hbm' in space or 'smem' in space:
      continue  # not pipelined by the grid: the body's own copies, not counted
    shape = tuple(_block_size(d) for d in block.block_shape)
    axes = _grid_axes(block.index_map_jaxpr, len(grid))
    hbm += fetches(grid, axes, cores_used) * tiled_bytes(
        shape, np.dtype(block.array_aval.dtype).itemsize)
  clock_ops = chip.clock_hz * cores  # per device
  times = {
      'mxu': 2 * work.mxu_macs / (chip.bf16_flops / devices_per_chip) * share,
      'vector': work.vector_ops / (chip.valu_per_cycle * clock_ops) * share,
      'transcendental': work.transcendental_ops / (chip.eup_per_cycle * clock_ops) * share,
      'hbm': hbm / (chip.hbm_bytes_per_second / devices_per_chip) * share}
  bound = max(times, key=times.get)
  cost = eqn.params.get('cost_estimate')
  declared = {'flops': float(getattr(cost, 'flops', 0) or 0),
              'transcendentals': float(getattr(cost, 'transcendentals', 0) or 0),
              'bytes_accessed': float(getattr(cost, 'bytes_accessed', 0) or 0)}
  rates = xla_rates(chip)
  xla = max(declared['flops'] / (rates['flops'] / devices_per_chip),
            declared['transcendentals'] / (rates['transcendentals'] / devices_per_chip),
            declared['bytes_accessed'] / (rates['bytes'] / devices_per_chip))
  return Kernel(_kernel_name(eqn), grid, runs, work.mxu_macs, work.vector_ops,
                work.transcendental_ops, float(hbm), share, times['mxu'], times['vector'],
                times['transcendental'], times['hbm'], times[bound], bound, declared, xla,
                work.unknown_loops, tuple(sorted(work.not_counted)))


# ---------------------------------------------------------------------------------------------
# A program.

def _tpu_branch(platform_eqn: Any) -> int | None:
  """The branch a `platform_dependent` takes on a TPU (from its `platform_index` equation)."""
  platforms = platform_eqn.params.get('platforms', ())
  for i, names in enumerate(platforms):
    if names is not None and 'tpu' in names:
      return i
  has_default = any(names is None for names in platforms)
  return len(platforms) - 1 if has_default else None


def pallas_calls(jaxpr: Any, runs: int = 1) -> Iterator[tuple[Any, int]]:
  """The `pallas_call` equations a TPU would run, each with how often it runs: through the
  jaxpr's sub-jaxprs, the TPU branch only of `platform_dependent`'s conds (the compiled TPU
  program keeps that one), each branch of other conds, scans' bodies times their length (a
  while's body once)."""
  platform = {}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'platform_index':
      platform[eqn.outvars[0]] = _tpu_branch(eqn)
    elif name == 'pallas_call':
      yield eqn, runs
    elif name == 'cond' and platform.get(_var(eqn.invars[0])) is not None:
      branch = platform[_var(eqn.invars[0])]
      yield from pallas_calls(eqn.params['branches'][branch].jaxpr, runs)
    elif name == 'scan':
      yield from pallas_calls(eqn.params['jaxpr'].jaxpr, runs * int(eqn.params['length']))
    else:
      for sub in _subjaxprs(eqn):
        yield from pallas_calls(sub, runs)


def _subjaxprs(eqn: Any) -> Iterator[Any]:
  for param in eqn.params.values():
    for item in (param if isinstance(param, (tuple, list)) else (param,)):
      inner = getattr(item, 'jaxpr', item)
      if hasattr(inner, 'eqns'):
        yield inner


def floor(closed_jaxpr: Any, chip: ChipFigures | str, devices_per_chip: int = 1,
          xla_step_seconds: float | None = None) -> dict[str, Any]:
  """The physical estimate of every Pallas kernel of a program, per device, and of the step.

  Args:
    closed_jaxpr: the program's jaxpr (`jax.jit(f).trace(...).jaxpr`, `jax.make_jaxpr(f)(...)`).
    chip: a `ChipFigures` or a name of `CHIPS`.
    devices_per_chip: as `kernel_estimate` takes it.
    xla_step_seconds: XLA's estimate for the whole program (`optimal_seconds`), if known: the
      step's physical estimate is then the kernels' plus XLA's for everything else.

  Returns:
    A JSON-ready dict: 'chip'; 'pallas_calls' (equations in the program, each counted once);
    'kernels' (one row per kernel and shape: name, grid, calls, runs, per-run counts and the
    seconds of all its runs, physical and XLA's); 'by_kernel' (the same summed by kernel, with
    each unit's seconds: the units overlap, so these add to more than 'seconds');
    'kernel_seconds' and 'kernel_xla_seconds' (sums); 'kernel_seconds_without_vector' (the
    kernels' seconds if their vector work were free: per run the largest of MXU, transcendental
    and HBM time, a floor that no rework of their vector work goes below, given their matrix
    shapes and arrays); with `xla_step_seconds`, 'other_xla_seconds', 'step_seconds' and
    'step_seconds_without_vector'; 'unknown_loops'; 'not_counted' (primitives the vector count
    leaves out).
  """
  chip = CHIPS[chip] if isinstance(chip, str) else chip
  jaxpr = getattr(closed_jaxpr, 'jaxpr', closed_jaxpr)
  rows: dict[tuple, dict[str, Any]] = {}
  calls = 0
  not_counted = set()
  unknown = 0
  for eqn, runs in pallas_calls(jaxpr):
    calls += 1
    k = kernel_estimate(eqn, chip, devices_per_chip, runs)
    blocks = tuple(tuple(_block_size(d) for d in b.block_shape)
                   for b in eqn.params['grid_mapping'].block_mappings)
    key = (k.name, k.grid, blocks)
    row = rows.setdefault(key, {
        'kernel': k.name, 'grid': list(k.grid), 'first_block': list(blocks[0]) if blocks else [],
        'calls': 0, 'runs': 0, 'balance': k.balance,
        'per_run': {'mxu_macs': k.mxu_macs, 'vector_ops': k.vector_ops,
                    'transcendental_ops': k.transcendental_ops, 'hbm_bytes': k.hbm_bytes,
                    'declared': k.declared},
        'per_run_seconds': {'mxu': k.mxu_seconds, 'vector': k.vector_seconds,
                            'transcendental': k.transcendental_seconds, 'hbm': k.hbm_seconds},
        'bound': k.bound, 'seconds': 0.0, 'xla_seconds': 0.0, 'seconds_without_vector': 0.0})
    row['calls'] += 1
    row['runs'] += runs
    row['seconds'] += runs * k.seconds
    row['seconds_without_vector'] += runs * max(k.mxu_seconds, k.transcendental_seconds,
                                                k.hbm_seconds)
    row['xla_seconds'] += runs * k.xla_seconds
    not_counted |= set(k.not_counted)
    unknown += k.unknown_loops
  kernels = sorted(rows.values(), key=lambda r: -r['seconds'])
  by_kernel: dict[str, dict[str, Any]] = {}
  for r in kernels:
    total = by_kernel.setdefault(r['kernel'], {
        'kernel': r['kernel'], 'calls': 0, 'runs': 0, 'seconds': 0.0, 'xla_seconds': 0.0,
        'mxu_seconds': 0.0, 'vector_seconds': 0.0, 'transcendental_seconds': 0.0,
        'hbm_seconds': 0.0})
    for key in ('calls', 'runs', 'seconds', 'xla_seconds'):
      total[key] += r[key]
    for unit, seconds in r['per_run_seconds'].items():
      total[f'{unit}_seconds'] += r['runs'] * seconds
  result = {
      'chip': dataclasses.asdict(chip), 'devices_per_chip': devices_per_chip,
      'xla_rates': xla_rates(chip), 'pallas_calls': calls, 'kernels': kernels,
      'by_kernel': sorted(by_kernel.values(), key=lambda r: -r['seconds']),
      'kernel_seconds': sum(r['seconds'] for r in kernels),
      'kernel_xla_seconds': sum(r['xla_seconds'] for r in kernels),
      'kernel_seconds_without_vector': sum(r['seconds_without_vector'] for r in kernels),
      'unknown_loops': unknown, 'not_counted': sorted(not_counted)}
  if xla_step_seconds is not None:
    result['other_xla_seconds'] = xla_step_seconds - result['kernel_xla_seconds']
    other = max(result['other_xla_seconds'], 0.0)
    result['step_seconds'] = result['kernel_seconds'] + other
    result['step_seconds_without_vector'] = result['kernel_seconds_without_vector'] + other
  return result


def format_kernels(result: dict[str, Any], rows: int = 15) -> str:
  """`floor`'s kernels as two Markdown tables: by kernel, then the costliest kernel shapes (ms
  per device, all runs)."""
  ms = lambda s: f'{1e3 * s:.3f}'  # pylint: disable=unnecessary-lambda-assignment
  if not result['kernels']:
    return f"No Pallas kernels in the program ({result['chip']['name']})."
  lines = [
      f"Pallas kernels per device on {result['chip']['name']}: physical estimate "
      f"{ms(result['kernel_seconds'])} ms (MXU at its {result['chip']['mxu_size']}-wide tile, "
      'vector work at vreg granularity, bytes at (8, 128) tiles, grid balance over '
      f"TensorCores; per kernel the largest unit), XLA's charge for them "
      f"{ms(result['kernel_xla_seconds'])} ms (their declared cost); with their vector work "
      f"free, {ms(result['kernel_seconds_without_vector'])} ms. Estimates, not "
      'measurements.', '',
      '| kernel | calls | runs | MXU ms | vector ms | transc. ms | HBM ms | physical ms | '
      'XLA ms |', '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for r in result['by_kernel']:
    lines.append(
        f"| {r['kernel']} | {r['calls']} | {r['runs']} | {ms(r['mxu_seconds'])} | "
        f"{ms(r['vector_seconds'])} | {ms(r['transcendental_seconds'])} | "
        f"{ms(r['hbm_seconds'])} | {ms(r['seconds'])} | {ms(r['xla_seconds'])} |")
  lines += ['', '| kernel shape | grid | first block | runs | core balance | bound | physical '
            'ms | XLA ms |', '| --- | --- | --- | ---: | ---: | --- | ---: | ---: |']
  for r in result['kernels'][:rows]:
    lines.append(
        f"| {r['kernel']} | {'x'.join(map(str, r['grid']))} | "
        f"{'x'.join(map(str, r['first_block']))} | {r['runs']} | {r['balance']:.2f} | "
        f"{r['bound']} | {ms(r['seconds'])} | {ms(r['xla_seconds'])} |")
  if len(result['kernels']) > rows:
    rest = result['kernels'][rows:]
    lines.append(f'| {len(rest)} more | | | | | | {ms(sum(r["seconds"] for r in rest))} | '
                 f'{ms(sum(r["xla_seconds"] for r in rest))} |')
  if result['unknown_loops']:
    lines.append(f"\n{result['unknown_loops']} loops of unknown trip count were counted once.")
  return '\n'.join(lines)
