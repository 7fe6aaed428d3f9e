"""The input pipeline: disk -> tf.data -> per-process numpy batches -> global jax.Arrays.

`create_train_iterator` yields endless training batches with the official DeiT/RMT recipe
(random-resized crop, flip, RandAugment, random erasing, Mixup/CutMix + label smoothing,
optional repeated augmentation); `create_eval_iterator` makes one pass over the eval split
with the last batch padded and masked. Both read only this process's slice of the data
(`data_sources.py`) and, given a `NamedSharding`, assemble global arrays with
`jax.make_array_from_process_local_data`, a few batches ahead of the accelerator.

Determinism: epoch e's order is a function of (seed, process, e); each example's
augmentation draws from a seed folded from (seed, process, e, position in epoch), and each
batch's Mixup/CutMix from (seed, process, global step). The iterator's position is
(epoch, step in epoch); restoring rebuilds that epoch's order and skips the raw records
before the position, without decoding them.
"""

import collections
import itertools
import math
from typing import Any, Iterable, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from rmt_jax.data import augment
from rmt_jax.data import class_names as class_names_lib
from rmt_jax.data.config import default_config  # pylint: disable=unused-import
from rmt_jax.data import sources as data_sources
from rmt_jax.data import eval_preprocessing
from rmt_jax.data import mixup as mixup_lib
from rmt_jax.data import randaugment as randaugment_lib

DataError = data_sources.DataError
DataNotFoundError = data_sources.DataNotFoundError

_DEFAULT_SPLITS = {'imagenet2012': ('train', 'validation'), 'folder': ('train', 'val'),
                   'digits': ('train', 'val')}
_MAX_EPOCHS = 2**40


# ---------------------------------------------------------------------------------------
# Sources.

_SOURCES: dict[tuple, Any] = {}


def _source(cfg):
  """Opens (once per process) the dataset that `cfg.dataset` names."""
  key = (cfg.dataset, cfg.data_dir, cfg.manual_dir, cfg.folder_root, cfg.digits_dir,
         cfg.num_classes, cfg.shuffle_buffer, cfg.shuffle_cycle_length)
  if key not in _SOURCES:
    if cfg.dataset == 'folder':
      source = data_sources.FolderSource(cfg.folder_root, num_classes=cfg.num_classes)
    elif cfg.dataset == 'digits':
      data_dir, _ = data_sources.resolve_tfds_dirs(cfg.data_dir, cfg.manual_dir)
      root = cfg.digits_dir or f'{data_dir}/rmt_digits'
      source = data_sources.FolderSource(data_sources.materialize_digits(root),
                                         num_classes=cfg.num_classes)
    else:
      source = data_sources.TfdsSource(
          cfg.dataset, cfg.data_dir, cfg.manual_dir, cycle_length=cfg.shuffle_cycle_length,
          shuffle_buffer=cfg.shuffle_buffer)
    _SOURCES[key] = source
  return _SOURCES[key]


def _split_name(cfg, split: str) -> str:
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  train, evaluation = _DEFAULT_SPLITS.get(cfg.dataset, ('train', 'validation'))
  if split == 'train':
    return cfg.train_split or train
  return cfg.eval_split or evaluation


def class_names(config_data: ml_collections.ConfigDict) -> list[str] | None:
  """The classes' names in label order, stored with checkpoints so that `predict` prints them:
  the class folders of an image folder (and of the digits), ImageNet's readable names for
  TFDS `imagenet2012`, the label names of other TFDS datasets; None where there are none.
  One per output: cut or padded with label indices to `num_classes` (a folder may hold fewer
  classes than the head has outputs).

  Raises:
    DataNotFoundError: the dataset is not where the config says.
  """
  source = _source(config_data)
  if isinstance(source, data_sources.FolderSource):
    names = list(source.classes)
  elif config_data.dataset == 'imagenet2012':
    names = class_names_lib.imagenet_class_names()
  else:
    features = source.builder.info.features
    names = list(getattr(features['label'], 'names', None) or []) if 'label' in features else []
    if not names:
      return None
  num_classes = int(config_data.num_classes)
  return names[:num_classes] + [str(i) for i in range(len(names), num_classes)]


def num_examples(config_data: ml_collections.ConfigDict, split: str) -> int:
  """Examples in the whole 'train' or 'eval' split (all processes together).

  Raises:
    DataNotFoundError: the dataset is not where the config says.
  """
  return _source(config_data).num_examples(_split_name(config_data, split))


def _process(process_index, process_count, global_batch_size) -> tuple[int, int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} is not in [0, {count}).')
  if global_batch_size <= 0 or global_batch_size % count:
    raise ValueError(f'global_batch_size {global_batch_size} must be a positive multiple of '
                     f'the number of processes ({count}).')
  return index, count, global_batch_size // count


def _options(cfg) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if cfg.threadpool_size > 0:
    options.threading.private_threadpool_size = cfg.threadpool_size
  return options


# ---------------------------------------------------------------------------------------
# Per-example preprocessing.


def _on_device(cfg) -> bool:
  where = cfg.get('augment_on', 'host')
  if where not in ('host', 'device'):
    raise ValueError(f"config.data.augment_on must be 'host' or 'device', got {where!r}")
  return where == 'device'


def train_preprocess(raw: dict[str, tf.Tensor], seed: tf.Tensor,
                     cfg: ml_collections.ConfigDict) -> dict[str, tf.Tensor]:
  """Decoded, augmented, normalised float32 [S, S, 3] image from raw bytes + [2] seed; with
  `cfg.augment_on == 'device'`, the uint8 crop alone (the rest is `batch_augment.augment`)."""
  s_crop, s_flip, s_ra, s_erase = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  if cfg.random_resized_crop:
    image = augment.decode_and_random_resized_crop(
        raw['image'], s_crop, size=cfg.image_size, scale=tuple(cfg.rrc_scale),
        ratio=tuple(cfg.rrc_ratio), interpolation=cfg.interpolation)
  else:
    image = augment.decode_and_center_crop(raw['image'], size=cfg.image_size,
                                           crop_pct=cfg.crop_pct,
                                           interpolation=cfg.interpolation)
  if _on_device(cfg):
    image = tf.ensure_shape(image, [cfg.image_size, cfg.image_size, 3])
    return {'image': image, 'label': raw['label']}
  if cfg.hflip > 0:
    image = augment.random_horizontal_flip(image, s_flip, cfg.hflip)
  policy = randaugment_lib.parse_policy(cfg.randaugment)
  if policy is not None:
    image = randaugment_lib.randaugment(image, s_ra, policy)
  image = augment.normalize(image, cfg.mean, cfg.std)
  if cfg.reprob > 0:
    image = augment.random_erasing(image, s_erase, probability=cfg.reprob, mode=cfg.remode,
                                   min_area=cfg.re_min_area, max_area=cfg.re_max_area,
                                   min_aspect=cfg.re_min_aspect)
  image = tf.ensure_shape(image, [cfg.image_size, cfg.image_size, 3])
  return {'image': image, 'label': raw['label']}


def eval_preprocess(raw: dict[str, tf.Tensor], cfg: ml_collections.ConfigDict):
  """Decoded, centre-cropped, normalised float32 [S, S, 3] image from raw bytes: the
  evaluation preprocessing stored with the weights (`eval_preprocessing.from_config(cfg)`)."""
  image = augment.decode_and_center_crop(raw['image'], size=cfg.image_size,
                                         crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
  return {'image': augment.normalize(image, cfg.mean, cfg.std), 'label': raw['label']}


def with_eval_preprocessing(cfg: ml_collections.ConfigDict,
                            preprocessing: eval_preprocessing.EvalPreprocessing
                            ) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose evaluation preprocesses as `preprocessing` says (e.g. as the
  weights being evaluated were; see `rmt_jax.data.eval_preprocessing`)."""
  cfg = cfg.copy_and_resolve_references()
  cfg.image_size = preprocessing.image_size
  cfg.crop_pct = preprocessing.crop_pct
  cfg.interpolation = preprocessing.interpolation
  cfg.mean = tuple(preprocessing.mean)
  cfg.std = tuple(preprocessing.std)
  return cfg


def mixup_config(cfg: ml_collections.ConfigDict) -> mixup_lib.MixupConfig:
  return mixup_lib.MixupConfig(
      mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
      switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
      num_classes=cfg.num_classes)


# ---------------------------------------------------------------------------------------
# Train.


def _train_dataset(cfg, host: data_sources.HostSlice, *, local_batch: int, seed: int,
                   process_index: int, steps_per_epoch: int, start_epoch: int,
                   start_step: int) -> tf.data.Dataset:
  """Batches from (start_epoch, start_step) on, each epoch `steps_per_epoch` batches."""
  base = tf.constant([seed, process_index], tf.int64)
  fold = tf.random.experimental.stateless_fold_in
  order_base, example_base, mix_base = fold(base, 0), fold(base, 1), fold(base, 2)
  repeats = cfg.num_repeats if cfg.repeated_aug else 1
  per_epoch = steps_per_epoch * local_batch
  mix_cfg = mixup_config(cfg)
  with_id = cfg.with_example_id
  on_device = _on_device(cfg)

  def epoch_items(epoch):
    items = host.items(fold(order_base, epoch))
    if repeats > 1:
      items = items.flat_map(lambda x: tf.data.Dataset.from_tensors(x).repeat(repeats))
    items = items.take(per_epoch).enumerate()
    skip = tf.where(epoch == start_epoch, tf.constant(start_step * local_batch, tf.int64), 0)
    return items.skip(skip).map(lambda pos, item: (epoch, pos, item))

  def preprocess(epoch, pos, item):
    raw = host.decode(item)
    example = train_preprocess(raw, fold(fold(example_base, epoch), pos), cfg)
    example['step'] = epoch * steps_per_epoch + pos // local_batch
    example['copy'] = pos % repeats
    if with_id:
      example['example_id'] = raw['example_id']
    return example

  def mix(batch):
    copy = batch.pop('copy')
    if repeats > 1:
      # Copy c of every image moves to the c-th part of the batch, so that an image's copies
      # land on different devices, as timm's RASampler sends them to different GPUs.
      order = tf.argsort(copy * local_batch + tf.range(local_batch, dtype=tf.int64),
                         stable=True)
      batch = {k: tf.gather(v, order) for k, v in batch.items()}
    step = batch.pop('step')[0]
    if on_device:  # Mixup/CutMix and the rest: `batch_augment.augment` in the step.
      return batch
    batch['image'], batch['label'] = mixup_lib.mix_batch(
        batch['image'], batch['label'], fold(mix_base, step), mix_cfg)
    return batch

  ds = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch_items)
  ds = ds.map(preprocess, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(mix, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
  return ds.prefetch(cfg.prefetch_batches).with_options(_options(cfg))


def _numpy_batches(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """`ds.as_numpy_iterator()`, with an image file that the source refused raised as a
  `DataError` naming the file (TensorFlow's own error names no file)."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      path = data_sources.unreadable_image_path(e)
      if path is None:
        raise
      raise DataError(f'{path} is not a JPEG or PNG image (unreadable, empty or another '
                      'format); convert it to JPEG or PNG or remove it') from None
    yield batch


def _prefetch(iterator: Iterator, size: int) -> Iterator:
  """Keeps `size` items (device arrays: transfers in flight) ahead of the consumer."""
  queue = collections.deque(itertools.islice(iterator, max(size, 1)))
  while queue:
    yield queue.popleft()
    queue.extend(itertools.islice(iterator, 1))


def _to_global(batch: dict[str, np.ndarray], sharding, global_batch: int) -> dict:
  if sharding is None:
    return batch
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
          for k, v in batch.items() if k != 'example_id'}


class TrainIterator:
  """Endless iterator over training batches, with a checkpointable position.

  Batches are {'image': float32 [B, S, S, 3], 'label': float32 [B, num_classes]}: global
  jax.Arrays when a sharding was given, else this process's numpy batch. With
  `config.data.augment_on = 'device'` they are the crops before the rest of the recipe,
  {'image': uint8 [B, S, S, 3], 'label': int32 [B]}, which the train step finishes with
  `rmt_jax.data.batch_augment.augment`.
  """

  def __init__(self, cfg, host: data_sources.HostSlice, *, local_batch: int,
               global_batch: int, seed: int, process_index: int, process_count: int,
               sharding):
    self._cfg = cfg
    self._host = host
    self._local_batch = local_batch
    self._global_batch = global_batch
    self._seed = seed
    self._process_index = process_index
    self._process_count = process_count
    self._sharding = sharding
    self.steps_per_epoch = host.num_examples // local_batch
    if self.steps_per_epoch < 1:
      raise ValueError(
          f'Each process has {host.num_examples} training examples, fewer than its batch of '
          f'{local_batch} (global batch {global_batch} over {process_count} processes).')
    self._epoch, self._step = 0, 0
    self._batches = None

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> dict:
    if self._batches is None:
      ds = _train_dataset(self._cfg, self._host, local_batch=self._local_batch,
                          seed=self._seed, process_index=self._process_index,
                          steps_per_epoch=self.steps_per_epoch, start_epoch=self._epoch,
                          start_step=self._step)
      batches = (_to_global(b, self._sharding, self._global_batch)
                 for b in _numpy_batches(ds))
      self._batches = _prefetch(batches, max(self._cfg.device_prefetch, 0))
    batch = next(self._batches)
    self._step += 1
    if self._step == self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    return batch

  def get_state(self) -> dict:
    """The position of the next batch, JSON-serialisable."""
    return {'epoch': self._epoch, 'step_in_epoch': self._step,
            'steps_per_epoch': self.steps_per_epoch, 'seed': self._seed,
            'process_count': self._process_count, 'global_batch_size': self._global_batch}

  def set_state(self, state: dict) -> None:
    """Continues from `state`, as an uninterrupted iterator with this setup would."""
    for key in ('steps_per_epoch', 'seed', 'process_count', 'global_batch_size'):
      if key in state and state[key] != self.get_state()[key]:
        logging.warning('Input pipeline restored with %s=%s, saved with %s: the resumed '
                        'data order differs from the original run.', key,
                        self.get_state()[key], state[key])
    self._epoch, self._step = int(state['epoch']), int(state['step_in_epoch'])
    if self._step >= self.steps_per_epoch:
      self._epoch += self._step // self.steps_per_epoch
      self._step %= self.steps_per_epoch
    self._batches = None


def create_train_iterator(config_data: ml_collections.ConfigDict, *, global_batch_size: int,
                          seed: int, mesh_sharding: jax.sharding.NamedSharding | None = None,
                          process_index: int | None = None,
                          process_count: int | None = None) -> TrainIterator:
  """Training batches for this process (see `TrainIterator`).

  Args:
    config_data: `config.data` (see `default_config`).
    global_batch_size: batch over all processes; each builds global_batch_size /
      process_count examples.
    seed: seeds the order, the augmentations and Mixup/CutMix.
    mesh_sharding: sharding of the batch (leading axis over the mesh's data axis); None
      yields this process's numpy batches.
    process_index: defaults to `jax.process_index()`.
    process_count: defaults to `jax.process_count()`.

  Returns:
    The iterator; `get_state`/`set_state` save and restore its position.

  Raises:
    DataNotFoundError: the dataset is not where the config says.
  """
  index, count, local_batch = _process(process_index, process_count, global_batch_size)
  if mixup_config(config_data).active and local_batch % 2:
    raise ValueError(f'Mixup/CutMix pair examples within a batch; the per-process batch '
                     f'{local_batch} must be even.')
  host = _source(config_data).host_slice(_split_name(config_data, 'train'), index, count,
                                         drop_remainder=True)
  return TrainIterator(config_data, host, local_batch=local_batch,
                       global_batch=global_batch_size, seed=seed, process_index=index,
                       process_count=count, sharding=mesh_sharding)


# ---------------------------------------------------------------------------------------
# Eval.


def create_eval_iterator(config_data: ml_collections.ConfigDict, *, global_batch_size: int,
                         mesh_sharding: jax.sharding.NamedSharding | None = None,
                         process_index: int | None = None,
                         process_count: int | None = None) -> Iterable[dict]:
  """One pass over this process's slice of the eval split.

  Batches are {'image': float32 [B, S, S, 3], 'label': int32 [B], 'mask': float32 [B]}; the
  mask is 0 on padding. All processes yield the same number of equally sized batches, and
  each eval example appears in exactly one of them across all processes.

  Raises:
    DataNotFoundError: the dataset is not where the config says.
  """
  cfg = config_data
  index, count, local_batch = _process(process_index, process_count, global_batch_size)
  source = _source(cfg)
  split = _split_name(cfg, 'eval')
  host = source.host_slice(split, index, count, drop_remainder=False)
  largest_slice = math.ceil(source.num_examples(split) / count)
  num_batches = math.ceil(largest_slice / local_batch)

  def preprocess(item):
    raw = host.decode(item)
    example = eval_preprocess(raw, cfg)
    example['mask'] = tf.constant(1.0)
    if cfg.with_example_id:
      example['example_id'] = raw['example_id']
    return example

  ds = host.items(None).map(preprocess, num_parallel_calls=cfg.num_parallel_calls,
                            deterministic=True)
  if cfg.cache_eval:
    ds = ds.cache()
  padding = {'image': tf.zeros([cfg.image_size, cfg.image_size, 3]),
             'label': tf.constant(0, tf.int32), 'mask': tf.constant(0.0)}
  if cfg.with_example_id:
    padding['example_id'] = tf.constant(-1, tf.int64)
  pad_count = num_batches * local_batch - host.num_examples
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(pad_count))
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(cfg.prefetch_batches)
  ds = ds.with_options(_options(cfg))
  return _EvalIterable(ds, mesh_sharding, global_batch_size, cfg.device_prefetch, num_batches)


class _EvalIterable:
  """Re-iterable: each `iter()` is a fresh pass over the eval split."""

  def __init__(self, ds, sharding, global_batch, device_prefetch, num_batches):
    self._ds = ds
    self._sharding = sharding
    self._global_batch = global_batch
    self._device_prefetch = device_prefetch
    self.num_batches = num_batches

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict]:
    batches = (_to_global(b, self._sharding, self._global_batch)
               for b in _numpy_batches(self._ds))
    return _prefetch(batches, max(self._device_prefetch, 0))
