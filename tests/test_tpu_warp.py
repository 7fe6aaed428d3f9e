"""RandAugment's affine warp as a Pallas kernel (`kernels.tpu.warp`) against the plain form
(`batch_augment.affine`), in Pallas's interpreter; the policy's scale bound it is sized by; its
place in the train step's augmentation and in the on-device check; its Mosaic compile for a v5p
and a v4."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_libtpu
from kernel_checks import KERNELS_IN_HBM, COMPILE_HEAD, run_script
from rmt_jax.data import batch_augment
from rmt_jax.data import policies
from rmt_jax.kernels import check
from rmt_jax.kernels.tpu import operations
from rmt_jax.kernels.tpu import warp
from rmt_jax.train import device_augment
from rmt_jax.train import kernel_check

_FILL = policies.DEFAULT_FILL
_POLICY = policies.parse_policy('rand-m9-mstd0.5-inc1')


def _rotation(degrees, height, width):
  return batch_augment.geometric_matrix('Rotate', jnp.float32(degrees / 30), False, height,
                                        width)


def _maps(height, width):
  """One map of each kind the kernel treats apart: identity; integer and fractional
  translations; shears along x and y (per-line shifts); rotations (scaled passes, 60 degrees:
  both layers' rotations composed, the default policy's largest scale, 2); the flip alone and
  composed with a rotation and a shear (reversed lines)."""
  flip = batch_augment.mirror_matrix(width)
  shear_x = batch_augment.geometric_matrix('ShearX', jnp.float32(1.0), True, height, width)
  shear_y = batch_augment.geometric_matrix('ShearY', jnp.float32(0.7), False, height, width)
  compose = batch_augment.compose
  return jnp.stack([
      jnp.asarray(batch_augment.IDENTITY), jnp.asarray([1.0, 0, 7, 0, 1, -3]),
      jnp.asarray([1.0, 0, -2.6, 0, 1, 4.3]), shear_x, shear_y, _rotation(27, height, width),
      compose(_rotation(30, height, width), _rotation(30, height, width)), flip,
      compose(flip, _rotation(-20, height, width)), compose(compose(flip, shear_y), shear_x)])


def _images(batch, height, width, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3),
                                                          dtype=np.uint8))


@pytest.mark.parametrize('height,width', [
    (20, 36), pytest.param(33, 17, marks=pytest.mark.slow)])  # odd sizes: ~11 s
def test_equals_the_plain_form_within_a_grey_level(height, width):
  maps = _maps(height, width)
  images = _images(len(maps), height, width)
  got = np.asarray(warp.affine_warp(images, maps, fill=_FILL, max_scale=2.0, interpret=True),
                   np.int32)
  want = np.asarray(batch_augment.plain_warp(_FILL, 'gather')(images, maps), np.int32)
  difference = np.abs(got - want)
  # Both sample the same positions; they round them differently (the plain form adds the
  # offset to s m before taking the fraction), which moves a value that lands on a half grey
  # level by one.
  assert difference.max() <= 1
  assert (difference > 0).mean() < 0.02
  # Maps with integer positions and the flip (no rounding to differ on) agree exactly.
  for i in (0, 1, 7):
    np.testing.assert_array_equal(got[i], want[i])
  assert (got[1] == 0).sum() < (got[1] == np.asarray(_FILL)).sum()  # the fill comes in


@pytest.mark.slow  # The interpreter on six 24 x 40 images: ~12 s on two CPU cores.
def test_sampled_maps_equal_the_plain_form():
  images, maps = warp.sample((6, 24, 40, 3), np.random.default_rng(1), max_scale=2.0)
  got = np.asarray(warp.affine_warp(images, maps, fill=_FILL, max_scale=2.0, interpret=True),
                   np.int32)
  want = np.asarray(batch_augment.plain_warp(_FILL, 'gather')(images, maps), np.int32)
  assert np.abs(got - want).max() <= 1
  assert not np.array_equal(np.asarray(images), got.astype(np.uint8))  # the maps move pixels


def test_scale_bound_of_the_policies():
  # The default policy: two rotations of 30 degrees in one warp, cos 60 = 1/2, so the pass
  # along x samples at 1 / (1/2) = 2.
  assert batch_augment.warp_scale_bound(_POLICY) == pytest.approx(2.0)
  shears = policies.RandAugmentPolicy(ops=('ShearX', 'ShearY'))
  # ShearY then ShearX at 0.3: e = 1 - 0.09 along y, so 1 / 0.91 along x.
  assert batch_augment.warp_scale_bound(shears) == pytest.approx(1 / 0.91)
  assert batch_augment.warp_scale_bound(policies.RandAugmentPolicy(ops=('Invert',))) == 1.0
  # 45 + 45 degrees: e = 0, which two passes cannot sample.
  assert math.isinf(batch_augment.warp_scale_bound(
      policies.parse_policy('rand-m9-mstd0.5-inc1-mmax15')))
  assert batch_augment.rotation_share(_POLICY) == pytest.approx(
      1 - (1 - 0.5 / len(_POLICY.ops)) ** 2)


def test_plans_and_declared_bytes():
  shape = warp.Shape(64, 224, 224, 2.0)
  assert (shape.line_lanes, shape.line_rows) == (512, 456)  # 2 x 223 + 3 taps, padded
  assert shape.fits_vmem
  assert not warp.fits_vmem((8, 1024, 1024, 3), 2.0)
  cost = warp.cost_estimate(shape, 0.1)
  assert cost.bytes_accessed == 64 * (2 * 3 * 224 * 224 + 36)  # uint8 planes, parameters
  assert warp.cost_estimate(shape, 1.0).flops > cost.flops > warp.cost_estimate(shape, 0).flops


def test_an_unfit_bound_runs_the_plain_form_and_says_so(caplog):
  images, maps = _images(2, 12, 16), _maps(12, 16)[:2]
  plain = batch_augment.plain_warp(_FILL, 'gather')
  got = operations.affine_warp(images, maps, fill=_FILL, max_scale=math.inf,
                               scaled_share=0.0, plain=plain)
  np.testing.assert_array_equal(got, plain(images, maps))
  assert any('affine warp' in r.message and 'plain form runs' in r.message
             for r in caplog.records)


def test_the_train_step_takes_it_where_its_kernels_are_the_tpus():
  assert device_augment.DeviceAugment.for_run(_config(kernels='tpu'), None).kernel
  assert not device_augment.DeviceAugment.for_run(_config(kernels='xla'), None).kernel
  assert not device_augment.DeviceAugment.for_run(_config(kernels='auto'), None).kernel  # CPU


@pytest.mark.slow  # Two RandAugment batches and a model's trace: ~23 s on two CPU cores.
def test_the_train_steps_augmentation_with_it_and_the_check_records_it():
  augment = device_augment.DeviceAugment.for_run(_config(kernels='tpu'), None)
  images = _images(8, 24, 40, seed=2)
  keys = jax.random.split(jax.random.key(3), 8)
  flip = jax.random.uniform(jax.random.key(4), (8,)) < 0.5
  want = batch_augment.randaugment_batch(images, keys, _POLICY, _FILL, 'gather', flip)
  got = batch_augment.randaugment_batch(images, keys, _POLICY, _FILL, 'gather', flip,
                                        augment.warp())
  assert np.abs(np.asarray(got, np.int32) - np.asarray(want, np.int32)).max() <= 1
  # The check: the network's kernels and then the warp, at the run's crops.
  from rmt_jax.models import create_model  # pylint: disable=g-import-not-at-top
  model = create_model('rmt_tiny', embed_dims=(8,), depths=(1,), num_heads=(2,),
                       init_values=(2,), heads_ranges=(4,), mlp_ratios=(2,), axial=(False,),
                       layerscales=(False,), remat=(False,), projection=8, num_classes=3)
  calls = kernel_check.record_calls(model, 2, 16, augment)
  assert str(calls[-1].key) == 'affine warp 16x16x3 uint8'


@pytest.mark.slow  # The interpreter runs each form twice: ~20 s on two CPU cores.
def test_the_check_keeps_a_correct_warp_and_drops_a_wrong_one(monkeypatch):
  augment = device_augment.DeviceAugment.for_run(_config(kernels='tpu'), None)
  with operations.recording() as recorded:
    jax.eval_shape(lambda x, y: augment.shard(x, y, jax.random.key(0), 0),
                   jax.ShapeDtypeStruct((4, 24, 40, 3), jnp.uint8),
                   jax.ShapeDtypeStruct((4,), jnp.int32))
  calls = list(recorded.values())
  [result] = check.check(calls, repeats=1, say=lambda line: None)
  assert result.failure is None and result.kernel_error < 2.0 ** -9, result
  right = warp.affine_warp
  # One pixel off along x: the kind of error a wrong rotation direction makes.
  monkeypatch.setattr(warp, 'affine_warp', lambda *a, **k: jnp.roll(right(*a, **k), 1, 2))
  [result] = check.check(calls, repeats=1, say=lambda line: None)
  assert result.chosen == 'plain' and result.failure.startswith('wrong: error ')


def _config(kernels):
  from configs import rmt_s  # pylint: disable=g-import-not-at-top
  config = rmt_s.get_config()
  config.kernels = kernels
  config.data.augment_on = 'device'
  return config


@needs_libtpu
def test_it_compiles_for_a_v5p_and_a_v4():
  # The train step's shapes (64 crops of 224 a chip, the default policy's bound), and small
  # odd ones; the operands kept in HBM.
  lines = run_script(COMPILE_HEAD + KERNELS_IN_HBM + '''
from rmt_jax.kernels.tpu import warp
for topology in ('v5p:2x2x1', 'v4:2x2x1'):
  chip = topologies.get_topology_desc(platform='tpu', topology_name=topology).devices[0]
  one = NamedSharding(Mesh(np.array([chip]), ('d',)), PartitionSpec())
  for batch, height, width in ((64, 224, 224), (3, 20, 36)):
    args = (jax.ShapeDtypeStruct((batch, height, width, 3), np.uint8, sharding=one),
            jax.ShapeDtypeStruct((batch, 6), np.float32, sharding=one))
    text = jax.jit(lambda x, m: warp.affine_warp(
        x, m, fill=(124, 116, 104), max_scale=2.0, scaled_share=0.07)).lower(
            *args).compile().as_text()
    print(chip.device_kind, in_hbm(text), text.count('custom_call_target="tpu_custom_call"'))
''', with_libtpu=True)
  assert [line.split()[-2:] for line in lines[:4]] == [['1', '1']] * 4, lines
  assert 'v4' in lines[2] and 'v4' not in lines[0], lines
