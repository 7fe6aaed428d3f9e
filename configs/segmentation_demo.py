"""The offline dense-prediction demo: RMT's backbone under a Semantic FPN head, segmenting
mosaics of scikit-learn's digits, through the same loop, sharding, optimizer, EMA, checkpoints
and metrics as the classification configs.

Run (needs only the installed packages; the digits ship inside scikit-learn):
  python main.py --config configs/segmentation_demo.py --workdir /tmp/rmt_seg_demo

Each 64x64 mosaic holds 1-3 digits of 20-32 px, labelled per pixel (background + ten digits,
`rmt_jax/data/mosaics.py`); 256 fixed held-out mosaics are made from the held-out 20% of the
digits. `DIR/metrics.jsonl` gets the held-out `miou`, each class's IoU and the pixel accuracy
for the raw and EMA weights; `DIR/segmentation_samples.png` shows held-out mosaics, their
ground truth and the prediction. On a 2-core VM shared with other jobs it reached a held-out
mIoU of 0.761 in 9.5 minutes, compilation included (docs/segmentation.md). Running the command
again resumes (or, when finished, only evaluates). `configs/segmentation_demo.py:tiny` is the
tests' miniature.
"""

import ml_collections

from configs import common


def get_config(size: str = 'demo') -> ml_collections.ConfigDict:
  """'demo': the figure of docs/segmentation.md; 'tiny': a few steps at 32x32 for the tests."""
  c = common.get_config('rmt_tiny')
  c.task = 'segmentation'
  c.num_classes = 11  # Background + the ten digits.
  c.drop_path_rate = 0.05
  c.norm_eval = False  # From scratch, the stem's BatchNorms learn their statistics.
  c.remat = (False, False, False, False)
  c.dtype = 'float32'
  c.prng_impl = 'rbg'  # XLA:CPU compiles it in a fraction of threefry's time.
  # The Semantic FPN head (rmt_jax/models/dense_heads.py); mmseg's ADE20K widths are 256 / 128.
  c.head = ml_collections.ConfigDict(dict(channels=64, head_channels=64, norm_groups=8))

  d = c.data
  d.dataset = 'digit_mosaics'
  d.image_size = 64  # The canvas.
  d.mosaic = ml_collections.ConfigDict(dict(
      digits=(1, 3), digit_size=(20, 32), ink_threshold=0.5, gap=1,
      eval_mosaics=256, mosaics_per_epoch=1024))

  # Small batches, many steps: the digits' classes are learned after a number of steps more
  # than of images (batch 8 and 16 both leave the background-only plateau after ~500).
  c.global_batch_size = 8
  c.eval_batch_size = 64
  c.num_epochs = 14  # 1792 steps of 8 mosaics.
  c.base_lr = 2e-3 * 512 / 8  # lr 2e-3 at batch 8.
  c.warmup_epochs = 1
  c.min_lr = 1e-5
  c.weight_decay = 0.05
  c.ema_decay = 0.99 ** (512 / 8)  # 0.99 per step: a horizon of ~100 steps.
  c.log_every_steps = 64
  c.eval_every_epochs = 7
  c.checkpoint_every_steps = 10_000  # Each epoch (checkpoint_every_epoch) is enough.
  c.max_to_keep = 2

  if size == 'tiny':
    c.model_overrides = ml_collections.ConfigDict(dict(
        embed_dims=(8, 16), depths=(1, 1), num_heads=(2, 2), init_values=(2, 2),
        heads_ranges=(4, 4), mlp_ratios=(2, 2), axial=(True, False),
        layerscales=(False, True), out_indices=(0, 1)))
    c.remat = (False, True)
    c.head = ml_collections.ConfigDict(dict(channels=16, head_channels=16, norm_groups=4))
    d.image_size = 32
    d.mosaic.digit_size = (12, 16)
    d.mosaic.digits = (1, 2)
    d.mosaic.eval_mosaics = 10
    d.mosaic.mosaics_per_epoch = 32
    c.global_batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = 12
    c.warmup_epochs = 0
    c.base_lr = 1e-2 * 512 / 8
    c.log_every_steps = 1
    c.eval_every_epochs = 1000  # Only at the end.
    c.checkpoint_every_steps = 6
    c.checkpoint_every_epoch = False
    c.max_to_keep = 5
  elif size != 'demo':
    raise ValueError(f"size must be 'demo' or 'tiny', got {size!r}")
  return c
