"""Each augmentation op against its defining property (augment, randaugment, mixup)."""

import math

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow', reason='the augmentations run in TensorFlow')

from rmt_jax.data import augment  # pylint: disable=g-import-not-at-top
from rmt_jax.data import mixup
from rmt_jax.data import randaugment as ra


def _seed(i: int):
  return tf.constant([i, 12345], tf.int64)


def _image(h=24, w=24, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> tf.Tensor:
  return tf.io.encode_png(image)


# --- random-resized crop, flip, eval crop, normalisation ---------------------------------


def test_random_resized_crop_window_follows_scale_and_ratio():
  shape = tf.constant([300, 400])
  fractions, aspects = [], []
  for i in range(300):
    y, x, h, w = augment.random_resized_crop_window(shape, _seed(i)).numpy()
    assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 400
    fractions.append(h * w / (300 * 400))
    aspects.append(w / h)
  fractions, aspects = np.array(fractions), np.array(aspects)
  # Rounding to whole pixels moves the area a little past the sampled bounds.
  assert fractions.min() >= 0.075 and fractions.max() <= 1.0
  assert np.all((aspects > 0.74) & (aspects < 1.35))
  # The draws cover the range (area uniform in [0.08, 1]: mean ~0.54 before rejection).
  assert fractions.min() < 0.15 and fractions.max() > 0.85
  assert 0.4 < fractions.mean() < 0.6


def test_random_resized_crop_falls_back_to_a_clamped_centre_crop():
  # No window of 2-3x the image area fits: torchvision's fallback is a centre crop with
  # the aspect ratio clamped into `ratio` (here a 100x400 image -> 100x133 at 4/3).
  y, x, h, w = augment.random_resized_crop_window(
      tf.constant([100, 400]), _seed(0), scale=(2.0, 3.0)).numpy()
  assert (h, w) == (100, 133)
  assert (y, x) == (0, (400 - 133) // 2)


def test_random_resized_crop_of_whole_square_image_is_identity():
  image = _image(16, 16)
  out = augment.decode_and_random_resized_crop(
      _png(image), _seed(3), size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0),
      interpolation='bicubic')
  assert out.dtype == tf.uint8 and out.shape == (16, 16, 3)
  np.testing.assert_array_equal(out.numpy(), image)


def test_random_resized_crop_output_shape_for_jpeg_and_png():
  image = _image(30, 50)
  for data in (_png(image), tf.io.encode_jpeg(image)):
    out = augment.decode_and_random_resized_crop(
        data, _seed(1), size=20, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
        interpolation='bicubic')
    assert out.shape == (20, 20, 3) and out.dtype == tf.uint8


def test_horizontal_flip_mirrors_half_of_the_time():
  image = tf.constant(_image(8, 8))
  flipped = [bool(np.array_equal(augment.random_horizontal_flip(image, _seed(i)).numpy(),
                                 image.numpy()[:, ::-1])) for i in range(200)]
  assert 0.38 < np.mean(flipped) < 0.62
  np.testing.assert_array_equal(
      augment.random_horizontal_flip(image, _seed(0), prob=0.0).numpy(), image.numpy())


def test_eval_crop_is_centred():
  # Without resizing (crop_pct 1, shorter side == size) the crop is the exact middle.
  image = _image(20, 30)
  out = augment.decode_and_center_crop(_png(image), size=20, crop_pct=1.0,
                                       interpolation='bicubic').numpy()
  np.testing.assert_array_equal(out, image[:, 5:25])
  # A left-right and top-bottom symmetric image stays symmetric through resize + crop.
  # (64 x 40 -> 28 x 18, both margins even, so the exact centre is a whole pixel.)
  half = _image(32, 20, seed=1)
  top = np.concatenate([half, half[:, ::-1]], axis=1)
  symmetric = np.concatenate([top, top[::-1]], axis=0)
  out = augment.decode_and_center_crop(_png(symmetric), size=16, crop_pct=0.875,
                                       interpolation='bicubic').numpy().astype(int)
  assert out.shape == (16, 16, 3)
  assert np.abs(out - out[:, ::-1]).max() <= 1
  assert np.abs(out - out[::-1]).max() <= 1


def test_eval_resize_follows_timm():
  assert augment.eval_resize_size(224, 0.875) == 256
  resized = augment.resize_shorter_side(tf.zeros([300, 500, 3], tf.uint8), 256, 'bicubic')
  assert resized.shape == (256, 426, 3)  # int(256 * 500 / 300)


def test_normalize_maps_the_mean_colour_to_zero():
  mean = tf.constant(np.array(augment.MEAN_RGB, np.float32)[None, None])
  np.testing.assert_allclose(augment.normalize(mean).numpy(), 0.0, atol=1e-6)
  white = augment.normalize(tf.fill([1, 1, 3], tf.constant(255, tf.uint8))).numpy()
  np.testing.assert_allclose(white[0, 0], (255 - np.array(augment.MEAN_RGB)) /
                             np.array(augment.STDDEV_RGB), rtol=1e-6)


# --- random erasing -----------------------------------------------------------------------


def _erased_masks(n, **kwargs):
  image = tf.fill([32, 32, 3], 7.0)  # Far outside N(0, 1): erased pixels are obvious.
  outs = [augment.random_erasing(image, _seed(i), **kwargs).numpy() for i in range(n)]
  return outs, [o != 7.0 for o in outs]


def test_random_erasing_touches_the_expected_fraction():
  outs, masks = _erased_masks(400, probability=0.25, mode='pixel')
  erased = [m for m in masks if m.any()]
  assert 0.19 < len(erased) / len(masks) < 0.31
  for mask in erased:
    rows, cols = np.nonzero(mask.any(-1))
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert mask.any(-1).sum() == box  # One rectangle, all channels.
    assert np.all(mask == mask[..., :1])
    assert 0.015 <= box / (32 * 32) <= 0.36  # [0.02, 1/3] up to rounding to pixels.
  noise = np.concatenate([o[m] for o, m in zip(outs, masks)])
  assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1  # 'pixel': N(0, 1) per pixel.


def test_random_erasing_modes_and_off():
  _, masks = _erased_masks(20, probability=0.0)
  assert not any(m.any() for m in masks)
  outs, masks = _erased_masks(40, probability=1.0, mode='const')
  assert all(m.any() for m in masks)
  assert all(np.all(o[m] == 0) for o, m in zip(outs, masks))
  outs, masks = _erased_masks(10, probability=1.0, mode='rand')
  for o, m in zip(outs, masks):
    per_channel = [np.unique(o[..., c][m[..., c]]) for c in range(3)]
    assert all(len(u) == 1 for u in per_channel)  # One colour per channel.


# --- RandAugment --------------------------------------------------------------------------


def test_parse_official_policy():
  policy = ra.parse_policy('rand-m9-mstd0.5-inc1')
  assert policy == ra.RandAugmentPolicy(num_layers=2, magnitude=9.0, magnitude_std=0.5,
                                        magnitude_max=10.0, prob=0.5,
                                        ops=ra.RAND_INCREASING_TRANSFORMS)
  assert len(policy.ops) == 15
  assert ra.parse_policy('rand-m7-n3').ops == ra.RAND_TRANSFORMS
  assert ra.parse_policy('') is None and ra.parse_policy('none') is None
  with pytest.raises(ValueError):
    ra.parse_policy('rand-m9-q1')


@pytest.mark.parametrize('name', sorted(set(ra.RAND_TRANSFORMS + ra.RAND_INCREASING_TRANSFORMS)))
def test_op_keeps_shape_dtype_and_range(name):
  image = tf.constant(_image(20, 28))
  for magnitude in (0.0, 5.0, 9.0, 10.0):
    out = ra.apply_op(image, name, magnitude, _seed(1))
    assert out.shape == (20, 28, 3) and out.dtype == tf.uint8


IDENTITY_AT_ZERO = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
                    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
                    'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing')


@pytest.mark.parametrize('name', IDENTITY_AT_ZERO)
def test_increasing_and_geometric_ops_are_identity_at_magnitude_zero(name):
  image = tf.constant(_image(20, 28))
  for s in range(4):  # Both signs.
    np.testing.assert_array_equal(ra.apply_op(image, name, 0.0, _seed(s)).numpy(), image)
  # And they do change the image at the policy's magnitude.
  assert not np.array_equal(ra.apply_op(image, name, 9.0, _seed(0)).numpy(), image)


def test_invert_solarize_posterize():
  x = _image(8, 8)
  np.testing.assert_array_equal(ra.invert(tf.constant(x)).numpy(), 255 - x)
  # Magnitude 10 solarizes at threshold 0: everything inverted.
  np.testing.assert_array_equal(ra.apply_op(tf.constant(x), 'SolarizeIncreasing', 10.0,
                                            _seed(0)).numpy(), 255 - x)
  out = ra.solarize(tf.constant(x), 128).numpy()
  np.testing.assert_array_equal(out, np.where(x >= 128, 255 - x, x))
  out = ra.solarize_add(tf.constant(x), 50).numpy()
  np.testing.assert_array_equal(out, np.where(x < 128, np.minimum(x.astype(int) + 50, 255), x))
  # PosterizeIncreasing at m=9 keeps 4 - int(0.9 * 4) = 1 bit.
  out = ra.apply_op(tf.constant(x), 'PosterizeIncreasing', 9.0, _seed(0)).numpy()
  np.testing.assert_array_equal(out, x & 0b10000000)


def test_auto_contrast_and_equalize_stretch_the_histogram():
  low = (_image(16, 16) // 4 + 60).astype(np.uint8)  # Values in [60, 123].
  out = ra.auto_contrast(tf.constant(low)).numpy()
  # Per channel min -> 0 and max -> 255 (254 where PIL's float lookup table rounds down).
  assert np.all(out.reshape(-1, 3).min(0) == 0) and np.all(out.reshape(-1, 3).max(0) >= 254)
  flat = np.full((4, 4, 3), 9, np.uint8)
  np.testing.assert_array_equal(ra.auto_contrast(tf.constant(flat)).numpy(), flat)
  eq = ra.equalize(tf.constant(low)).numpy()
  assert eq.max() > 240 and eq.min() < 15
  # Monotone per channel: equalisation reorders no values.
  for c in range(3):
    order = np.argsort(low[..., c], axis=None, kind='stable')
    assert np.all(np.diff(eq[..., c].reshape(-1)[order].astype(int)) >= 0)


def test_geometric_ops_move_pixels_as_defined():
  x = _image(10, 10)
  fill = (1, 2, 3)
  out = ra.translate_x(tf.constant(x), 3.0, fill).numpy()
  np.testing.assert_array_equal(out[:, :7], x[:, 3:])
  np.testing.assert_array_equal(out[:, 7:], np.broadcast_to(fill, (10, 3, 3)))
  out = ra.shear_x(tf.constant(x), 1.0, fill).numpy()  # out[y, x] = in[y, x + y].
  for y in range(10):
    np.testing.assert_array_equal(out[y, :10 - y], x[y, y:])
  out = ra.rotate(tf.constant(x), 90.0, fill).numpy()
  assert np.array_equal(out, np.rot90(x)) or np.array_equal(out, np.rot90(x, -1))


def test_enhance_ops_blend_as_defined():
  x = _image(12, 12)
  # Brightness blends with black: factor f scales every value.
  out = ra.brightness(tf.constant(x), 0.5).numpy()
  np.testing.assert_allclose(out, np.floor(x * 0.5), atol=1)
  gray = ra.color(tf.constant(x), 0.0).numpy()
  assert np.all(gray == gray[..., :1])  # Factor 0: grayscale.
  flat = ra.contrast(tf.constant(x), 0.0).numpy()
  assert len(np.unique(flat)) == 1  # Factor 0: the mean grey.


def test_sharpness_blends_with_the_smoothed_interior():
  x = _image(10, 12)
  smooth = ra.sharpness(tf.constant(x), 0.0).numpy().astype(float)  # Factor 0: SMOOTH.
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
  y, z = 4, 5
  want = np.round((x[y - 1:y + 2, z - 1:z + 2].astype(float) * kernel[..., None]).sum((0, 1)))
  np.testing.assert_allclose(smooth[y, z], want, atol=1)
  sharp = ra.sharpness(tf.constant(x), 1.9).numpy()
  for out in (smooth, sharp):  # PIL leaves the one-pixel border as it was.
    np.testing.assert_array_equal(out[0], x[0])
    np.testing.assert_array_equal(out[:, -1], x[:, -1])


def test_randaugment_is_seeded_and_prob_zero_is_identity():
  image = tf.constant(_image(24, 24))
  policy = ra.parse_policy('rand-m9-mstd0.5-inc1')
  a = ra.randaugment(image, _seed(5), policy).numpy()
  np.testing.assert_array_equal(a, ra.randaugment(image, _seed(5), policy).numpy())
  changed = [not np.array_equal(ra.randaugment(image, _seed(i), policy).numpy(), image)
             for i in range(40)]
  # Two ops at p=0.5 each: P(neither applied) = 0.25 (Invert etc. always change).
  assert 0.5 < np.mean(changed) < 0.95
  off = ra.parse_policy('rand-m9-mstd0.5-inc1-p0')
  np.testing.assert_array_equal(ra.randaugment(image, _seed(5), off).numpy(), image)


# --- Mixup / CutMix + label smoothing -----------------------------------------------------


def _batch(n=8, size=8, k=10):
  rng = np.random.default_rng(0)
  images = tf.constant(rng.normal(size=(n, size, size, 3)).astype(np.float32))
  labels = tf.constant(rng.permutation(k)[:n].astype(np.int32))
  return images, labels


def test_label_smoothing_without_mixing():
  images, labels = _batch()
  cfg = mixup.MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1,
                          num_classes=10)
  out, targets = mixup.mix_batch(images, labels, _seed(0), cfg)
  np.testing.assert_array_equal(out.numpy(), images.numpy())
  expected = np.full((8, 10), 0.01)
  expected[np.arange(8), labels.numpy()] = 0.91
  np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-6)


def _lam_from_targets(targets, labels, smoothing=0.1, k=10):
  on, off = 1 - smoothing + smoothing / k, smoothing / k
  # Row 0 mixes label[0] (weight lam) with label[-1] (weight 1 - lam).
  return (targets[0, labels[0]] - off) / (on - off)


def test_mixup_blends_images_and_labels_with_the_same_lambda():
  images, labels = _batch()
  cfg = mixup.MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=10)
  lams = []
  for i in range(60):
    out, targets = mixup.mix_batch(images, labels, _seed(i), cfg)
    targets = targets.numpy()
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    lam = _lam_from_targets(targets, labels.numpy())
    x = images.numpy()
    np.testing.assert_allclose(out.numpy(), lam * x + (1 - lam) * x[::-1], atol=1e-5)
    lams.append(lam)
  assert 0.35 < np.mean(lams) < 0.65 and np.min(lams) < 0.2 and np.max(lams) > 0.8


def test_cutmix_pastes_a_box_whose_area_is_one_minus_lambda():
  images, labels = _batch(size=16)
  cfg = mixup.MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=10)
  for i in range(30):
    out, targets = mixup.mix_batch(images, labels, _seed(i), cfg)
    out, targets, x = out.numpy(), targets.numpy(), images.numpy()
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
    pasted = np.all(out[0] == x[-1], axis=-1) & ~np.all(x[0] == x[-1], axis=-1)
    kept = np.all(out[0] == x[0], axis=-1)
    assert np.all(pasted | kept)
    lam = _lam_from_targets(targets, labels.numpy())
    np.testing.assert_allclose(pasted.mean(), 1 - lam, atol=1e-6)


def test_switch_probability_and_seeding():
  images, labels = _batch()
  cfg = mixup.MixupConfig(num_classes=10)  # Official: both on, switch 0.5.
  cut = []
  for i in range(80):
    out, _ = mixup.mix_batch(images, labels, _seed(i), cfg)
    diff = np.abs(out.numpy() - images.numpy())
    # CutMix leaves pixels exactly unchanged outside the box; Mixup changes (nearly) all.
    cut.append(np.mean(diff == 0) > 0.01)
  assert 0.3 < np.mean(cut) < 0.7
  a = mixup.mix_batch(images, labels, _seed(3), cfg)
  b = mixup.mix_batch(images, labels, _seed(3), cfg)
  np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
  never = mixup.MixupConfig(prob=0.0, num_classes=10)
  out, _ = mixup.mix_batch(images, labels, _seed(3), never)
  np.testing.assert_array_equal(out.numpy(), images.numpy())


def test_beta_sampler_mean_and_variance():
  draws = np.array([float(mixup.sample_beta(_seed(i), 0.8)) for i in range(400)])
  # Beta(0.8, 0.8): mean 0.5, variance 1 / (4 * 2.6) ~ 0.096.
  assert abs(draws.mean() - 0.5) < 0.05
  assert abs(draws.var() - 1 / (4 * 2.6)) < 0.025
  assert not math.isnan(draws.sum())
