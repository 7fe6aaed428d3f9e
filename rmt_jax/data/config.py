"""`config.data`: the input pipeline's fields and their defaults, with no TensorFlow.

The defaults are the official DeiT/RMT ImageNet-1k recipe (timm's argument names in the
comments). The configs (`configs/common.py`) build their `config.data` here, so that reading a
config imports neither TensorFlow nor the pipeline (`input_pipeline.py`, which reads these
fields).
"""

import ml_collections

from rmt_jax.data import eval_preprocessing


def default_config() -> ml_collections.ConfigDict:
  """`config.data`: the official DeiT/RMT ImageNet-1k recipe (timm arguments in comments)."""
  c = ml_collections.ConfigDict()
  c.dataset = 'imagenet2012'  # 'imagenet2012' (or another TFDS name) | 'folder' | 'digits'
  c.data_dir = ''  # TFDS data_dir; '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.manual_dir = ''  # Holds the ImageNet tars; '' -> <data_dir>/downloads/manual.
  c.folder_root = ''  # For 'folder': <root>/train/<class>/*.JPEG, <root>/val/<class>/...
  c.digits_dir = ''  # For 'digits': where its PNGs are written; '' -> <data_dir>/rmt_digits.
  c.train_split = ''  # '' -> 'train'.
  c.eval_split = ''  # '' -> 'validation' (TFDS) or 'val' (folder, digits).
  c.image_size = 224  # --input-size
  c.num_classes = 1000
  # Eval: resize shorter side to floor(image_size / crop_pct), centre crop image_size.
  c.crop_pct = 0.875  # --eval-crop-ratio
  c.interpolation = 'bicubic'  # --train-interpolation
  # Normalisation (train and eval), as fractions of 255: timm's ImageNet mean and std.
  c.mean = eval_preprocessing.IMAGENET_MEAN
  c.std = eval_preprocessing.IMAGENET_STD
  c.random_resized_crop = True  # False: train images get the eval resize + centre crop.
  c.rrc_scale = (0.08, 1.0)
  c.rrc_ratio = (3 / 4, 4 / 3)
  c.hflip = 0.5  # Probability of a horizontal flip.
  c.randaugment = 'rand-m9-mstd0.5-inc1'  # --aa; '' or 'none' turns it off.
  c.reprob = 0.25  # Random erasing probability; 0 turns it off.
  c.remode = 'pixel'  # 'pixel' | 'rand' | 'const'
  c.re_min_area = 0.02
  c.re_max_area = 1 / 3
  c.re_min_aspect = 0.3
  c.mixup = 0.8  # Mixup Beta alpha; 0 turns Mixup off.
  c.cutmix = 1.0  # CutMix Beta alpha; 0 turns CutMix off.
  c.mixup_prob = 1.0  # Probability that a batch is mixed at all.
  c.mixup_switch_prob = 0.5  # Probability of CutMix rather than Mixup when both are on.
  c.label_smoothing = 0.1  # --smoothing
  # Where flip, RandAugment, normalisation, random erasing and Mixup/CutMix run: 'host'
  # (tf.data yields finished float32 batches) or 'device' (tf.data yields the uint8 crops and
  # int labels; the compiled train step calls `rmt_jax.data.batch_augment.augment`).
  c.augment_on = 'host'
  c.repeated_aug = True  # --repeated-aug: each image num_repeats times per epoch.
  c.num_repeats = 3
  c.shuffle_buffer = 16_384  # TFDS records; folder sources shuffle the whole list exactly.
  c.shuffle_cycle_length = 16  # TFDS shards read in parallel.
  c.num_parallel_calls = -1  # Decode/augment threads; -1 = tf.data AUTOTUNE.
  c.threadpool_size = 0  # tf.data private threads; 0 = TensorFlow's shared pool.
  c.prefetch_batches = 2  # Batches tf.data prepares ahead, on the host.
  c.device_prefetch = 2  # Global batches put on the devices ahead of the step.
  c.cache_eval = False  # Keep preprocessed eval images in memory after the first pass.
  c.with_example_id = False  # Debug/tests: add 'example_id' (hash of the file name).
  return c
