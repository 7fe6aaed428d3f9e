"""`python -m benchmarks.first_call`: how long a new user waits for a model, in a fresh process.

  python -m benchmarks.first_call [--variant rmt_s] [--batch 1] [--resolution 224] [--jit]

Times, in this process and on this host's backend, the README's first example: `create_model`,
the first `model.init(key, images)` and the first `model.apply(variables, images)` (each
including its tracing and compiling), then a second `apply` (the compiled program alone). With
`--jit`, `jax.jit(model.init)` and `jax.jit(model.apply)` instead, as training code calls them.
Run it in a fresh process: jax caches compiled programs within one.
"""

import sys
import time

from absl import flags
import jax
import jax.numpy as jnp

PROGRAM = 'python -m benchmarks.first_call'


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('variant', 'rmt_s', 'the variant to create', flag_values=flag_values)
  flags.DEFINE_integer('batch', 1, 'images per call', flag_values=flag_values)
  flags.DEFINE_integer('resolution', 224, 'input height and width', flag_values=flag_values)
  flags.DEFINE_boolean('jit', False, 'jax.jit(model.init) and jax.jit(model.apply)',
                       flag_values=flag_values)


def main(argv: list[str] | None = None) -> int:
  """Times the first calls and prints one line; returns the exit status."""
  start = time.perf_counter()
  # Imported here: the command line's module imports rmt_jax, whose import is timed (parsing
  # the flags adds well under a millisecond to it).
  from rmt_jax.runtime import command_line  # pylint: disable=g-import-not-at-top
  options = flags.FlagValues()
  _define_flags(options)
  command_line.parse(options, argv, program=PROGRAM, doc=__doc__)
  import rmt_jax  # pylint: disable=g-import-not-at-top
  model = rmt_jax.create_model(options.variant)
  created = time.perf_counter() - start
  images = jnp.zeros((options.batch, options.resolution, options.resolution, 3), jnp.float32)
  init = jax.jit(model.init) if options.jit else model.init
  apply = jax.jit(model.apply) if options.jit else model.apply

  def timed(fn, *a):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*a))
    return out, time.perf_counter() - start

  variables, init_s = timed(init, jax.random.PRNGKey(0), images)
  _, apply_s = timed(apply, variables, images)
  _, again_s = timed(apply, variables, images)
  how = 'jax.jit(model.init / model.apply)' if options.jit else 'model.init / model.apply'
  print(f'{options.variant}, {options.batch}x{options.resolution}x{options.resolution}, {how}, '
        f'{jax.default_backend()}: import + create_model {created:.1f} s, first init '
        f'{init_s:.1f} s, first apply {apply_s:.1f} s (init + apply {init_s + apply_s:.1f} s), '
        f'second apply {again_s:.2f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
