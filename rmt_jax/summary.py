"""Parameter counts and multiply-accumulates of RMT variants, measured from the computation.

    python -m rmt_jax.summary                      # all four variants at 224x224
    python -m rmt_jax.summary --variants=rmt_s,rmt_b --resolution=384

The counts are `rmt_jax.analysis.counting`'s: fvcore's convention, the paper's "FLOPs" column.
"""

import sys

from absl import flags

from rmt_jax.analysis.counting import count_macs, count_params
from rmt_jax.models import canonical_name, create_model
from rmt_jax.runtime import command_line

PROGRAM = 'python -m rmt_jax.summary'


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_list('variants', ['rmt_t', 'rmt_s', 'rmt_b', 'rmt_l'],
                    'comma-separated variants, e.g. rmt_s,rmt_b', flag_values=flag_values)
  flags.DEFINE_integer('resolution', 224, 'input height and width', flag_values=flag_values)


def main(argv: list[str] | None = None) -> int:
  """Prints the table; returns the exit status: 2 for an unknown variant (other usage errors
  exit with 2 too)."""
  options = flags.FlagValues()
  _define_flags(options)
  command_line.parse(options, argv, program=PROGRAM, doc=__doc__)
  try:
    names = [canonical_name(v) for v in options.variants]
  except ValueError as e:
    command_line.usage_error(PROGRAM, str(e))
  print(f'{"variant":<10}{"params":>14}{"MACs":>18}{"GFLOPs (MACs/2^30)":>22}'
        f'   at {options.resolution}x{options.resolution}')
  for name in names:
    model = create_model(name)
    params, macs = count_params(model, options.resolution), count_macs(model, options.resolution)
    print(f'{name:<10}{params:>14,}{macs:>18,}{macs / 2**30:>22.2f}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
