"""Where a compiled TPU program's memory traffic goes, by layer of the model: `traffic`.

XLA's TPU cost model (`compiled.cost_analysis()`) gives one number per program. For RMT's
steps that estimate is bound by memory traffic: `optimal_seconds` is the program's
`bytes accessed` at ~2.34 TB/s on v5p (85% of its 2.765 TB/s), with the FLOPs far below the
MXU's rate. To see which layers move those bytes, this module reads the compiled program's HLO
(`compiled.as_text()`), the program the chip would run after fusion, layout assignment and
memory-space assignment, and counts for every top-level operation its operands read and its
results written, at their size in memory (the TPU's (8, 128) tiles pad the two minor axes). It
attributes each operation to the model layer that produced it (the `op_name` metadata: flax
module path, and `transpose(...)` for the backward pass) and groups:

- by part of a block, summed over stages (`retention/lepe`, `ffn/fc1`, the Pallas attention
  kernel, ...), and by stage;
- XLA's copies between HBM and on-chip VMEM (`copy-start`: memory-space assignment prefetching
  an operand for a later operation) on the "(prefetch)" line of the layer whose operation
  reads the copy (on a line of their own where none does): the cost model counts their bytes,
  and the consumer's read from VMEM again; copies that change an array's layout (`copy`,
  `transpose`) on their layer's "(layout copies)" line.

This is an accounting of the program's array traffic, not XLA's own per-operation cost (which
it does not expose): XLA counts a convolution's input once per window row, for example, so its
total is higher; both totals are printed.
"""

import collections
import dataclasses
import re
from typing import Any, Iterable

# Bytes per element of HLO element types.
_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4,
             's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
_ARRAY = re.compile(r'\b(' + '|'.join(_ITEMSIZE) + r')\[([\d,]*)\](?:\{([^}]*)\})?')
_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z\-]*)\((.*)$')
# Instructions that move no data (views, tuples, async halves whose start is counted).
_FREE = {'bitcast', 'get-tuple-element', 'tuple', 'parameter', 'constant', 'copy-done',
         'after-all', 'partition-id', 'replica-id', 'opt-barrier'}
_PREFETCH = 'XLA copies between HBM and VMEM (copy-start)'
_OUTSIDE = 'outside the model (loss, optimizer, EMA)'


@dataclasses.dataclass(frozen=True)
class Operation:
  """One top-level operation of a compiled program.

  Attributes:
    name: the HLO instruction's name.
    kind: its opcode (fusion, custom-call, copy, copy-start, convolution, ...).
    layer: the model layer it belongs to: a module path below the block
      ('retention/lepe', 'ffn/fc1', 'pos', ...) or a module outside blocks ('patch_embed',
      'downsample', 'pooled', 'head'); `_OUTSIDE` for the loss and optimizer; for copies, the
      layer of the array copied.
    stage: 1-4 for operations in a stage, else 0.
    backward: part of the backward pass (`transpose(...)` in its op_name).
    bytes: operands read plus results written, at tiled size.
    vmem_bytes: the part of `bytes` in arrays placed in VMEM (memory space 1).
    declared: a Pallas kernel's declared cost (flops, transcendentals, bytes_accessed), else None.
  """
  name: str
  kind: str
  layer: str
  stage: int
  backward: bool
  bytes: int
  vmem_bytes: int
  declared: dict[str, int] | None = None


def _array_bytes(element_type: str, dims: str, layout: str | None) -> tuple[int, bool]:
  """(bytes at tiled size, placed in VMEM) of one HLO array shape."""
  shape = [int(d) for d in dims.split(',') if d]
  vmem = False
  if layout:
    minor_to_major, _, tiling = layout.partition(':')
    order = [int(d) for d in minor_to_major.split(',') if d]
    vmem = 'S(1)' in tiling
    tile = re.match(r'T\(([\d,]+)\)', tiling)
    if tile and order:
      # The first tile covers the most-minor axes: e.g. T(8,128) pads them to 8 and 128.
      for axis, size in zip(order, reversed([int(t) for t in tile.group(1).split(',')])):
        shape[axis] = -(-shape[axis] // size) * size
  elements = 1
  for d in shape:
    elements *= d
  return elements * _ITEMSIZE[element_type], vmem


def _shape_bytes(shape: str) -> tuple[int, int]:
  """(all bytes, VMEM bytes) of an HLO shape (an array or a tuple of arrays)."""
  total = vmem = 0
  for element_type, dims, layout in _ARRAY.findall(shape):
    size, in_vmem = _array_bytes(element_type, dims, layout or None)
    total += size
    vmem += size if in_vmem else 0
  return total, vmem


def _layer(op_name: str) -> tuple[str, int]:
  """(layer, stage) from an op_name such as 'jit(f)/transpose(jvp(RMT))/RMT.features/layers_2/
  blocks_5/retention/lepe/conv_general_dilated', or of a block compiled alone,
  'jit(step)/jvp(RetBlock)/retention/lepe/...' (stage 0)."""
  parts = [p for p in op_name.split('/') if p]
  # Not module names: the features scope, nested jits, platform_dependent's branches, kernels.
  skipped = ('RMT.features', 'jit(', 'cond', 'branch_', 'pallas_call', 'shard_map')
  model = [i for i, p in enumerate(parts) if p.startswith('RMT.') or p == 'head']
  block = [i for i, p in enumerate(parts) if p.rstrip(')').endswith('RetBlock')]
  if not model and block:  # a block of its own (`tpu_compile --block`): its parts, no stage
    path = [p for p in parts[block[0] + 1:-1] if not p.startswith(skipped)]
    if path and path[0].startswith('Dropout'):
      path = ['drop path']
    return '/'.join(path[:2]) or 'block (other)', 0
  if not model:
    return _OUTSIDE, 0
  path = parts[model[0]:-1] if parts[model[0]] != 'head' else ['head']
  path = [p[len('RMT.'):] if p == 'RMT.pooled' else p for p in path
          if not p.startswith(skipped)]
  stage = 0
  if path and path[0].startswith('layers_'):
    stage = int(path[0].split('_')[1]) + 1
    path = path[1:]
    if path and path[0].startswith('blocks_'):
      path = path[1:]
  if path and path[0].startswith('Dropout'):
    path = ['drop path']
  # Two module levels name a block's part ('retention/lepe', 'ffn/fc1'); one level the others.
  return '/'.join(path[:2] if stage and path[:1] != ['downsample'] else path[:1]) or (
      'model (other)'), stage


def operations(hlo_text: str) -> list[Operation]:
  """The top-level operations of a compiled program's entry computation, with their traffic.

  Args:
    hlo_text: `compiled.as_text()` of a program compiled for TPU.

  Raises:
    ValueError: the text has no ENTRY computation, or has loops (their bodies run an unknown
      number of times, which this accounting does not model).
  """
  start = hlo_text.find('\nENTRY ')
  if start < 0:
    raise ValueError('no ENTRY computation in the HLO text')
  entry = hlo_text[start:]
  entry = entry[:entry.find('\n}\n') + 1 or len(entry)]
  shapes: dict[str, str] = {}
  sources: dict[str, str] = {}  # instruction -> the op_name of the data it holds
  readers: dict[str, list[str]] = collections.defaultdict(list)  # instruction -> its readers
  kinds: dict[str, str] = {}
  result = []
  for line in entry.split('\n')[1:]:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, kind, rest = match.groups()
    if kind == 'while':
      raise ValueError('the program has a while loop; its traffic per iteration is unknown')
    shapes[name] = shape
    operands = re.findall(r'%([\w.\-]+)', rest.split('), ')[0])
    op_name = re.search(r'op_name="([^"]*)"', line)
    op_name = op_name.group(1) if op_name else next(
        (sources[o] for o in operands if o in sources), '')
    sources[name], kinds[name] = op_name, kind
    for operand in operands:
      readers[operand].append(name)
    if kind in _FREE:
      continue
    written, written_vmem = _shape_bytes(shape)
    read = read_vmem = 0
    for operand in operands:
      if operand in shapes:
        size, vmem = _shape_bytes(shapes[operand])
        read, read_vmem = read + size, read_vmem + vmem
    layer, stage = _layer(op_name)
    if kind == 'copy-start':
      layer = _PREFETCH
    elif kind in ('copy', 'transpose'):
      layer = f'{layer} (layout copies)'
    declared = None
    cost = re.search(r'"cost_estimate":\{([^}]*)\}', line)
    if kind == 'custom-call' and cost:
      declared = {k: int(v) for k, v in re.findall(r'"(\w+)":"(\d+)"', cost.group(1))}
      layer = f'{layer} (Pallas kernel)'
    result.append(Operation(name, kind, layer, stage, 'transpose(' in op_name, read + written,
                            read_vmem + written_vmem, declared))
  return [_to_reader(op, readers, kinds, sources) if op.kind == 'copy-start' else op
          for op in result]


def _to_reader(prefetch: Operation, readers: dict[str, list[str]], kinds: dict[str, str],
               op_names: dict[str, str]) -> Operation:
  """A `copy-start` attributed to the first operation that reads its copy (through its
  `copy-done` and any views): that layer's "(prefetch)" line, stage and pass."""
  pending, seen = list(readers.get(prefetch.name, ())), set()
  while pending:
    name = pending.pop(0)
    if name in seen:
      continue
    seen.add(name)
    if kinds[name] in _FREE or kinds[name] == 'copy-start':
      pending.extend(readers.get(name, ()))
      continue
    layer, stage = _layer(op_names[name])
    return dataclasses.replace(prefetch, layer=f'{layer} (prefetch)', stage=stage,
                               backward='transpose(' in op_names[name])
  return prefetch


def summarize(ops: Iterable[Operation]) -> dict[str, Any]:
  """Bytes by layer and by stage, each split into forward and backward (JSON-ready)."""
  by_layer = collections.defaultdict(lambda: [0, 0])
  by_stage = collections.defaultdict(lambda: [0, 0])
  total = vmem = 0
  for op in ops:
    by_layer[op.layer][op.backward] += op.bytes
    by_stage[op.stage][op.backward] += op.bytes
    total, vmem = total + op.bytes, vmem + op.vmem_bytes
  order = lambda item: -sum(item[1])  # pylint: disable=unnecessary-lambda-assignment
  return {
      'bytes': total, 'vmem_bytes': vmem,
      'by_layer': [{'layer': k, 'forward_bytes': f, 'backward_bytes': b}
                   for k, (f, b) in sorted(by_layer.items(), key=order)],
      'by_stage': [{'stage': k, 'forward_bytes': f, 'backward_bytes': b}
                   for k, (f, b) in sorted(by_stage.items())]}


def traffic(compiled: Any) -> dict[str, Any]:
  """`summarize(operations(compiled.as_text()))` for a compiled jax program."""
  return summarize(operations(compiled.as_text()))


def format_summary(summary: dict[str, Any], xla_bytes: float | None = None,
                   rows: int = 20) -> str:
  """The summary as two Markdown tables (layers, then stages), in GB (1e9 bytes)."""
  total = summary['bytes']
  gb = lambda n: f'{n / 1e9:.2f}'  # pylint: disable=unnecessary-lambda-assignment
  head = (f'Array traffic of the compiled program, per device: {gb(total)} GB read and written '
          f"by its top-level operations ({gb(summary['vmem_bytes'])} GB of it in VMEM)")
  if xla_bytes:
    head += f"; XLA's cost model counts {gb(xla_bytes)} GB"
  lines = [head + '.', '', '| layer | forward GB | backward GB | share |',
           '| --- | ---: | ---: | ---: |']
  layers = summary['by_layer']
  for row in layers[:rows]:
    both = row['forward_bytes'] + row['backward_bytes']
    lines.append(f"| {row['layer']} | {gb(row['forward_bytes'])} | {gb(row['backward_bytes'])} "
                 f"| {100 * both / total:.1f}% |")
  if len(layers) > rows:
    rest = sum(r['forward_bytes'] + r['backward_bytes'] for r in layers[rows:])
    lines.append(f'| {len(layers) - rows} more | | | {100 * rest / total:.1f}% |')
  lines += ['', '| stage | forward GB | backward GB | share |', '| --- | ---: | ---: | ---: |']
  for row in summary['by_stage']:
    both = row['forward_bytes'] + row['backward_bytes']
    name = f"stage {row['stage']}" if row['stage'] else 'outside stages'
    lines.append(f"| {name} | {gb(row['forward_bytes'])} | {gb(row['backward_bytes'])} | "
                 f"{100 * both / total:.1f}% |")
  return '\n'.join(lines)
