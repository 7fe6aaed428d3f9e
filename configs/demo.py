"""The offline demo: a tiny RMT on scikit-learn's handwritten digits, through the same input
pipeline, train step, sharding, checkpoints and evaluation as the ImageNet configs.

Run (needs only the installed packages; the digits ship inside scikit-learn):
  python main.py --config configs/demo.py --workdir /tmp/rmt_demo

The 1,797 8x8 digits are written once as 32x32 PNGs (80% train, a fixed stratified 20%
held out). On 2 CPU cores it reaches 99.2% held-out top-1 (raw and EMA weights) in about
2.5 minutes, compilation included (30 epochs of 22 steps); >= 90% from epoch 4. Running the
command again resumes (or, when finished, only evaluates).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.get_config('rmt_tiny')
  c.num_classes = 10
  c.drop_path_rate = 0.0
  c.dtype = 'float32'
  c.prng_impl = 'rbg'  # XLA:CPU compiles it in a fraction of threefry's time.

  d = c.data
  d.dataset = 'digits'
  d.image_size = 32
  d.crop_pct = 1.0  # The PNGs are 32x32 already: no border to crop.
  d.interpolation = 'bilinear'
  d.rrc_scale = (0.5, 1.0)  # Light augmentation: a digit must stay recognisable.
  d.hflip = 0.0  # Mirrored digits are other digits (or none).
  d.randaugment = ''
  d.reprob = 0.0
  d.mixup = 0.0
  d.cutmix = 0.0
  d.label_smoothing = 0.1
  d.repeated_aug = False
  d.shuffle_buffer = 2048
  d.num_parallel_calls = 2
  d.device_prefetch = 1

  c.global_batch_size = 64
  c.eval_batch_size = 120
  c.num_epochs = 30
  c.base_lr = 2e-3 * 512 / 64  # lr 2e-3 at batch 64: a short run wants a large step.
  c.warmup_epochs = 2
  c.min_lr = 1e-5
  # 0.99 per step at batch 64 (a horizon of ~4 epochs): a short run cannot wait for the
  # official horizon of ~10 epochs of ImageNet.
  c.ema_decay = 0.99 ** (512 / 64)
  c.log_every_steps = 22
  c.checkpoint_every_steps = 10_000  # Each epoch (checkpoint_every_epoch) is enough.
  c.max_to_keep = 2
  return c
