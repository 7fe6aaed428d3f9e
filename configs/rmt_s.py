"""RMT-S on ImageNet-1k, the official recipe (see configs/common.py).

Run (one host; every host of a pod runs the same command):
  python main.py --config configs/rmt_s.py --workdir gs://BUCKET/rmt_s \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  return common.get_config('rmt_s')
