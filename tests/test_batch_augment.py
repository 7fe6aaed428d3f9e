"""The jax batch ops (batch_augment) against their defining properties, timm's parameter
distributions, and the host's TensorFlow ops (augment, randaugment, mixup) on the same images."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmt_jax.data import batch_augment as ba
from rmt_jax.data import policies

POLICY = policies.parse_policy('rand-m9-mstd0.5-inc1')
ALL_OPS = sorted(set(policies.RAND_TRANSFORMS + policies.RAND_INCREASING_TRANSFORMS))
VALUE_OPS = [n for n in ALL_OPS if n not in policies.GEOMETRIC_OPS]


def _image(h=20, w=28, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _smooth(h=24, w=32) -> np.ndarray:
  """Smooth content: interpolation rounding is the only difference between samplers."""
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([128 + 100 * np.sin(0.3 * x + 0.2 * y), 128 + 90 * np.cos(0.25 * y),
                   60 + 6 * x], -1).clip(0, 255).astype(np.uint8)


def _tf_op(tf, name, image, magnitude, negate):
  from rmt_jax.data import randaugment as ra  # pylint: disable=g-import-not-at-top
  # A sign seed whose uniform draw lands on the wanted side of 0.5.
  for i in range(64):
    seed = tf.constant([i, 7], tf.int64)
    if (float(tf.random.stateless_uniform([], seed)) > 0.5) == negate:
      return ra.apply_op(tf.constant(image), name, magnitude, seed).numpy()
  raise AssertionError('no seed draws that sign')


@pytest.mark.parametrize('name', ALL_OPS)
def test_each_op_equals_the_host_op(name):
  tf = pytest.importorskip('tensorflow', reason='compares with the TensorFlow ops')
  image = _smooth() if name == 'Rotate' else _image()
  for magnitude in (0.0, 5.0, 9.0, 10.0):
    for negate in (False, True):
      want = _tf_op(tf, name, image, magnitude, negate).astype(int)
      got = np.asarray(ba.apply_op(jnp.asarray(image), name, magnitude, negate)).astype(int)
      assert got.dtype == want.dtype and got.shape == want.shape
      diff = np.abs(got - want)
      if name == 'Rotate':
        # Two 1-D linear passes instead of one bilinear: the same geometry, rounding apart.
        assert diff.mean() < 1.5 and np.mean(diff > 3) < 0.03, (magnitude, diff.mean())
      else:
        # PIL's double-precision tables and float sums round a value 1 apart at most.
        assert diff.max() <= 1 and np.mean(diff > 0) < 0.02, (magnitude, negate, diff.max())


def test_warp_forms_agree_and_identity_is_exact():
  image = jnp.asarray(_smooth())
  identity = jnp.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
  for form in ba.FORMS:
    np.testing.assert_array_equal(ba.affine(image, identity, form=form), image)
  for name in policies.GEOMETRIC_OPS:
    matrix = ba.geometric_matrix(name, 0.87, True, 24, 32)
    a = np.asarray(ba.affine(image, matrix, form='gather')).astype(int)
    b = np.asarray(ba.affine(image, matrix, form='matmul')).astype(int)
    assert np.abs(a - b).max() <= 1


def test_geometric_ops_move_pixels_as_defined():
  x = _image(10, 10)
  fill = (1, 2, 3)
  out = np.asarray(ba.affine(jnp.asarray(x), jnp.asarray([1.0, 0, 3, 0, 1, 0]), fill))
  np.testing.assert_array_equal(out[:, :7], x[:, 3:])
  np.testing.assert_array_equal(out[:, 7:], np.broadcast_to(fill, (10, 3, 3)))
  out = np.asarray(ba.affine(jnp.asarray(x), jnp.asarray([1.0, 1, 0, 0, 1, 0]), fill))
  for y in range(10):  # out[y, x] = in[y, x + y].
    np.testing.assert_array_equal(out[y, :10 - y], x[y, y:])


def test_layer_parameters_follow_timm():
  keys = jax.random.split(jax.random.key(0), 6000)
  op, applied, magnitude, negate = jax.vmap(lambda k: ba.layer_parameters(k, POLICY))(keys)
  counts = np.bincount(np.asarray(op), minlength=15)
  assert len(counts) == 15 and np.all(np.abs(counts / 6000 - 1 / 15) < 0.02)  # Uniform.
  assert abs(np.mean(applied) - 0.5) < 0.03 and abs(np.mean(negate) - 0.5) < 0.03
  magnitude = np.asarray(magnitude)
  # N(9, 0.5) clipped to [0, 10]: mean 8.996, std 0.49; 2.3% at the clip.
  assert magnitude.min() >= 0 and magnitude.max() <= 10
  assert abs(magnitude.mean() - 9.0) < 0.03 and abs(magnitude.std() - 0.49) < 0.03
  assert 0.01 < np.mean(magnitude == 10.0) < 0.04
  uniform = policies.parse_policy('rand-m9-mstd101')
  magnitude = jax.vmap(lambda k: ba.layer_parameters(k, uniform)[2])(keys)
  assert abs(float(magnitude.mean()) - 4.5) < 0.15 and float(magnitude.max()) <= 9


def test_randaugment_is_seeded_and_prob_zero_is_identity():
  image = jnp.asarray(_image(24, 24))
  a = ba.randaugment(image, jax.random.key(5), POLICY)
  np.testing.assert_array_equal(a, ba.randaugment(image, jax.random.key(5), POLICY))
  keys = jax.random.split(jax.random.key(1), 80)
  outs = jax.vmap(lambda k: ba.randaugment(image, k, POLICY))(keys)
  changed = np.any(np.asarray(outs) != np.asarray(image), axis=(1, 2, 3))
  # Two ops at p=0.5 each: P(neither applied) = 0.25.
  assert 0.6 < np.mean(changed) < 0.9
  off = policies.parse_policy('rand-m9-mstd0.5-inc1-p0')
  np.testing.assert_array_equal(ba.randaugment(image, jax.random.key(5), off), image)


def test_flip_and_normalize():
  images = jnp.asarray(np.stack([_image(8, 8, s) for s in range(200)]))
  out = np.asarray(ba.random_horizontal_flip(images, jax.random.key(0)))
  flipped = np.all(out == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(out == np.asarray(images), axis=(1, 2, 3))
  assert np.all(flipped | kept) and 0.4 < flipped.mean() < 0.6
  mean = jnp.asarray(np.array([m * 255 for m in ba.IMAGENET_MEAN], np.float32)[None, None])
  np.testing.assert_allclose(ba.normalize(mean), 0.0, atol=1e-5)


def _erased(n, **kwargs):
  image = jnp.full((32, 32, 3), 7.0)  # Far outside N(0, 1): erased pixels are obvious.
  keys = jax.random.split(jax.random.key(0), n)
  outs = np.asarray(jax.vmap(lambda k: ba.random_erasing(image, k, **kwargs))(keys))
  return outs, outs != 7.0


def test_random_erasing_touches_the_expected_fraction():
  outs, masks = _erased(600, probability=0.25, mode='pixel')
  hit = masks.any(axis=(1, 2, 3))
  assert 0.2 < hit.mean() < 0.3
  for mask in masks[hit]:
    rows, cols = np.nonzero(mask.any(-1))
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert mask.any(-1).sum() == box and np.all(mask == mask[..., :1])  # One rectangle.
    assert 0.015 <= box / (32 * 32) <= 0.36
  noise = outs[masks]
  assert abs(noise.mean()) < 0.05 and 0.95 < noise.std() < 1.05
  outs, masks = _erased(20, probability=1.0, mode='const')
  assert masks.any(axis=(1, 2, 3)).all() and np.all(outs[masks] == 0)
  outs, masks = _erased(10, probability=1.0, mode='rand')
  for o, m in zip(outs, masks):
    assert all(len(np.unique(o[..., c][m[..., c]])) == 1 for c in range(3))


def _batch(n=8, size=16, k=10):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(n, size, size, 3)).astype(np.float32)),
          jnp.asarray(rng.permutation(k)[:n].astype(np.int32)))


def _lam(targets, labels, smoothing=0.1, k=10):
  on, off = 1 - smoothing + smoothing / k, smoothing / k
  return (targets[0, labels[0]] - off) / (on - off)


def test_mixup_and_cutmix_follow_timm():
  images, labels = _batch()
  x, y = np.asarray(images), np.asarray(labels)
  plain = policies.MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0, num_classes=10)
  out, targets = ba.mix_batch(images, labels, jax.random.key(0), plain)
  np.testing.assert_array_equal(out, x)
  expected = np.full((8, 10), 0.01)
  expected[np.arange(8), y] = 0.91
  np.testing.assert_allclose(targets, expected, rtol=1e-6)
  mix = jax.jit(ba.mix_batch, static_argnums=3)
  mixup_only = policies.MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=10)
  cutmix_only = policies.MixupConfig(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=10)
  lams = []
  for i in range(300):
    out, targets = map(np.asarray, mix(images, labels, jax.random.key(i), mixup_only))
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
    lam = _lam(targets, y)
    np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], atol=1e-4)
    lams.append(lam)
  # Beta(0.8, 0.8): mean 0.5, variance 1 / (4 * 2.6).
  assert abs(np.mean(lams) - 0.5) < 0.04 and abs(np.var(lams) - 1 / 10.4) < 0.02
  for i in range(20):
    out, targets = map(np.asarray, mix(images, labels, jax.random.key(i), cutmix_only))
    pasted = np.all(out[0] == x[-1], axis=-1)
    assert np.all(pasted | np.all(out[0] == x[0], axis=-1))
    np.testing.assert_allclose(pasted.mean(), 1 - _lam(targets, y), atol=1e-5)
  both = policies.MixupConfig(num_classes=10)
  cut = [np.mean(np.asarray(mix(images, labels, jax.random.key(i), both)[0]) == x) > 0.01
         for i in range(100)]
  assert 0.35 < np.mean(cut) < 0.65


def test_augment_runs_the_whole_recipe_under_jit():
  images = jnp.asarray(np.stack([_image(16, 16, s) for s in range(4)]))
  labels = jnp.asarray([1, 2, 3, 4])
  recipe = ba.BatchRecipe(mixup=policies.MixupConfig(num_classes=10))
  step = jax.jit(ba.augment, static_argnums=(3, 4))
  out, targets = step(images, labels, jax.random.key(0), recipe, 'gather')
  assert out.shape == (4, 16, 16, 3) and out.dtype == jnp.float32
  assert targets.shape == (4, 10)
  np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, rtol=1e-5)
  again = step(images, labels, jax.random.key(0), recipe, 'matmul')
  assert np.mean(np.abs(np.asarray(again[0]) - np.asarray(out)) > 0.02) < 0.01
  with pytest.raises(ValueError, match='form must be'):
    ba.augment(images, labels, jax.random.key(0), recipe, 'fast')


def _equalize_cases():
  rng = np.random.default_rng(3)
  full = rng.integers(0, 256, (20, 28, 3), np.uint8)
  narrow = rng.integers(40, 61, (20, 28, 3), np.uint8)
  flat = np.full((20, 28, 3), 77, np.uint8)
  two = np.where(rng.random((20, 28, 3)) < 0.3, 10, 200).astype(np.uint8)
  # One value holds most pixels (PIL leaves the last non-empty bin out of its step).
  dominant = np.where(rng.random((20, 28, 3)) < 0.8, 255, full).astype(np.uint8)
  return [full, narrow, flat, two, dominant, _smooth()]


def test_equalize_forms_equal_pils():
  image_lib = pytest.importorskip('PIL.Image', reason="compares with PIL's ImageOps.equalize")
  image_ops = pytest.importorskip('PIL.ImageOps')
  for image in _equalize_cases():
    want = np.asarray(image_ops.equalize(image_lib.fromarray(image)))
    for form in ba.FORMS:  # 'gather': bincount + gather; 'matmul': compares only (TPUs).
      np.testing.assert_array_equal(ba.equalize(jnp.asarray(image), form), want, err_msg=form)


def test_equalize_chosen_changes_the_chosen_images_only():
  # Over 255 pixels a channel: below that PIL's step is 0 and equalize leaves an image as it is.
  images = np.stack([_image(20, 28, s) // (1 + s % 4) for s in range(11)])
  equalized = np.stack([ba.equalize(jnp.asarray(image)) for image in images])
  assert np.all(np.any(equalized != images, axis=(1, 2, 3)))
  chosen = np.asarray([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1], bool)  # 8 chosen: 3 chunks of 3.
  for form in ba.FORMS:
    run = jax.jit(lambda x, c, form=form: ba.equalize_chosen(x, c, form, chunk=3))
    out = np.asarray(run(jnp.asarray(images), jnp.asarray(chosen)))
    for image, want, got, picked in zip(images, equalized, out, chosen):
      np.testing.assert_array_equal(got, want if picked else image, err_msg=form)
    np.testing.assert_array_equal(run(jnp.asarray(images), jnp.zeros(11, bool)), images)
    # One chosen, the batch's last, and two empty slots, which must not write over it.
    out = np.asarray(run(jnp.asarray(images), jnp.asarray(np.arange(11) == 10)))
    np.testing.assert_array_equal(out[10], equalized[10], err_msg=form)
    np.testing.assert_array_equal(out[:10], images[:10], err_msg=form)


def _one_op_after_another(image, layers, flip):
  """timm's order, op by op: flip, then each layer's op where applied; and how many of the
  applied ops were geometric."""
  if flip:
    image = image[:, ::-1]
  moved = 0
  for op, applied, magnitude, negate in layers:
    if bool(applied):
      name = POLICY.ops[int(op)]
      moved += name in policies.GEOMETRIC_OPS
      image = ba.apply_op(image, name, magnitude, negate)
  return np.asarray(image), moved


def test_randaugment_batch_applies_timms_order_with_one_warp():
  image = jnp.asarray(_smooth())
  keys = jax.random.split(jax.random.key(2), 48)
  flips = jnp.asarray(np.arange(48) % 2 == 1)
  for form in ba.FORMS:
    out = jax.jit(lambda x, k, f, form=form: ba.randaugment_batch(
        jnp.broadcast_to(x, (48,) + x.shape), k, POLICY, form=form, flip=f))(image, keys, flips)
    # Drawn as randaugment_batch draws them (under vmap: the 'rbg' generator's draws differ
    # from unbatched ones).
    layers = jax.vmap(lambda k: [ba.layer_parameters(layer_key, POLICY) for layer_key in
                                 jax.random.split(k, POLICY.num_layers)])(keys)
    for b, (got, flip) in enumerate(zip(np.asarray(out), np.asarray(flips))):
      drawn = [[x[b] for x in layer] for layer in layers]
      want, moved = _one_op_after_another(image, drawn, flip)
      diff = np.abs(got.astype(int) - want.astype(int))
      if moved < 2:  # The same ops in the same order: the same image.
        assert diff.max() <= (0 if form == 'gather' else 1), (form, moved, diff.max())
      else:  # Two warps composed: the same geometry, one interpolation fewer.
        assert np.median(diff) <= 2, (form, np.median(diff))
