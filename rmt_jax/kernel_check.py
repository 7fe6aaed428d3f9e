"""`python -m rmt_jax.kernel_check`: check the TPU kernels a run would use, on this device.

    python -m rmt_jax.kernel_check --config configs/rmt_s.py [--batch_per_chip 64] \
        [--workdir DIR] [--config.FIELD=VALUE ...]

Builds the config's network, records every Pallas kernel its train step would call at that
batch per chip (the stages' shapes, the config's dtype; with `data.augment_on='device'`, the
augmentation's warp too), and runs each forward and backward against its plain form on the
default device: values compared (the interpreter tests' tolerances), both timed. Prints one line
per kernel as it goes and then the table (operation, per-image shape, dtype, each form's error
from the reference, ms per form, the form chosen);
a kernel that fails to lower, compile or run, or is wrong, is dropped with one warning line.
With `--workdir`, the results are cached there as a training run caches them
(`kernel_check.json`). The first thing to run on a new chip or jax version; on a CPU host the
kernels run in Pallas's interpreter (the values are checked, the times say nothing of a TPU).
"""

import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from rmt_jax.kernels import check
from rmt_jax.runtime import console
from rmt_jax.train import device_augment
from rmt_jax.train import kernel_check
from rmt_jax.train import steps

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A run config, as main.py takes.',
                                          lock_config=True)
_BATCH_PER_CHIP = flags.DEFINE_integer(
    'batch_per_chip', None, "Images per device (default: the config's global_batch_size split over "
    'the devices).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Cache the results here, as a run does.')
flags.mark_flag_as_required('config')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return 2
  console.quiet_startup(import_tensorflow=False)
  config = _CONFIG.value
  batch = _BATCH_PER_CHIP.value or max(1, config.global_batch_size // jax.device_count())
  model = steps.build_model(config)
  results = kernel_check.check_model(
      model, batch, config.data.image_size, _WORKDIR.value,
      augment=device_augment.DeviceAugment.for_run(config, None))
  print('\n' + check.table(results))
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
