"""Tests of the segmentation task: the digit mosaics (`rmt_jax.data.mosaics`), the Semantic FPN
head (`rmt_jax.models.dense_heads`), the segmentation step and its metrics
(`rmt_jax.train.segmentation`), and `main.py` running `configs/segmentation_demo.py:tiny`."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmt_jax.data import mosaics
from rmt_jax.models import dense_heads
from rmt_jax.train import segmentation
from rmt_jax.train import steps
from conftest import main_env  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parents[1]


def _digits():
  rng = np.random.default_rng(0)
  return rng.uniform(0, 1, (20, 8, 8)).astype(np.float32), np.arange(20, dtype=np.int32) % 10


def test_upscaling_is_bilinear_and_keeps_a_constant():
  weights = mosaics._bilinear_matrix(20)  # pylint: disable=protected-access
  np.testing.assert_allclose(weights.sum(1), 1.0)
  np.testing.assert_allclose(mosaics.upscale(np.full((8, 8), 0.75), 13), 0.75)
  # Twice as large: each output pixel is 3/4 of its nearest source pixel and 1/4 of the next.
  ramp = np.tile(np.arange(8.0) / 8, (8, 1))
  np.testing.assert_allclose(mosaics.upscale(ramp, 16)[0, 3], 0.75 * ramp[0, 1] + 0.25 * ramp[0, 2])


def test_mosaics_are_deterministic_per_seed_and_labels_match_the_pasted_digits():
  digits, labels = _digits()
  spec = mosaics.MosaicSpec(canvas_size=48, digits=(2, 4), digit_size=(10, 20), ink_threshold=0.4)
  a = mosaics.compose_batch(7, 0, 6, digits, labels, spec)
  b = mosaics.compose_batch(7, 0, 6, digits, labels, spec)
  c = mosaics.compose_batch(8, 0, 6, digits, labels, spec)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  # Mosaic i depends on (seed, i) alone: a batch starting later holds the same mosaics.
  np.testing.assert_array_equal(mosaics.compose_batch(7, 2, 2, digits, labels, spec)[1], a[1][2:4])

  pasted = 0
  for i in range(30):
    image, label, placed = mosaics.compose(np.random.default_rng((3, i)), digits, labels, spec)
    assert image.shape == (48, 48, 3) and label.shape == (48, 48)
    outside = np.ones((48, 48), bool)
    for p in placed:
      box = np.s_[p.top:p.top + p.size, p.left:p.left + p.size]
      assert outside[box].all(), 'boxes overlap'
      outside[box] = False
      ink = mosaics.upscale(digits[p.index], p.size)
      assert p.digit == labels[p.index] and 10 <= p.size <= 20
      np.testing.assert_array_equal(label[box], np.where(ink >= 0.4, p.digit + 1, 0))
      np.testing.assert_array_equal(image[box][..., 0], np.round(ink * 255).astype(np.uint8))
      pasted += 1
    assert (label[outside] == 0).all() and (image[outside] == 0).all()
    assert 2 <= len(placed) <= 4 or outside.sum() < 48 * 48 / 2
  assert pasted >= 60


def test_held_out_mosaics_are_fixed_and_made_of_held_out_digits(monkeypatch):
  calls = []

  def digit_split(split):
    calls.append(split)
    return _digits()

  monkeypatch.setattr(mosaics.sources, 'digit_split', digit_split)
  from configs import segmentation_demo  # pylint: disable=g-import-not-at-top
  data = segmentation_demo.get_config('tiny').data
  first = mosaics.MosaicEvalSet(data, global_batch_size=4)
  second = mosaics.MosaicEvalSet(data, global_batch_size=4)
  assert calls == ['val', 'val']
  np.testing.assert_array_equal(first.labels, second.labels)
  batches = list(first)
  assert len(batches) == 3  # 10 mosaics: two full batches and one with 2 padded.
  np.testing.assert_array_equal(batches[-1]['mask'], [1, 1, 0, 0])
  np.testing.assert_array_equal(batches[1]['label'], first.labels[4:8])


class _FixedLogits:
  """Stands in for a network: returns the logits it was given."""

  def __init__(self, logits):
    self.logits = logits

  def apply(self, variables, images, train=False):
    del variables, images, train
    return self.logits


def test_miou_pixel_accuracy_and_class_ious_equal_a_hand_count():
  # Two 2x4 label maps, classes 0..2; the second image is padding (mask 0) and counts nowhere.
  labels = np.array([[[0, 0, 1, 1], [0, 2, 2, 1]], [[1, 1, 1, 1], [1, 1, 1, 1]]])
  predicted = np.array([[[0, 1, 1, 1], [0, 2, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
  logits = jax.nn.one_hot(predicted, 3) * 5.0
  batch = {'image': jnp.zeros((2, 2, 4, 3)), 'label': jnp.asarray(labels),
           'mask': jnp.array([1.0, 0.0])}
  sums = jax.jit(lambda b: segmentation.eval_step(
      _FixedLogits(logits), {'raw': {'params': {}, 'batch_stats': {}}}, b))(batch)['raw']
  # By hand, image 1 only. Class 0: true at 3 pixels, predicted at 4, both at 2: IoU 2 / 5.
  # Class 1: true 3, predicted 3, both 2: 2 / 4. Class 2: true 2, predicted 1, both 1: 1 / 2.
  np.testing.assert_array_equal(sums['confusion'], [[2, 1, 0], [1, 2, 0], [1, 0, 1]])
  assert float(sums['pixels']) == 8
  metrics = segmentation.iou_metrics(sums['confusion'], ['bg', 'a', 'b'])
  assert metrics['iou/bg'] == pytest.approx(2 / 5)
  assert metrics['iou/a'] == pytest.approx(2 / 4)
  assert metrics['iou/b'] == pytest.approx(1 / 2)
  assert metrics['miou'] == pytest.approx((2 / 5 + 2 / 4 + 1 / 2) / 3)
  assert metrics['pixel_accuracy'] == pytest.approx(5 / 8)
  # A class absent from labels and predictions is left out of the mean (mmseg's nanmean).
  four = np.zeros((4, 4))
  four[:3, :3] = sums['confusion']
  assert segmentation.iou_metrics(four)['miou'] == pytest.approx(metrics['miou'])
  assert 'iou/3' not in segmentation.iou_metrics(four)
  np.testing.assert_array_equal(sums['prediction'], predicted)


def test_backbone_weights_go_under_the_backbone_and_a_run_s_fit_as_they_are():
  task = segmentation.Segmentation('/nonexistent')
  backbone = {'params': {'patch_embed': 1, 'extra_norms_0': 2}, 'batch_stats': {'patch_embed': 3}}
  assert task.variables_for_network(backbone) == {
      'params': {'backbone': backbone['params']},
      'batch_stats': {'backbone': backbone['batch_stats']}}
  run = {'params': {'backbone': {'a': 1}, 'head': {'b': 2}}, 'batch_stats': {}}
  assert task.variables_for_network(run) == run


def test_the_config_picks_the_task():
  from configs import demo, segmentation_demo  # pylint: disable=g-import-not-at-top
  from rmt_jax.train import loop  # pylint: disable=g-import-not-at-top
  assert loop.task_for(demo.get_config(), '/w').name == 'classification'
  assert loop.task_for(segmentation_demo.get_config(), '/w').name == 'segmentation'
  config = segmentation_demo.get_config('tiny')
  config.task = 'detection'
  with pytest.raises(ValueError, match="config.task must be one of"):
    loop.task_for(config, '/w')


class _ToyBackbone(nn.Module):
  """Strided convs: maps at strides 4, 8, ..., as a backbone returns them (each stride-2 conv
  rounds an odd size up, as RMT's do)."""
  levels: int = 2

  @nn.compact
  def __call__(self, images, train=False):
    del train
    maps = [nn.Conv(8, (4, 4), strides=4, padding='VALID')(images)]
    for _ in range(self.levels - 1):
      maps.append(nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)))(nn.relu(maps[-1])))
    return tuple(maps)


def test_a_segmenter_fits_fixed_mosaics_its_loss_falls():
  """The segmentation step (pixel cross-entropy through `steps.train_step`) and the Semantic
  FPN head: a few AdamW steps on one batch of mosaics lower the loss (a toy backbone keeps the
  compile short; the RMT backbone trains in test_main_trains_the_tiny_demo_and_resumes)."""
  import optax  # pylint: disable=g-import-not-at-top
  model = dense_heads.SemanticSegmenter(
      backbone=_ToyBackbone(),
      head=dense_heads.SemanticFPN(num_classes=mosaics.NUM_CLASSES, channels=16,
                                   head_channels=16, norm_groups=4))
  tx = optax.adam(3e-2)
  state = jax.jit(lambda: steps.init_state(jax.random.PRNGKey(0), model, tx, image_size=32))()
  digits, labels = _digits()
  images, maps = mosaics.compose_batch(
      0, 0, 4, digits, labels, mosaics.MosaicSpec(canvas_size=32, digits=(2, 2),
                                                  digit_size=(12, 16)))
  batch = {'image': jnp.asarray(mosaics.normalize(images)), 'label': jnp.asarray(maps, jnp.int32)}
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, tx=tx, ema=0.0,
                                               criterion=segmentation.pixel_cross_entropy))
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[0] == pytest.approx(np.log(mosaics.NUM_CLASSES), rel=0.05)
  assert losses[-1] < 0.5 * losses[0], losses


def test_semantic_fpn_lands_on_the_input_size_from_odd_sized_maps():
  segmenter = dense_heads.SemanticSegmenter(
      backbone=_ToyBackbone(levels=4),
      head=dense_heads.SemanticFPN(num_classes=5, channels=8, head_channels=8, norm_groups=2))
  images = jnp.zeros((1, 40, 56, 3))  # Stride-4 map 10x14; then 5x7, 3x4, 2x2.
  shapes = jax.eval_shape(lambda: segmenter.init(jax.random.PRNGKey(0), images))
  logits = jax.eval_shape(segmenter.apply, shapes, images)
  assert logits.shape == (1, 40, 56, 5)
  # One 3x3 stage for each of the two finest levels, two and three for the coarser ones.
  head = shapes['params']['head']
  assert sorted(k for k in head if k.endswith('_conv')) == [
      f'scale_heads_{i}_{j}_conv' for i in range(4) for j in range(max(i, 1))]
  backbone = dense_heads.create_segmenter('rmt_tiny', 5).backbone
  assert backbone.out_indices == (0, 1, 2, 3) and backbone.norm_eval


@pytest.mark.slow
def test_main_trains_the_tiny_demo_and_resumes(tmp_path_factory):
  """`main.py` with `configs/segmentation_demo.py:tiny`: the RMT segmenter's loss falls, the
  held-out mIoU and class IoUs reach metrics.jsonl, the picture is written; a second run
  finds the run complete and only evaluates."""
  env = main_env(tmp_path_factory.mktemp('jax_cache'))
  workdir = tmp_path_factory.mktemp('seg') / 'run'
  args = [sys.executable, str(REPO / 'main.py'), '--config',
          str(REPO / 'configs/segmentation_demo.py') + ':tiny', '--workdir', str(workdir)]
  for _ in range(2):
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  events = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [e['loss'] for e in events if e['split'] == 'train']
  assert len(train) == 12 and np.mean(train[-3:]) < np.mean(train[:3]), train
  evals = [e for e in events if e['split'] == 'eval']
  assert len(evals) == 2 and evals[0]['step'] == evals[1]['step'] == 12
  assert evals[0]['miou'] == pytest.approx(evals[1]['miou'])
  assert 0 <= evals[0]['miou'] <= 1 and 'iou/background' in evals[0]
  assert 'The run is complete' in proc.stderr
  assert (workdir / segmentation.SAMPLES_FILE).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  # Backbone weights (as `convert torch2flax --backbone` writes them) start a run: they go
  # under 'backbone', the head starts afresh.
  from configs import segmentation_demo  # pylint: disable=g-import-not-at-top
  from rmt_jax.weights import checkpoint  # pylint: disable=g-import-not-at-top
  config = segmentation_demo.get_config('tiny')
  overrides = segmentation.backbone_overrides(config)
  backbone = segmentation.build_model(config).backbone
  variables = jax.jit(lambda: backbone.init(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3))))()
  weights = tmp_path_factory.mktemp('weights') / 'backbone'
  checkpoint.save_variables(weights, variables, {'model': config.model, 'backbone': True,
                                                 'model_overrides': overrides})
  proc = subprocess.run(args[:-1] + [str(workdir) + '_init', f'--config.init_from={weights}'],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'from init_from {weights}' in proc.stderr
