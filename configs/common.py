"""The official RMT ImageNet-1k recipe as an ml_collections config; the variant files use it.

Every field can be overridden on the command line, e.g.
  python main.py --config configs/rmt_s.py --workdir DIR --config.global_batch_size=1024 \
      --config.data.data_dir=gs://bucket/tfds --config.mesh.fsdp=4

The recipe (qhfan/RMT `classfication_release/main.py`, DeiT's training script) is 300 epochs at
global batch 2048 with AdamW (lr 5e-4 x batch / 512, weight decay 0.05), 5 warmup epochs from
1e-6, cosine to 1e-5 (per step here; per epoch, as the official loop, with
`--config.lr_schedule_per_epoch=True`), RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
Mixup 0.8 / CutMix 1.0, label smoothing 0.1, repeated augmentation (3), EMA 0.99996 (per batch
512), SyncBatchNorm. `config.data` is documented in `rmt_jax/data/config.py`.
"""

import ml_collections

# The data fields' defaults, not the pipeline: reading a config imports no TensorFlow.
from rmt_jax.data import config as data_config

# Stochastic depth of the official factories (RMT_T3, RMT_S, RMT_M2, RMT_L6).
DROP_PATH = {'rmt_t': 0.1, 'rmt_s': 0.15, 'rmt_b': 0.4, 'rmt_l': 0.5}


def get_config(variant: str = 'rmt_s') -> ml_collections.ConfigDict:
  """The official recipe for `variant` ('rmt_t', 'rmt_s', 'rmt_b', 'rmt_l')."""
  c = ml_collections.ConfigDict()
  # What the run learns: 'classification', or 'segmentation' (configs/segmentation_demo.py).
  c.task = 'classification'
  c.model = variant
  c.num_classes = 1000
  c.drop_path_rate = DROP_PATH.get(variant, -1.0)  # < 0: the variant table's value.
  c.model_overrides = ml_collections.ConfigDict()  # Any other create_model field.
  c.dtype = 'bfloat16'  # Compute dtype; parameters, norms and softmax stay float32.
  # The residual stream between and through the blocks: float32 as in the official AMP recipe;
  # 'bfloat16' moves half the bytes (faster on TPUs) but rounds every residual add (RMT's
  # `residual_dtype`: not the official numerics).
  c.residual_dtype = 'float32'
  c.remat = (False, False, False, False)  # Rematerialise each stage's blocks (saves memory).
  # Forms of the backend-specific operations: 'auto' = those for the mesh's devices; 'xla' or
  # 'cpu' force one (rmt_jax/kernels/selection.py). The function is the same either way.
  c.kernels = 'auto'
  c.prng_impl = ''  # '' = JAX's default; 'rbg' compiles faster on CPU.
  c.compilation_cache_dir = ''  # E.g. gs://BUCKET/jax_cache: restarts skip compilation.

  c.data = data_config.default_config()
  # One number of classes for the head and the targets.
  c.data.num_classes = c.get_ref('num_classes')
  # The ImageNet variants finish the recipe in the train step (flip, RandAugment, normalisation,
  # erasing, Mixup/CutMix: rmt_jax/train/device_augment.py); the host only decodes and crops, at
  # 2.5x the images per CPU-second of doing it all (docs/input_pipeline_speed.md). 'host' does it
  # all in tf.data.
  c.data.augment_on = 'device' if variant in DROP_PATH else 'host'

  c.seed = 0
  c.global_batch_size = 2048  # Official: 128 per GPU x 16 GPUs.
  c.eval_batch_size = 1024
  c.num_epochs = 300
  c.total_steps = -1  # > 0 stops after that many steps (tests, smoke runs).
  c.grad_accum_steps = 1  # Micro-batches per step (see rmt_jax.train.steps.train_step).
  c.grad_clip_norm = 0.0  # Official: no clipping (--clip-grad None); > 0 clips.

  # AdamW; lr = base_lr x global_batch_size / 512.
  c.base_lr = 5e-4
  c.warmup_epochs = 5
  c.warmup_lr = 1e-6
  c.min_lr = 1e-5
  # False: the warmup + cosine curve per step. True: per epoch, lagging one epoch, exactly as the
  # official loop steps timm's scheduler (see rmt_jax.train.optim.learning_rate_schedule).
  c.lr_schedule_per_epoch = False
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.05
  # timm decays the official (1, 1, 1, C) layer-scale gammas; see optim.weight_decay_mask.
  c.decay_layer_scale = True
  c.ema_decay = 0.99996  # Per step at batch 512; scaled to the global batch. 0 disables.

  # Devices: mesh.data x mesh.fsdp = all devices (-1 = the rest); see rmt_jax/train/sharding.py.
  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  c.fsdp_min_size = 2**14  # Smaller arrays stay replicated when mesh.fsdp > 1.

  c.log_every_steps = 100
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 1000
  c.checkpoint_every_epoch = True
  c.max_to_keep = 3
  c.async_checkpoints = True

  # Fine-tuning / evaluation from converted PyTorch weights or another run's workdir.
  c.init_from = ''
  c.init_reinit_head = False  # True: fresh head even when the shapes match.
  c.eval_only = False  # Evaluate init_from over the whole eval split, then stop.
  # Eval-only's image size, crop_pct, interpolation, mean and std: 'weights' = those stored
  # with init_from (config.data's where it stores none); 'config' = config.data's.
  c.eval_only_preprocessing = 'weights'
  return c
