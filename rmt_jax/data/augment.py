"""Per-example image preprocessing in TensorFlow: the DeiT/timm train and eval transforms.

Train (timm `create_transform(is_training=True)` as the official RMT runs use it):
decode + random-resized crop (bicubic) -> horizontal flip -> RandAugment (`randaugment.py`)
-> normalise by the ImageNet mean/std -> random erasing. Eval: resize the shorter side to
`floor(size / crop_pct)` (bicubic) -> centre crop -> normalise. Batch-level Mixup/CutMix and
label smoothing live in `mixup.py`.

Every random choice draws from a stateless seed passed in by the caller (shape [2] int), so
an example's augmentation depends only on that seed, never on thread scheduling.
Images stay uint8 in [0, 255] until `normalize`, as they do in PIL before `ToTensor`.
"""

import math
from typing import Sequence

import tensorflow as tf

from rmt_jax.data.eval_preprocessing import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS

MEAN_RGB = tuple(m * 255 for m in IMAGENET_MEAN)
STDDEV_RGB = tuple(s * 255 for s in IMAGENET_STD)


def _split(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  return list(tf.unstack(tf.random.experimental.stateless_split(seed, num)))


def _uniform(seed, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval)


def _randint_inclusive(seed, high: tf.Tensor) -> tf.Tensor:
  """Uniform integer in [0, high], like Python's `random.randint(0, high)`."""
  high = tf.cast(high, tf.float32)
  return tf.cast(tf.floor(_uniform(seed) * (high + 1.0)), tf.int32)


def resize(image: tf.Tensor, height, width, method: str) -> tf.Tensor:
  """Resizes like PIL (antialiased), returning float32 clipped to [0, 255].

  `method` is a tf.image.resize name (`eval_preprocessing.INTERPOLATIONS`); PIL's (and so
  torchvision's) bicubic and bilinear are antialiased when downscaling, and `antialias=True`
  gives TF the same behaviour.
  """
  if method not in INTERPOLATIONS:
    raise ValueError(f'interpolation must be one of {sorted(INTERPOLATIONS)}, got {method!r}')
  out = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                        method=method, antialias=True)
  return tf.clip_by_value(out, 0.0, 255.0)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def image_shape(image_bytes: tf.Tensor) -> tf.Tensor:
  """(height, width) of an encoded image; reads only the header for JPEG."""
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.image.extract_jpeg_shape(image_bytes)[:2],
      lambda: tf.shape(decode_image(image_bytes))[:2])


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/BMP/GIF bytes to uint8 [H, W, 3] (grayscale becomes RGB)."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_and_crop(image_bytes: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """Decodes the window [y, x, h, w]; for JPEG only that window is decoded (faster)."""
  def crop_other():
    image = decode_image(image_bytes)
    return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]
  image = tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3),
      crop_other)
  image.set_shape([None, None, 3])
  return image


def random_resized_crop_window(shape: tf.Tensor, seed: tf.Tensor, *,
                               scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3),
                               attempts: int = 10) -> tf.Tensor:
  """Samples the crop window [y, x, h, w] of torchvision's `RandomResizedCrop`.

  Up to `attempts` (area fraction, log-uniform aspect ratio) draws; the first one that fits
  in the image wins, else a centre crop with the aspect ratio clamped into `ratio`.
  """
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  s_area, s_ratio, s_y, s_x = _split(seed, 4)
  area = height * width * _uniform(s_area, [attempts], scale[0], scale[1])
  aspect = tf.exp(_uniform(s_ratio, [attempts], math.log(ratio[0]), math.log(ratio[1])))
  crop_w = tf.round(tf.sqrt(area * aspect))
  crop_h = tf.round(tf.sqrt(area / aspect))
  fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))

  def sampled():
    h, w = crop_h[first], crop_w[first]
    return tf.stack([_randint_inclusive(s_y, height - h), _randint_inclusive(s_x, width - w),
                     tf.cast(h, tf.int32), tf.cast(w, tf.int32)])

  def fallback():
    in_ratio = width / height
    w = tf.where(in_ratio < min(ratio), width,
                 tf.where(in_ratio > max(ratio), tf.round(height * max(ratio)), width))
    h = tf.where(in_ratio < min(ratio), tf.round(width / min(ratio)), height)
    h, w = tf.cast(h, tf.int32), tf.cast(w, tf.int32)
    return tf.stack([(shape[0] - h) // 2, (shape[1] - w) // 2, h, w])

  return tf.cond(tf.reduce_any(fits), sampled, fallback)


def decode_and_random_resized_crop(image_bytes: tf.Tensor, seed: tf.Tensor, *, size: int,
                                   scale: Sequence[float], ratio: Sequence[float],
                                   interpolation: str) -> tf.Tensor:
  """Train crop: uint8 [size, size, 3] from a random window, resized with `interpolation`."""
  window = random_resized_crop_window(image_shape(image_bytes), seed, scale=scale, ratio=ratio)
  crop = decode_and_crop(image_bytes, window)
  return to_uint8(resize(crop, size, size, interpolation))


def random_horizontal_flip(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
  # tf.reverse, not image[:, ::-1]: TensorFlow's negative-stride slice costs ~10x more.
  return tf.cond(_uniform(seed) < prob, lambda: tf.reverse(image, [1]), lambda: image)


def resize_shorter_side(image: tf.Tensor, size: int, interpolation: str) -> tf.Tensor:
  """torchvision `Resize(int)`: shorter side -> size, longer side -> int(size * long / short)."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.cast(tf.minimum(h, w), tf.float64)
  long_side = tf.cast(tf.cast(tf.maximum(h, w), tf.float64) * size / short, tf.int32)
  new_h = tf.where(h <= w, size, long_side)
  new_w = tf.where(h <= w, long_side, size)
  return resize(image, new_h, new_w, interpolation)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision `CenterCrop`: offsets int(round((dim - size) / 2))."""
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
  return image[top:top + size, left:left + size]


def eval_resize_size(size: int, crop_pct: float) -> int:
  """timm's eval `scale_size`: floor(size / crop_pct), 256 for 224 at 0.875."""
  return int(math.floor(size / crop_pct))


def decode_and_center_crop(image_bytes: tf.Tensor, *, size: int, crop_pct: float,
                           interpolation: str) -> tf.Tensor:
  """Eval transform: uint8 [size, size, 3], shorter side resized then centre-cropped."""
  image = decode_image(image_bytes)
  image = resize_shorter_side(image, eval_resize_size(size, crop_pct), interpolation)
  image = center_crop(to_uint8(image), size)
  image.set_shape([size, size, 3])
  return image


def normalize(image: tf.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> tf.Tensor:
  """uint8 RGB in [0, 255] -> float32 standardised by `mean` and `std` (fractions of 255,
  timm's convention; default ImageNet's)."""
  image = tf.cast(image, tf.float32)
  return ((image - tf.constant([m * 255 for m in mean], tf.float32))
          / tf.constant([s * 255 for s in std], tf.float32))


def random_erasing(image: tf.Tensor, seed: tf.Tensor, *, probability: float = 0.25,
                   mode: str = 'pixel', min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, attempts: int = 10) -> tf.Tensor:
  """timm `RandomErasing` (count 1) on a normalised float image [H, W, C].

  With probability `probability`, one rectangle of area fraction in [min_area, max_area] and
  log-uniform aspect in [min_aspect, 1/min_aspect] is replaced by per-pixel normal noise
  ('pixel'), one normal colour per channel ('rand') or zeros ('const').
  """
  if mode not in ('pixel', 'rand', 'const'):
    raise ValueError(f"random erasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
  if probability <= 0:
    return image
  s_apply, s_area, s_aspect, s_y, s_x, s_fill = _split(seed, 6)
  shape = tf.shape(image)
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  area = height * width * _uniform(s_area, [attempts], min_area, max_area)
  log_aspect = math.log(min_aspect), math.log(1 / min_aspect)
  aspect = tf.exp(_uniform(s_aspect, [attempts], *log_aspect))
  erase_h = tf.round(tf.sqrt(area * aspect))
  erase_w = tf.round(tf.sqrt(area / aspect))
  fits = (erase_w < width) & (erase_h < height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  h, w = erase_h[first], erase_w[first]
  top = _randint_inclusive(s_y, height - h)
  left = _randint_inclusive(s_x, width - w)
  def erase():
    rows = tf.range(shape[0])[:, None, None]
    cols = tf.range(shape[1])[None, :, None]
    inside = ((rows >= top) & (rows < top + tf.cast(h, tf.int32)) &
              (cols >= left) & (cols < left + tf.cast(w, tf.int32)))
    if mode == 'pixel':
      fill = tf.random.stateless_normal(shape, s_fill, dtype=image.dtype)
    elif mode == 'rand':
      fill = tf.random.stateless_normal([1, 1, shape[2]], s_fill, dtype=image.dtype)
    else:
      fill = tf.zeros([1, 1, shape[2]], image.dtype)
    return tf.where(inside, fill, image)

  apply = (_uniform(s_apply) < probability) & tf.reduce_any(fits)
  return tf.cond(apply, erase, lambda: image)
