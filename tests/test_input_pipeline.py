"""The input pipeline on a miniature ImageNet in the release format and in the folder layout.

The release-format tars are prepared with TFDS's own `imagenet2012` builder (through
`rmt_jax.prepare_imagenet`); batches are checked for shapes, dtypes and ranges, the
per-process split for disjoint train data and exactly-once eval, and the iterator for
seeded determinism and exact resumption.
"""

import json
import os
import sys

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow', reason='the input pipeline runs on tf.data')
pytest.importorskip('tensorflow_datasets', reason='the pipeline reads ImageNet through TFDS')

import jax  # pylint: disable=g-import-not-at-top
import imagenet_fixture
from rmt_jax.data import augment
from rmt_jax.data import input_pipeline
from rmt_jax import prepare_imagenet

NUM_VAL = 12
TRAIN_PER_CLASS = 2  # 12 synsets -> 24 train images.
IMAGE_SIZE = 16
LOW = min((0 - m) / s for m, s in zip(augment.MEAN_RGB, augment.STDDEV_RGB))
HIGH = max((255 - m) / s for m, s in zip(augment.MEAN_RGB, augment.STDDEV_RGB))


def _hash(names) -> dict[int, str]:
  ids = tf.strings.to_hash_bucket_fast(list(names), 2**62).numpy()
  return dict(zip(ids.tolist(), names))


@pytest.fixture(scope='module')
def tfds_imagenet(tmp_path_factory):
  """(config, {example_id: label} for train, same for eval)."""
  root = tmp_path_factory.mktemp('tfds')
  mini = imagenet_fixture.write_imagenet_tars(
      str(root / 'manual'), num_val=NUM_VAL, train_per_class=TRAIN_PER_CLASS)
  prepare_imagenet.prepare(str(root / 'data'), str(root / 'manual'))
  cfg = _config(dataset='imagenet2012', data_dir=str(root / 'data'))
  train = {i: mini.train_labels[n] for i, n in _hash(mini.train_labels).items()}
  val = {i: mini.val_labels[n] for i, n in _hash(mini.val_labels).items()}
  return cfg, train, val


@pytest.fixture(scope='module')
def folder_imagenet(tmp_path_factory):
  root = tmp_path_factory.mktemp('folder')
  mini = imagenet_fixture.write_image_folder(str(root), num_val=NUM_VAL,
                                             train_per_class=TRAIN_PER_CLASS)
  def paths(split, labels):
    return {os.path.join(str(root), split, mini.synsets[label], name): label
            for name, label in labels.items()}
  train, val = paths('train', mini.train_labels), paths('val', mini.val_labels)
  cfg = _config(dataset='folder', folder_root=str(root))
  return (cfg, {i: train[p] for i, p in _hash(train).items()},
          {i: val[p] for i, p in _hash(val).items()})


@pytest.fixture(params=['tfds', 'folder'])
def imagenet(request):
  return request.getfixturevalue(f'{request.param}_imagenet')


def _config(**overrides):
  cfg = input_pipeline.default_config()
  cfg.image_size = IMAGE_SIZE
  cfg.with_example_id = True
  cfg.shuffle_buffer = 64
  cfg.device_prefetch = 1
  cfg.update(overrides)
  return cfg


def _plain(cfg):
  """The config with every train augmentation switched off."""
  cfg = cfg.copy_and_resolve_references()
  cfg.randaugment, cfg.reprob, cfg.mixup, cfg.cutmix = '', 0.0, 0.0, 0.0
  cfg.repeated_aug = False
  return cfg


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_missing_tfds_data_says_which_files_go_where(tmp_path):
  cfg = _config(dataset='imagenet2012', data_dir=str(tmp_path / 'data'),
                manual_dir=str(tmp_path / 'tars'))
  with pytest.raises(input_pipeline.DataNotFoundError) as error:
    input_pipeline.create_train_iterator(cfg, global_batch_size=8, seed=0)
  message = str(error.value)
  for part in (str(tmp_path / 'tars' / 'ILSVRC2012_img_train.tar'),
               str(tmp_path / 'tars' / 'ILSVRC2012_img_val.tar'),
               f'python -m rmt_jax.prepare_imagenet --data_dir={tmp_path / "data"} '
               f'--manual_dir={tmp_path / "tars"}'):
    assert part in message
  with pytest.raises(input_pipeline.DataNotFoundError):
    input_pipeline.num_examples(cfg, 'eval')


def test_missing_folder_says_which_layout(tmp_path):
  cfg = _config(dataset='folder', folder_root=str(tmp_path / 'nowhere'))
  with pytest.raises(input_pipeline.DataNotFoundError, match=r'train/<class name>'):
    input_pipeline.num_examples(cfg, 'train')


def test_num_examples(imagenet):
  cfg, train, val = imagenet
  assert input_pipeline.num_examples(cfg, 'train') == len(train) == 24
  assert input_pipeline.num_examples(cfg, 'eval') == len(val) == NUM_VAL


def test_train_batches_with_the_official_recipe(imagenet):
  cfg, train, _ = imagenet
  it = input_pipeline.create_train_iterator(cfg, global_batch_size=8, seed=0)
  for batch in _take(it, 3):
    assert batch['image'].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch['image'].dtype == np.float32 and np.all(np.isfinite(batch['image']))
    assert batch['label'].shape == (8, 1000) and batch['label'].dtype == np.float32
    np.testing.assert_allclose(batch['label'].sum(1), 1.0, rtol=1e-5)
    assert batch['label'].min() >= 0
    # Smoothing puts 0.1/1000 everywhere; the rest sits on this batch's (mixed) classes.
    heavy = set(np.nonzero(batch['label'] > 0.01)[1].tolist())
    assert heavy <= {train[i] for i in batch['example_id'].tolist()}


def test_train_batches_without_augmentation(imagenet):
  cfg, train, _ = imagenet
  it = input_pipeline.create_train_iterator(_plain(cfg), global_batch_size=8, seed=0)
  batch = next(it)
  image = batch['image']
  assert LOW - 1e-5 <= image.min() and image.max() <= HIGH + 1e-5
  assert image.std() > 0.1  # Real content, not a constant.
  labels = [train[i] for i in batch['example_id'].tolist()]
  np.testing.assert_array_equal(batch['label'].argmax(1), labels)
  np.testing.assert_allclose(batch['label'].max(1), 0.9 + 0.1 / 1000, rtol=1e-6)


def test_device_augmentation_gets_the_uint8_crops(folder_imagenet):
  from rmt_jax.data import batch_augment  # pylint: disable=g-import-not-at-top
  cfg, train, _ = folder_imagenet
  cfg = cfg.copy_and_resolve_references()
  cfg.augment_on = 'device'
  batch = next(input_pipeline.create_train_iterator(cfg, global_batch_size=6, seed=0))
  assert batch['image'].shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch['image'].dtype == np.uint8 and batch['image'].std() > 10
  assert batch['label'].dtype == np.int32
  np.testing.assert_array_equal(batch['label'], [train[i] for i in batch['example_id']])
  recipe = batch_augment.BatchRecipe.from_config(cfg)
  images, targets = jax.jit(batch_augment.augment, static_argnums=3)(
      batch['image'], batch['label'], jax.random.key(0), recipe)
  assert images.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.float32
  assert targets.shape == (6, 1000)
  np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, rtol=1e-5)
  cfg.augment_on = 'tpu'
  with pytest.raises(ValueError, match="'host' or 'device'"):
    next(input_pipeline.create_train_iterator(cfg, global_batch_size=6, seed=0))


@pytest.mark.parametrize('process_count', [2, 5])
def test_eval_counts_every_image_exactly_once_across_processes(imagenet, process_count):
  cfg, _, val = imagenet
  global_batch = 2 * process_count
  seen, num_batches = [], set()
  for index in range(process_count):
    batches = list(input_pipeline.create_eval_iterator(
        cfg, global_batch_size=global_batch, process_index=index,
        process_count=process_count))
    num_batches.add(len(batches))
    for b in batches:
      assert b['image'].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
      assert b['image'].dtype == np.float32 and b['label'].dtype == np.int32
      assert b['mask'].dtype == np.float32
      assert LOW - 1e-5 <= b['image'].min() and b['image'].max() <= HIGH + 1e-5
      for i, label, mask in zip(b['example_id'].tolist(), b['label'], b['mask']):
        if mask:
          seen.append(i)
          assert label == val[i]
        else:
          assert i == -1
  assert len(num_batches) == 1  # Same number of batches on every process.
  assert sorted(seen) == sorted(val)


def test_two_processes_read_disjoint_train_data(imagenet):
  cfg, train, _ = imagenet
  per_process = []
  for index in range(2):
    it = input_pipeline.create_train_iterator(
        _plain(cfg), global_batch_size=8, seed=0, process_index=index, process_count=2)
    assert it.steps_per_epoch == 3  # 12 examples per process, batches of 4.
    epochs = [np.concatenate([b['example_id'] for b in _take(it, 3)]) for _ in range(2)]
    assert len(set(epochs[0].tolist())) == 12
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist())  # Same slice ...
    assert epochs[0].tolist() != epochs[1].tolist()  # ... reshuffled each epoch.
    per_process.append(set(epochs[0].tolist()))
  assert not per_process[0] & per_process[1]
  assert per_process[0] | per_process[1] == set(train)


def test_same_seed_same_batches_and_exact_resume(imagenet):
  cfg, _, _ = imagenet  # Full recipe: repeated augmentation, RandAugment, Mixup.
  reference = _take(input_pipeline.create_train_iterator(cfg, global_batch_size=4, seed=3), 9)
  again = input_pipeline.create_train_iterator(cfg, global_batch_size=4, seed=3)
  first = _take(again, 4)  # 6 steps per epoch: resume mid-epoch, run past its end.
  for a, b in zip(reference, first):
    for key in ('image', 'label', 'example_id'):
      np.testing.assert_array_equal(a[key], b[key])
  state = json.loads(json.dumps(again.get_state()))
  assert state['epoch'] == 0 and state['step_in_epoch'] == 4
  resumed = input_pipeline.create_train_iterator(cfg, global_batch_size=4, seed=3)
  resumed.set_state(state)
  for a, b in zip(reference[4:], _take(resumed, 5)):
    for key in ('image', 'label', 'example_id'):
      np.testing.assert_array_equal(a[key], b[key])
  other = next(input_pipeline.create_train_iterator(cfg, global_batch_size=4, seed=4))
  assert not np.array_equal(other['image'], reference[0]['image'])


def test_repeated_augmentation_spreads_copies(tfds_imagenet):
  cfg, _, _ = tfds_imagenet
  cfg = _plain(cfg)
  cfg.repeated_aug, cfg.num_repeats = True, 3
  cfg.reprob = 1.0  # Each copy erased differently: copies must not be identical.
  it = input_pipeline.create_train_iterator(cfg, global_batch_size=6, seed=0)
  batches = _take(it, it.steps_per_epoch)
  ids = np.concatenate([b['example_id'] for b in batches])
  counts = np.unique(ids, return_counts=True)[1]
  assert len(counts) == 8 and np.all(counts == 3)  # 24 per epoch = 8 images x 3.
  for b in batches:
    # Copy c of each image sits in the c-th third of the batch.
    np.testing.assert_array_equal(b['example_id'][:2], b['example_id'][2:4])
    np.testing.assert_array_equal(b['example_id'][:2], b['example_id'][4:])
    assert not np.array_equal(b['image'][0], b['image'][2])


def test_mesh_sharding_gives_global_arrays(tfds_imagenet):
  cfg, _, _ = tfds_imagenet
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  batch = next(input_pipeline.create_train_iterator(
      cfg, global_batch_size=4, seed=0, mesh_sharding=sharding))
  assert set(batch) == {'image', 'label'}
  assert isinstance(batch['image'], jax.Array) and batch['image'].sharding == sharding
  assert batch['image'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
  batches = list(input_pipeline.create_eval_iterator(cfg, global_batch_size=5,
                                                     mesh_sharding=sharding))
  assert len(batches) == 3 and float(sum(b['mask'].sum() for b in batches)) == NUM_VAL
  assert batches[0]['label'].dtype == np.int32


def test_batch_size_errors(tfds_imagenet):
  cfg, _, _ = tfds_imagenet
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    input_pipeline.create_train_iterator(cfg, global_batch_size=5, seed=0, process_index=0,
                                         process_count=2)
  with pytest.raises(ValueError, match='must be even'):
    input_pipeline.create_train_iterator(cfg, global_batch_size=3, seed=0)
  with pytest.raises(ValueError, match='fewer than its batch'):
    input_pipeline.create_train_iterator(cfg, global_batch_size=32, seed=0)


def test_digits_demo_trains_offline(tmp_path):
  cfg = input_pipeline.default_config()
  cfg.update(dataset='digits', data_dir=str(tmp_path), image_size=32, num_classes=10,
             randaugment='', reprob=0.0, mixup=0.0, cutmix=0.0, repeated_aug=False)
  assert input_pipeline.num_examples(cfg, 'train') == 1437
  assert input_pipeline.num_examples(cfg, 'eval') == 360
  assert os.path.isdir(tmp_path / 'rmt_digits' / 'val' / '9')
  batch = next(input_pipeline.create_train_iterator(cfg, global_batch_size=64, seed=0))
  assert batch['image'].shape == (64, 32, 32, 3) and batch['label'].shape == (64, 10)
  np.testing.assert_allclose(batch['label'].sum(1), 1.0, rtol=1e-6)
  eval_batches = list(input_pipeline.create_eval_iterator(cfg, global_batch_size=128))
  assert len(eval_batches) == 3
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in eval_batches])
  assert len(labels) == 360 and np.all(np.bincount(labels, minlength=10) >= 35)


def test_benchmark_command_runs(tmp_path, capsys):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import input_pipeline as benchmark  # pylint: disable=g-import-not-at-top
  benchmark.main(['--num_images=8', '--source_height=20', '--source_width=24',
                  '--image_size=16', '--batch_size=4', '--warmup_batches=1', '--batches=1',
                  '--repeats=1', '--skip_seconds=0.1', f'--work_dir={tmp_path}', '--breakdown',
                  '--device_batch=4', f'--json={tmp_path / "rates.json"}'])
  out = capsys.readouterr().out
  for row in ('decode (bare decode_jpeg)', 'train (official recipe)', 'eval (resize',
              'train, host part (device aug.)', 'device part (batch_augment.augment',
              'first batch: fresh iterator', 'records per CPU second', 'decode the crop window',
              'RandAugment Rotate', 'Mixup/CutMix'):
    assert row in out
  with open(tmp_path / 'rates.json') as f:
    rates = json.load(f)
  assert {'decode', 'train', 'train_crop_flip', 'train_host_part', 'eval'} <= set(rates)
  assert all(r['images_per_cpu_second'] > 0 for k, r in rates.items() if k != 'device_part')
  assert rates['device_part']['ms_per_batch'] > 0


def test_benchmark_gives_the_device_part_as_a_share_of_the_train_step(tmp_path):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import input_pipeline as benchmark  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'rmt_s_train.json'  # As `rmt_jax.tpu_compile --json` writes it.
  path.write_text(json.dumps({'topology': 'v5p:2x2x1', 'images_per_chip': 64.0, 'model': 'rmt_s',
                              'train': {'estimated_step_seconds': 0.0154}}))
  share = benchmark.train_step_share(str(path), 0.308, 'v5p:2x2x1', 64)
  assert share['train_step_ms'] == pytest.approx(15.4)
  assert share['percent_of_train_step'] == pytest.approx(2.0)
  assert share['train_step_augment_on'] == 'host' and share['train_step_model'] == 'rmt_s'
  with pytest.raises(ValueError, match='not v5p:2x2x1 at 128'):
    benchmark.train_step_share(str(path), 0.308, 'v5p:2x2x1', 128)
