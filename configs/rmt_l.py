"""RMT-L on ImageNet-1k, the official recipe (see configs/common.py).

Run (one host; every host of a pod runs the same command):
  python main.py --config configs/rmt_l.py --workdir gs://BUCKET/rmt_l \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets

On chips with little memory, shard the parameters and optimizer state over the data-parallel
devices (FSDP) with --config.mesh.data=1 --config.mesh.fsdp=-1, rematerialise the deep stage
with --config.remat='(False,False,True,False)', or accumulate gradients over micro-batches
with --config.grad_accum_steps=2.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  return common.get_config('rmt_l')
