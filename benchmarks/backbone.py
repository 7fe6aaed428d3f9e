r"""The detection / segmentation backbone at full resolution: time, peak memory, program size.

  python -m benchmarks.backbone --variant rmt_s --size 800x1344 --mode forward
  python -m benchmarks.backbone --variant rmt_b --size 1024x1024 --mode grad --remat 0,1,2
  python -m benchmarks.backbone --variant rmt_s --size 800x1344 --lower-only

One variant's backbone (`rmt_jax.create_backbone`, the official detection layout), one input
size and batch, one mode per run, so that the process's peak memory is that mode's:
  forward  the jitted eval forward pass, the four maps;
  grad     the gradient of a loss of the four maps with respect to every parameter, in training
           mode (drop path on, BatchNorms frozen: `norm_eval`, the official default), jitted.

Printed: the compiled program's size and what it embeds (the StableHLO text's length, and the
dense constants in it: none grows with the input, the decay and rotary tables being computed
in the program), the compile seconds, the seconds per call (median of `--repeats` after one untimed call), and the
process's peak resident memory (`getrusage` max RSS, compile included) beside XLA's own
estimate of the computation's arguments, outputs and temporaries. `--lower-only` stops after the
program's size (no compile, no run: seconds instead of minutes). Weights are synthetic
(`rmt_jax.bench.synthetic_variables`): time and memory do not depend on their values.
"""

import argparse
import os
import re
import resource
import statistics
import sys
import time
from typing import Any, Callable

if __package__ in (None, ''):  # `python benchmarks/backbone.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from rmt_jax import bench  # pylint: disable=g-import-not-at-top
from rmt_jax.models import RMTBackbone, create_backbone  # pylint: disable=g-import-not-at-top

# A dense constant in StableHLO text: dense<"0xHEX"> : tensor<AxBxf32>, two hex digits a byte.
_CONSTANT = re.compile(r'stablehlo\.constant dense<"0x([0-9A-Fa-f]+)"> : tensor<([^>]*)>')
_MB = 1e6


def embedded_constants(hlo_text: str) -> list[tuple[int, str]]:
  """(bytes, 'AxBxf32') of each dense constant in a lowered program's text, largest first."""
  return sorted(((len(hex_digits) // 2, shape) for hex_digits, shape in
                 _CONSTANT.findall(hlo_text)), reverse=True)


def make_step(backbone: RMTBackbone, mode: str) -> Callable[..., Any]:
  """The function timed: forward (variables, images) -> maps, or grad -> parameter gradients."""
  if mode == 'forward':
    return lambda variables, images: backbone.apply(variables, images)

  def loss(params, batch_stats, images):
    maps = backbone.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                          rngs={'dropout': jax.random.PRNGKey(0)})
    return sum(jnp.mean(jnp.square(m.astype(jnp.float32))) for m in maps)

  grad = jax.grad(loss)
  return lambda variables, images: grad(variables['params'], variables['batch_stats'], images)


def _parse_size(text: str) -> tuple[int, int]:
  height, width = (int(v) for v in text.lower().split('x'))
  return height, width


def run(variant: str, size: tuple[int, int], mode: str, batch: int = 1, repeats: int = 2,
        dtype: str = 'float32', remat: tuple[int, ...] = (), lower_only: bool = False,
        memory_limit_gib: float | None = None) -> dict[str, Any]:
  """Measures one configuration; returns the figures that `main` prints.

  Args:
    variant: 'rmt_s', 'rmt_b', ... (`create_backbone`).
    size: input (height, width).
    mode: 'forward' or 'grad'.
    batch: images per call.
    repeats: timed calls (after one untimed call).
    dtype: compute dtype.
    remat: stages whose blocks are rematerialised in the backward pass.
    lower_only: stop after lowering (program size and constants only).
    memory_limit_gib: do not run when XLA's estimate of the computation exceeds this (on a
      shared host, rather than push neighbours out of memory).
  """
  probe = create_backbone(variant)
  backbone = create_backbone(variant, dtype=jnp.dtype(dtype),
                             remat=tuple(i in remat for i in range(len(probe.depths))))
  variables = bench.synthetic_variables(backbone, jnp.zeros((1, 64, 64, 3), jnp.float32))
  images = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32)
  result: dict[str, Any] = {'variant': variant, 'size': size, 'mode': mode, 'batch': batch,
                            'dtype': dtype, 'remat': remat, 'devices': str(jax.devices()[0]),
                            'cores': os.cpu_count(), 'load': os.getloadavg()}
  start = time.perf_counter()
  lowered = jax.jit(make_step(backbone, mode)).lower(variables, images)
  text = lowered.as_text()
  result['lower_s'] = time.perf_counter() - start
  result['program_bytes'] = len(text)
  result['constants'] = embedded_constants(text)
  del text
  if lower_only:
    return result
  start = time.perf_counter()
  compiled = lowered.compile()
  result['compile_s'] = time.perf_counter() - start
  memory = compiled.memory_analysis()
  if memory is not None:
    result['xla_bytes'] = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                              + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    if memory_limit_gib is not None and result['xla_bytes'] > memory_limit_gib * 2**30:
      result['skipped'] = f'XLA estimates {result["xla_bytes"] / 2**30:.1f} GiB, over the limit'
      return result
  inputs = jnp.asarray(jax.random.normal(jax.random.PRNGKey(1), images.shape), jnp.float32)
  start = time.perf_counter()
  jax.block_until_ready(compiled(variables, inputs))
  result['first_call_s'] = time.perf_counter() - start
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, inputs))
    seconds.append(time.perf_counter() - start)
  result['seconds'] = seconds
  result['peak_rss_bytes'] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                              * (1 if sys.platform == 'darwin' else 1024))
  return result


def format_result(r: dict[str, Any]) -> str:
  """The figures of `run` as the lines the command prints."""
  height, width = r['size']
  remat = f", remat stages {','.join(map(str, r['remat']))}" if r['remat'] else ''
  lines = [f"{r['variant']} backbone, {height}x{width}, batch {r['batch']}, {r['dtype']}, "
           f"{r['mode']}{remat}; {r['devices']}, {r['cores']} cores, load average "
           + ' '.join(f'{x:.1f}' for x in r['load'])]
  constants = r['constants']
  largest = ', '.join(f'{shape} ({n / _MB:.1f} MB)' for n, shape in constants[:3])
  lines.append(f"program: {r['program_bytes'] / _MB:.1f} MB of StableHLO text "
               f"(lowered in {r['lower_s']:.1f} s); {len(constants)} dense constants, "
               f'{sum(n for n, _ in constants) / _MB:.1f} MB, largest: {largest or "none"}')
  if 'skipped' in r:
    lines.append(f"compile: {r['compile_s']:.1f} s; not run: {r['skipped']}")
  elif 'compile_s' in r:
    median = statistics.median(r['seconds']) if r['seconds'] else r['first_call_s']
    lines.append(f"compile: {r['compile_s']:.1f} s; time: {median:.2f} s per call (median of "
                 f"{len(r['seconds'])}; first call {r['first_call_s']:.2f} s)")
    xla = f"; XLA's estimate (arguments + outputs + temporaries) " \
          f"{r['xla_bytes'] / 2**30:.2f} GiB" if 'xla_bytes' in r else ''
    lines.append(f"peak memory: {r['peak_rss_bytes'] / 2**30:.2f} GiB resident (max RSS of the "
                 f'process, compile included){xla}')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m benchmarks.backbone', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--variant', default='rmt_s')
  parser.add_argument('--size', default='800x1344', help='HEIGHTxWIDTH of the input')
  parser.add_argument('--mode', choices=('forward', 'grad'), default='forward')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--remat', default='',
                      help='comma-separated stages whose blocks are rematerialised, e.g. 0,1,2')
  parser.add_argument('--memory-limit-gib', type=float, default=None,
                      help="compile, but do not run if XLA's memory estimate exceeds this")
  parser.add_argument('--lower-only', action='store_true',
                      help='only lower: the program size and its constants')
  args = parser.parse_args(argv)
  remat = tuple(int(s) for s in args.remat.split(',') if s)
  result = run(args.variant, _parse_size(args.size), args.mode, args.batch, args.repeats,
               args.dtype, remat, args.lower_only, args.memory_limit_gib)
  print(format_result(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
