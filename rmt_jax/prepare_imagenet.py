r"""Prepares TFDS `imagenet2012` from the two ImageNet release tars (run once).

Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into MANUAL_DIR, then:

  python -m rmt_jax.prepare_imagenet --data_dir=$HOME/tensorflow_datasets \
      --manual_dir=$HOME/imagenet_tars

This runs TFDS's own `imagenet2012` builder (what `tfds build imagenet2012` does, without
the Apache Beam dependency of the `tfds` command), writing TFRecord shards under
DATA_DIR/imagenet2012/<version>/. It takes a few hours and ~150 GB.
"""

import os

# Before TensorFlow starts: its informational start-up notices off
# (RMT_JAX_VERBOSE_STARTUP=1 brings them back).
from rmt_jax.runtime import console  # pylint: disable=g-bad-import-order

console.quiet_startup()

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from rmt_jax.data import sources as data_sources  # pylint: disable=g-import-not-at-top

_DATA_DIR = flags.DEFINE_string(
    'data_dir', '', 'TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets if empty).')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', '', 'Folder holding the ImageNet tars (<data_dir>/downloads/manual if empty).')
_DATASET = flags.DEFINE_string('dataset', 'imagenet2012', 'TFDS dataset name.')


def prepare(data_dir: str = '', manual_dir: str = '', name: str = 'imagenet2012') -> str:
  """Builds the TFDS dataset from the tars in `manual_dir`; returns the prepared folder.

  Raises:
    DataNotFoundError: neither tar is in `manual_dir`.
  """
  data_dir, manual_dir = data_sources.resolve_tfds_dirs(data_dir, manual_dir)
  tars = [os.path.join(manual_dir, t) for t in (data_sources.TRAIN_TAR, data_sources.VAL_TAR)]
  if not any(tf.io.gfile.exists(t) for t in tars):
    raise data_sources.DataNotFoundError(
        data_sources.imagenet_not_found_message(name, data_dir, manual_dir))
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  return builder.data_dir


def main(argv):
  del argv
  tf.config.set_visible_devices([], 'GPU')
  try:
    path = prepare(_DATA_DIR.value, _MANUAL_DIR.value, _DATASET.value)
  except data_sources.DataNotFoundError as e:
    raise SystemExit(str(e)) from None
  print(f'Prepared {_DATASET.value} in {path}')


if __name__ == '__main__':
  app.run(main)
