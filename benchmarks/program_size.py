"""`python -m benchmarks.program_size`: how big a forward pass's program is, and what compiling it
costs, at a given input size.

  python -m benchmarks.program_size --variant rmt_s --resolution 1024 [--kernels xla|cpu]

Prints the size of the lowered StableHLO text, of the constants embedded in it, the compile time
and the process's peak resident memory before and after compiling (on this host's backend). A
program that embeds a table of size (H*W)^2 (the whole-attention decay, before it was computed
from iotas inside the program) shows it here.
"""

import re
import resource
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp

from rmt_jax.models import create_model
from rmt_jax.runtime import command_line

PROGRAM = 'python -m benchmarks.program_size'

_DENSE = re.compile(r'dense<"0x([0-9A-Fa-f]+)">')


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(variant: str, resolution: int, kernels: str = 'auto', batch: int = 1) -> dict:
  """Lowers and compiles `variant`'s forward pass at resolution x resolution.

  Returns:
    {'hlo_text_bytes', 'embedded_constant_bytes', 'lower_seconds', 'compile_seconds',
     'peak_rss_before_compile', 'peak_rss_after_compile'}.
  """
  model = create_model(variant, kernels=kernels)
  images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  start = time.perf_counter()
  lowered = jax.jit(model.apply).lower(variables, images)
  text = lowered.as_text()
  lowered_s = time.perf_counter() - start
  before = _peak_rss_bytes()
  start = time.perf_counter()
  lowered.compile()
  return {'hlo_text_bytes': len(text),
          # Hex-encoded dense constants: two characters a byte.
          'embedded_constant_bytes': sum(len(m) // 2 for m in _DENSE.findall(text)),
          'lower_seconds': lowered_s, 'compile_seconds': time.perf_counter() - start,
          'peak_rss_before_compile': before, 'peak_rss_after_compile': _peak_rss_bytes()}


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('variant', 'rmt_s', 'the variant to compile', flag_values=flag_values)
  flags.DEFINE_integer('resolution', 1024, 'input height and width', flag_values=flag_values)
  flags.DEFINE_enum('kernels', 'auto', ['auto', 'xla', 'cpu'], "the model's kernel forms",
                    flag_values=flag_values)


def main(argv: list[str] | None = None) -> int:
  """Measures and prints one line; returns the exit status."""
  options = flags.FlagValues()
  _define_flags(options)
  command_line.parse(options, argv, program=PROGRAM, doc=__doc__)
  r = measure(options.variant, options.resolution, options.kernels)
  mib = lambda n: f'{n / 2**20:.1f} MiB'  # pylint: disable=unnecessary-lambda-assignment
  print(f'{options.variant} forward at {options.resolution}x{options.resolution}, kernels '
        f'{options.kernels!r}, {jax.default_backend()}: StableHLO text {mib(r["hlo_text_bytes"])} '
        f'(embedded constants {mib(r["embedded_constant_bytes"])}), lowered in '
        f'{r["lower_seconds"]:.1f} s, compiled in {r["compile_seconds"]:.1f} s; peak RSS '
        f'{mib(r["peak_rss_before_compile"])} before compiling, '
        f'{mib(r["peak_rss_after_compile"])} after')
  return 0


if __name__ == '__main__':
  sys.exit(main())
