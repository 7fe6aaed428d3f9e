"""Parameter counts and multiply-accumulates of RMT variants, measured from the computation.

    python -m rmt_jax.summary                      # all four variants at 224x224
    python -m rmt_jax.summary --variants rmt_s --resolution 384

The counts are `rmt_jax.analysis.counting`'s: fvcore's convention, the paper's "FLOPs" column.
"""

import argparse
import sys

from rmt_jax.analysis.counting import count_macs, count_params
from rmt_jax.models import canonical_name, create_model


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variants', nargs='+', default=['rmt_t', 'rmt_s', 'rmt_b', 'rmt_l'])
  parser.add_argument('--resolution', type=int, default=224)
  args = parser.parse_args(argv)
  try:
    names = [canonical_name(v) for v in args.variants]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{"variant":<10}{"params":>14}{"MACs":>18}{"GFLOPs (MACs/2^30)":>22}'
        f'   at {args.resolution}x{args.resolution}')
  for name in names:
    model = create_model(name)
    params, macs = count_params(model, args.resolution), count_macs(model, args.resolution)
    print(f'{name:<10}{params:>14,}{macs:>18,}{macs / 2**30:>22.2f}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
