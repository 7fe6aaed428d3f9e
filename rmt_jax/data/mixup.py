"""Batch-level Mixup / CutMix with label smoothing, as timm's `Mixup(mode='batch')` does it.

One draw per batch: with probability `prob` the batch is mixed; CutMix (Beta(cutmix_alpha))
is chosen over Mixup (Beta(mixup_alpha)) with probability `switch_prob` when both are on.
Example i is mixed with example B-1-i (the flipped batch). CutMix pastes one box and
corrects lambda to the pasted area. Targets: lam * smooth(y) + (1 - lam) * smooth(flip(y)),
where smooth puts 1 - s + s/K on the class and s/K elsewhere, so every row sums to 1.
Runs in TensorFlow on the host (inside tf.data), from a stateless seed per batch.
"""

import tensorflow as tf

from rmt_jax.data.policies import MixupConfig  # pylint: disable=unused-import  (callers' name)


def smooth_one_hot(labels: tf.Tensor, num_classes: int, smoothing: float) -> tf.Tensor:
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  return tf.one_hot(labels, num_classes, on_value=on, off_value=off, dtype=tf.float32)


def sample_beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
  """Beta(alpha, alpha) as G1 / (G1 + G2) from two stateless gamma draws."""
  gammas = tf.random.stateless_gamma([2], seed, alpha=alpha)
  return gammas[0] / tf.reduce_sum(gammas)


def cutmix_box(height, width, lam: tf.Tensor, seed: tf.Tensor):
  """timm `rand_bbox`: a box of side ratio sqrt(1 - lam) around a uniform centre, clipped."""
  ratio = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.cast(height, tf.float32) * ratio, tf.int32)
  cut_w = tf.cast(tf.cast(width, tf.float32) * ratio, tf.int32)
  cy = tf.random.stateless_uniform([], seed, 0, height, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 1), 0,
                                   width, dtype=tf.int32)
  y0 = tf.clip_by_value(cy - cut_h // 2, 0, height)
  y1 = tf.clip_by_value(cy + cut_h // 2, 0, height)
  x0 = tf.clip_by_value(cx - cut_w // 2, 0, width)
  x1 = tf.clip_by_value(cx + cut_w // 2, 0, width)
  return y0, y1, x0, x1


def mix_batch(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor,
              config: MixupConfig) -> tuple[tf.Tensor, tf.Tensor]:
  """Mixes a batch [B, H, W, C] with integer labels [B]; returns (images, soft labels [B, K])."""
  targets = smooth_one_hot(labels, config.num_classes, config.label_smoothing)
  if not config.active:
    return images, targets
  s_apply, s_switch, s_lam, s_box = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  use_cutmix = tf.constant(config.mixup_alpha <= 0)
  if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], s_switch) < config.switch_prob
  mix_lam = sample_beta(s_lam, config.mixup_alpha) if config.mixup_alpha > 0 else 1.0
  cut_lam = sample_beta(s_lam, config.cutmix_alpha) if config.cutmix_alpha > 0 else 1.0
  lam = tf.where(use_cutmix, cut_lam, mix_lam)
  lam = tf.where(tf.random.stateless_uniform([], s_apply) < config.prob, lam, 1.0)

  shape = tf.shape(images)
  y0, y1, x0, x1 = cutmix_box(shape[1], shape[2], lam, s_box)
  box_lam = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(shape[1] * shape[2],
                                                                         tf.float32)

  def cutmix_images():
    rows = tf.range(shape[1])[None, :, None, None]
    cols = tf.range(shape[2])[None, None, :, None]
    in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return tf.where(in_box, tf.reverse(images, axis=[0]), images)

  def mixup_images():
    return images * lam + tf.reverse(images, axis=[0]) * (1.0 - lam)

  # Only the chosen mix is computed: each is a few passes over a large batch.
  images = tf.cond(lam < 1.0,
                   lambda: tf.cond(use_cutmix, cutmix_images, mixup_images),
                   lambda: images)
  lam = tf.where(use_cutmix, box_lam, lam)
  targets = targets * lam + tf.reverse(targets, axis=[0]) * (1.0 - lam)
  return images, targets
