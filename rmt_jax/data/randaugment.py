"""RandAugment as timm implements it (`rand-m9-mstd0.5-inc1` in the official RMT/DeiT runs).

A policy string `rand-m{M}-n{N}-mstd{S}-mmax{X}-inc{0|1}-p{P}` picks N ops per image
uniformly (with replacement) from the op list; each is applied with probability P (0.5) at a
magnitude drawn from N(M, S) clipped to [0, X] (X=10). `inc1` selects the "increasing"
variants whose strength grows with the magnitude, so that magnitude 0 means identity for the
enhancement and solarize ops. Ops act on uint8 [H, W, 3] images, as PIL does in timm; the
geometric ops fill uncovered pixels with the ImageNet mean colour and sample bilinearly
(TF's projective transform has no bicubic mode; timm uses bicubic there).
"""

import math

import tensorflow as tf

from rmt_jax.data.policies import (  # pylint: disable=unused-import  (the names callers use)
    DEFAULT_FILL, LEVEL_DENOM, RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS, RandAugmentPolicy,
    parse_policy)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """PIL `ImageEnhance`: degenerate + factor * (image - degenerate), clipped."""
  degenerate = tf.cast(degenerate, tf.float32)
  out = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL 'L' conversion (ITU-R 601-2 luma), float32 [H, W, 1]."""
  weights = tf.constant([0.299, 0.587, 0.114])
  return tf.round(tf.reduce_sum(tf.cast(image, tf.float32) * weights, -1, keepdims=True))


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel's [min, max] to [0, 255]; flat channels stay as they are."""
  # PIL's lookup table, int(i * scale + offset) in double precision, per channel.
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  values = tf.range(256, dtype=tf.float64)[:, None]
  lut = tf.clip_by_value(tf.floor(values * scale - lo * scale), 0.0, 255.0)
  lut = tf.cast(tf.where(hi > lo, lut, values), tf.uint8)  # [256, 3]
  channels = [tf.gather(lut[:, c], tf.cast(image[..., c], tf.int32)) for c in range(3)]
  return tf.stack(channels, axis=-1)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.equalize` for one uint8 channel [H, W]."""
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(values, minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  safe_step = tf.maximum(step, 1)
  lut = (tf.cumsum(hist, exclusive=True) + safe_step // 2) // safe_step
  lut = tf.clip_by_value(lut, 0, 255)
  return tf.where(step > 0, tf.cast(tf.gather(lut, values), tf.uint8), channel)


def equalize(image: tf.Tensor) -> tf.Tensor:
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the top `bits` bits of each value (bits >= 8 is identity)."""
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = tf.cast(tf.bitwise.left_shift(255, 8 - bits) & 255, tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Inverts the values >= threshold."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x >= tf.cast(threshold, tf.int32), 255 - x, x), tf.uint8)


def solarize_add(image: tf.Tensor, addition, threshold: int = 128) -> tf.Tensor:
  """Adds `addition` to the values < threshold, clipped to 255."""
  x = tf.cast(image, tf.int32)
  added = tf.minimum(x + tf.cast(addition, tf.int32), 255)
  return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  return _blend(tf.tile(_grayscale(image), [1, 1, 3]), image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL `ImageEnhance.Sharpness`: blend with the SMOOTH-filtered image (border kept)."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.round(smooth)
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  shape = tf.shape(image)
  rows = tf.range(shape[0])[:, None, None]
  cols = tf.range(shape[1])[None, :, None]
  interior = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
  degenerate = tf.where(interior, degenerate, x[0])
  return _blend(degenerate, image, factor)


def affine(image: tf.Tensor, matrix: tf.Tensor, fill=DEFAULT_FILL) -> tf.Tensor:
  """Samples input(M @ [x, y, 1]) bilinearly for each output pixel; outside -> `fill`.

  `matrix` holds the 6 entries (a, b, c, d, e, f) of PIL's `Image.AFFINE` data: the input
  point of output (x, y) is (a x + b y + c, d x + e y + f).
  """
  # Bilinear sampling is linear, so sampling (image - fill) with zeros outside and adding
  # fill back blends edge pixels with the fill colour exactly as PIL's fillcolor does.
  fill = tf.constant(fill, tf.float32)
  shifted = (tf.cast(image, tf.float32) - fill)[None]
  transform = tf.concat([tf.cast(matrix, tf.float32), tf.zeros([2])], 0)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=shifted, transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='CONSTANT')[0] + fill
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def rotate(image: tf.Tensor, degrees, fill=DEFAULT_FILL) -> tf.Tensor:
  """Rotates about the image centre."""
  shape = tf.cast(tf.shape(image), tf.float32)
  cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
  angle = tf.cast(degrees, tf.float32) * math.pi / 180
  cos, sin = tf.cos(angle), tf.sin(angle)
  matrix = tf.stack([cos, sin, cx - cos * cx - sin * cy,
                     -sin, cos, cy + sin * cx - cos * cy])
  return affine(image, matrix, fill)


def shear_x(image: tf.Tensor, factor, fill=DEFAULT_FILL) -> tf.Tensor:
  f = tf.cast(factor, tf.float32)
  return affine(image, tf.stack([1.0, f, 0.0, 0.0, 1.0, 0.0]), fill)


def shear_y(image: tf.Tensor, factor, fill=DEFAULT_FILL) -> tf.Tensor:
  f = tf.cast(factor, tf.float32)
  return affine(image, tf.stack([1.0, 0.0, 0.0, f, 1.0, 0.0]), fill)


def translate_x(image: tf.Tensor, pixels, fill=DEFAULT_FILL) -> tf.Tensor:
  t = tf.cast(pixels, tf.float32)
  return affine(image, tf.stack([1.0, 0.0, t, 0.0, 1.0, 0.0]), fill)


def translate_y(image: tf.Tensor, pixels, fill=DEFAULT_FILL) -> tf.Tensor:
  t = tf.cast(pixels, tf.float32)
  return affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, t]), fill)


def apply_op(image: tf.Tensor, name: str, magnitude, sign_seed: tf.Tensor,
             fill=DEFAULT_FILL) -> tf.Tensor:
  """Applies timm's op `name` at `magnitude` (0..10); `sign_seed` picks the random sign."""
  level = tf.cast(magnitude, tf.float32) / LEVEL_DENOM
  negate = tf.random.stateless_uniform([], sign_seed) > 0.5
  signed = lambda v: tf.where(negate, -v, v)  # timm's `_randomly_negate`.
  shape = tf.cast(tf.shape(image), tf.float32)
  ops = {
      'AutoContrast': lambda: auto_contrast(image),
      'Equalize': lambda: equalize(image),
      'Invert': lambda: invert(image),
      'Rotate': lambda: rotate(image, signed(level * 30.0), fill),
      'Posterize': lambda: posterize(image, tf.cast(level * 4, tf.int32)),
      'PosterizeIncreasing': lambda: posterize(image, 4 - tf.cast(level * 4, tf.int32)),
      'Solarize': lambda: solarize(image, tf.cast(level * 256, tf.int32)),
      'SolarizeIncreasing': lambda: solarize(image, 256 - tf.cast(level * 256, tf.int32)),
      'SolarizeAdd': lambda: solarize_add(image, tf.cast(level * 110, tf.int32)),
      'Color': lambda: color(image, level * 1.8 + 0.1),
      'Contrast': lambda: contrast(image, level * 1.8 + 0.1),
      'Brightness': lambda: brightness(image, level * 1.8 + 0.1),
      'Sharpness': lambda: sharpness(image, level * 1.8 + 0.1),
      'ColorIncreasing': lambda: color(image, 1.0 + signed(level * 0.9)),
      'ContrastIncreasing': lambda: contrast(image, 1.0 + signed(level * 0.9)),
      'BrightnessIncreasing': lambda: brightness(image, 1.0 + signed(level * 0.9)),
      'SharpnessIncreasing': lambda: sharpness(image, 1.0 + signed(level * 0.9)),
      'ShearX': lambda: shear_x(image, signed(level * 0.3), fill),
      'ShearY': lambda: shear_y(image, signed(level * 0.3), fill),
      'TranslateXRel': lambda: translate_x(image, signed(level * 0.45) * shape[1], fill),
      'TranslateYRel': lambda: translate_y(image, signed(level * 0.45) * shape[0], fill),
  }
  if name not in ops:
    raise ValueError(f'Unknown RandAugment op {name!r}')
  out = ops[name]()
  out.set_shape(image.shape)
  return out


def randaugment(image: tf.Tensor, seed: tf.Tensor, policy: RandAugmentPolicy,
                fill=DEFAULT_FILL) -> tf.Tensor:
  """Applies `policy.num_layers` random ops to a uint8 [H, W, 3] image."""
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, policy.num_layers)):
    s_op, s_prob, s_mag, s_sign = tf.unstack(
        tf.random.experimental.stateless_split(layer_seed, 4))
    op_index = tf.random.stateless_uniform(
        [], s_op, minval=0, maxval=len(policy.ops), dtype=tf.int32)
    if math.isinf(policy.magnitude_std):
      magnitude = tf.random.stateless_uniform([], s_mag, 0.0, policy.magnitude)
    elif policy.magnitude_std > 0:
      magnitude = policy.magnitude + policy.magnitude_std * tf.random.stateless_normal(
          [], s_mag)
    else:
      magnitude = tf.constant(policy.magnitude, tf.float32)
    magnitude = tf.clip_by_value(magnitude, 0.0, policy.magnitude_max)
    branches = [
        (lambda name=name, img=image, mag=magnitude, s=s_sign: apply_op(img, name, mag, s, fill))
        for name in policy.ops]
    image = tf.cond(tf.random.stateless_uniform([], s_prob) < policy.prob,
                    lambda i=op_index, b=branches: tf.switch_case(i, b),
                    lambda img=image: img)
  return image
