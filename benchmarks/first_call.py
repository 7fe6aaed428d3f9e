"""`python -m benchmarks.first_call`: how long a new user waits for a model, in a fresh process.

  python -m benchmarks.first_call [--variant rmt_s] [--batch 1] [--resolution 224] [--jit]

Times, in this process and on this host's backend, the README's first example: `create_model`,
the first `model.init(key, images)` and the first `model.apply(variables, images)` (each
including its tracing and compiling), then a second `apply` (the compiled program alone). With
`--jit`, `jax.jit(model.init)` and `jax.jit(model.apply)` instead, as training code calls them.
Run it in a fresh process: jax caches compiled programs within one.
"""

import argparse
import time

import jax
import jax.numpy as jnp


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='rmt_s')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--jit', action='store_true',
                      help='jax.jit(model.init) and jax.jit(model.apply)')
  args = parser.parse_args()

  start = time.perf_counter()
  import rmt_jax  # pylint: disable=g-import-not-at-top
  model = rmt_jax.create_model(args.variant)
  created = time.perf_counter() - start
  images = jnp.zeros((args.batch, args.resolution, args.resolution, 3), jnp.float32)
  init = jax.jit(model.init) if args.jit else model.init
  apply = jax.jit(model.apply) if args.jit else model.apply

  def timed(fn, *a):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*a))
    return out, time.perf_counter() - start

  variables, init_s = timed(init, jax.random.PRNGKey(0), images)
  _, apply_s = timed(apply, variables, images)
  _, again_s = timed(apply, variables, images)
  how = 'jax.jit(model.init / model.apply)' if args.jit else 'model.init / model.apply'
  print(f'{args.variant}, {args.batch}x{args.resolution}x{args.resolution}, {how}, '
        f'{jax.default_backend()}: import + create_model {created:.1f} s, first init '
        f'{init_s:.1f} s, first apply {apply_s:.1f} s (init + apply {init_s + apply_s:.1f} s), '
        f'second apply {again_s:.2f} s')


if __name__ == '__main__':
  main()
