"""Where examples come from: TFDS `imagenet2012`, an image folder, or the embedded digits demo.

Each source opens a split and hands out per-process slices (`HostSlice`): a process reads
only its slice, as raw records (serialized TFDS examples or file indices), and decodes them
to `{'image': encoded bytes, 'label': int32, 'example_id': int64}` later, in parallel, after
any shuffling and skipping, so that skipping to a resumed position costs no image decoding.

Slicing follows `tfds.even_splits`: with `drop_remainder` every process gets
`num_examples // process_count` examples (train: equal epoch lengths on all hosts), without
it the first `num_examples % process_count` processes get one more (eval: every example
read exactly once).
"""

import dataclasses
import os
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')
TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
PREPARE_COMMAND = 'python -m rmt_jax.prepare_imagenet --data_dir={data_dir} --manual_dir={manual_dir}'


class DataError(Exception):
  """The data cannot be read as configured; the message names the path and the fix.

  `main.py` prints the message without a traceback.
  """


class DataNotFoundError(DataError):
  """The dataset is not where the config says; the message says how to put it there."""


# Marks the assertion that FolderSource's decode makes on each file's first bytes, so that the
# iterators can turn TensorFlow's error into a `DataError` naming the file.
UNREADABLE_IMAGE = 'rmt_jax: not a JPEG or PNG image:'
_IMAGE_SIGNATURES = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n')


@dataclasses.dataclass(frozen=True)
class HostSlice:
  """One process's part of a split.

  Attributes:
    num_examples: examples in this slice.
    items: `items(order_seed)` -> tf.data.Dataset of raw records, in a fixed order when
      `order_seed` is None, else shuffled as a function of the [2] int seed alone.
    decode: raw record -> {'image': bytes, 'label': int32, 'example_id': int64}.
  """
  num_examples: int
  items: Callable[[Any], tf.data.Dataset]
  decode: Callable[[tf.Tensor], dict[str, tf.Tensor]]


def even_split_range(num_examples: int, index: int, count: int,
                     drop_remainder: bool) -> tuple[int, int]:
  """[start, end) of sub-split `index` of `count`, as `tfds.even_splits` makes them."""
  base, remainder = divmod(num_examples, count)
  if drop_remainder:
    return index * base, (index + 1) * base
  start = index * base + min(index, remainder)
  return start, start + base + (1 if index < remainder else 0)


def _example_id(name: tf.Tensor) -> tf.Tensor:
  return tf.strings.to_hash_bucket_fast(name, 2**62)


# ---------------------------------------------------------------------------------------
# TFDS imagenet2012 (any prepared TFDS image classification dataset works the same way).


def resolve_tfds_dirs(data_dir: str, manual_dir: str) -> tuple[str, str]:
  data_dir = os.path.expanduser(
      data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
  manual_dir = os.path.expanduser(manual_dir or os.path.join(data_dir, 'downloads', 'manual'))
  return data_dir, manual_dir


def imagenet_not_found_message(name: str, data_dir: str, manual_dir: str) -> str:
  def state(path):
    return 'present' if tf.io.gfile.exists(path) else 'MISSING'
  train, val = os.path.join(manual_dir, TRAIN_TAR), os.path.join(manual_dir, VAL_TAR)
  return (
      f"TFDS dataset '{name}' is not prepared under data_dir={data_dir}.\n"
      'To prepare it, put the two ImageNet release tars (from https://image-net.org/'
      'download-images, after registering) into manual_dir:\n'
      f'  {train}  ({state(train)}; 138 GB, one tar per synset inside)\n'
      f'  {val}  ({state(val)}; 6.3 GB, 50,000 JPEGs)\n'
      'then run once (a few hours; ~150 GB free under data_dir):\n'
      f'  {PREPARE_COMMAND.format(data_dir=data_dir, manual_dir=manual_dir)}\n'
      "Or use an image folder: set config.data.dataset='folder' and config.data.folder_root "
      'to a directory holding train/<class>/*.JPEG and val/<class>/*.JPEG.')


class TfdsSource:
  """A prepared TFDS dataset, read shard by shard from its TFRecord files."""

  def __init__(self, name: str, data_dir: str, manual_dir: str = '', *,
               cycle_length: int = 16, shuffle_buffer: int = 16_384):
    data_dir, manual_dir = resolve_tfds_dirs(data_dir, manual_dir)
    self.builder = tfds.builder(name, data_dir=data_dir)
    if not self.builder.is_prepared():
      raise DataNotFoundError(imagenet_not_found_message(name, data_dir, manual_dir))
    self.name = name
    self.cycle_length = cycle_length
    self.shuffle_buffer = shuffle_buffer

  def num_examples(self, split: str) -> int:
    if split not in self.builder.info.splits:
      raise DataNotFoundError(
          f"TFDS dataset '{self.name}' under {self.builder.data_dir} has no split {split!r} "
          f'(it has {sorted(self.builder.info.splits.keys())}); prepare it again with '
          f'the release tar of that split in manual_dir.')
    return self.builder.info.splits[split].num_examples

  def host_slice(self, split: str, index: int, count: int, drop_remainder: bool) -> HostSlice:
    self.num_examples(split)
    sub_split = tfds.even_splits(split, count, drop_remainder=drop_remainder)[index]
    info = self.builder.info.splits[sub_split]
    instructions = [f for f in info.file_instructions if f.take > 0]
    features = self.builder.info.features

    def decode(record):
      example = features.deserialize_example(
          record, decoders={'image': tfds.decode.SkipDecoding()})
      # Datasets without file names (not imagenet2012) are told apart by their bytes.
      name = example['file_name'] if 'file_name' in example else record
      return {'image': example['image'], 'label': tf.cast(example['label'], tf.int32),
              'example_id': _example_id(name)}

    return HostSlice(num_examples=info.num_examples,
                     items=lambda seed: self._records(instructions, seed), decode=decode)

  def _records(self, instructions, order_seed) -> tf.data.Dataset:
    files = tf.constant([f.filename for f in instructions])
    skips = tf.constant([f.skip for f in instructions], tf.int64)
    takes = tf.constant([f.take for f in instructions], tf.int64)
    order = tf.range(len(instructions))
    if order_seed is not None:
      order = tf.random.experimental.stateless_shuffle(order, order_seed)

    def read_shard(i):
      return tf.data.TFRecordDataset(files[i], buffer_size=1 << 20).skip(skips[i]).take(takes[i])

    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        read_shard, cycle_length=min(self.cycle_length, len(instructions)), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if order_seed is not None and self.shuffle_buffer > 1:
      # Records inside a TFDS shard are already in random order (TFDS shuffles at prepare
      # time); the shard order and this buffer make each epoch's order different.
      buffer_seed = tf.random.stateless_uniform(
          [], order_seed, minval=None, maxval=None, dtype=tf.int64)
      ds = ds.shuffle(self.shuffle_buffer, seed=buffer_seed, reshuffle_each_iteration=False)
    return ds


# ---------------------------------------------------------------------------------------
# Image folder: root/<split>/<class>/<image>, classes in sorted order.


class FolderSource:
  """Images in `root/<split>/<class>/*.{JPEG,jpg,png}` with labels from sorted class names.

  Paths go through tf.io.gfile, so `root` may be local or a bucket (gs://...).
  """

  def __init__(self, root: str, *, train_split: str = 'train', num_classes: int | None = None):
    self.root = os.path.expanduser(root)
    train_dir = os.path.join(self.root, train_split)
    if not root or not tf.io.gfile.isdir(train_dir):
      raise DataNotFoundError(
          f'image folder split not found: {train_dir!r} does not exist; set '
          'config.data.folder_root to a directory holding train/<class name>/<image>.JPEG '
          'and val/<class name>/<image>.JPEG (the torchvision ImageFolder layout; ImageNet val '
          'images sorted into class folders)')
    self.classes = sorted(_subdirs(train_dir))
    if not self.classes:
      raise DataNotFoundError(f'{train_dir} holds no class folders; put each class\'s images '
                              f'in {train_dir}/<class name>/')
    if num_classes is not None and len(self.classes) > num_classes:
      raise DataError(f'{train_dir} has {len(self.classes)} class folders but '
                      f'config.num_classes={num_classes}; set --config.num_classes='
                      f'{len(self.classes)}')
    self._files: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def _list(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split in self._files:
      return self._files[split]
    split_dir = os.path.join(self.root, split)
    if not tf.io.gfile.isdir(split_dir):
      raise DataNotFoundError(f'image folder split not found: {split_dir!r} does not exist; '
                              f'put the {split} images in {split_dir}/<class name>/ with the '
                              'class names of train/')
    class_index = {c: i for i, c in enumerate(self.classes)}
    paths, labels = [], []
    for class_name in sorted(_subdirs(split_dir)):
      class_dir = os.path.join(split_dir, class_name)
      if class_name not in class_index:
        raise DataError(f'{class_dir}: class {class_name!r} has no folder in '
                        f'{os.path.join(self.root, "train")}, so it has no label; add '
                        f'train/{class_name}/ with its training images or remove {class_dir}')
      images = [n for n in sorted(tf.io.gfile.listdir(class_dir))
                if n.lower().endswith(IMAGE_EXTENSIONS)]
      if not images:
        raise DataError(f'{class_dir} holds no images (*.JPEG, *.jpg, *.png); add its images '
                        'or remove the folder')
      paths.extend(os.path.join(class_dir, n) for n in images)
      labels.extend([class_index[class_name]] * len(images))
    if not paths:
      raise DataNotFoundError(f'no images (*.JPEG, *.jpg, *.png) under {split_dir}/<class>/; '
                              'put the images in class folders there')
    # A fixed permutation, so that contiguous per-process slices mix all classes.
    perm = np.random.default_rng(0).permutation(len(paths))
    self._files[split] = (np.asarray(paths)[perm], np.asarray(labels, np.int32)[perm])
    return self._files[split]

  def num_examples(self, split: str) -> int:
    return len(self._list(split)[0])

  def host_slice(self, split: str, index: int, count: int, drop_remainder: bool) -> HostSlice:
    paths, labels = self._list(split)
    start, end = even_split_range(len(paths), index, count, drop_remainder)
    paths_t = tf.constant(paths[start:end])
    labels_t = tf.constant(labels[start:end])
    n = end - start

    def items(order_seed):
      order = tf.range(n, dtype=tf.int64)
      if order_seed is not None:
        order = tf.random.experimental.stateless_shuffle(order, order_seed)
      return tf.data.Dataset.from_tensor_slices(order)

    def decode(i):
      path = paths_t[i]
      image = tf.io.read_file(path)
      # A file that is no image would fail later, in the decoder, with a message that names
      # no file; checking the signature here costs nothing and names it.
      check = tf.debugging.Assert(_is_image(image), [UNREADABLE_IMAGE, path, '<-'])
      with tf.control_dependencies([check]):
        image = tf.identity(image)
      return {'image': image, 'label': labels_t[i], 'example_id': _example_id(path)}

    return HostSlice(num_examples=n, items=items, decode=decode)


def _is_image(data: tf.Tensor) -> tf.Tensor:
  """Whether `data` starts as a JPEG or PNG file does (the formats the folder source lists)."""
  return tf.reduce_any([tf.strings.substr(data, 0, len(s)) == s for s in _IMAGE_SIGNATURES])


def unreadable_image_path(error: Exception) -> str | None:
  """The file that `FolderSource`'s decode refused, if `error` is that refusal; else None."""
  text = str(error)
  if UNREADABLE_IMAGE not in text:
    return None
  return text.split(UNREADABLE_IMAGE, 1)[1].split('<-', 1)[0].strip().strip('] [')


def _subdirs(path: str) -> list[str]:
  names = (n.rstrip('/') for n in tf.io.gfile.listdir(path))
  return [n for n in names if tf.io.gfile.isdir(os.path.join(path, n))]


# ---------------------------------------------------------------------------------------
# The offline demo: scikit-learn's 8x8 digits, written once as PNGs in the folder layout.

DIGITS_EVAL_FRACTION = 0.2


def materialize_digits(root: str, size: int = 32) -> str:
  """Writes sklearn's digits as `root/{train,val}/<digit>/<n>.png` (size x size RGB) once.

  The held-out split is a fixed stratified 20% (random_state=0). Returns `root`.
  """
  root = os.path.expanduser(root)
  if os.path.isdir(os.path.join(root, 'val')):
    return root
  digits = _load_digits()
  tmp = f'{root}.tmp{os.getpid()}'
  for split in ('train', 'val'):
    for i in _digit_split_indices(split):
      folder = os.path.join(tmp, split, str(digits.target[i]))
      os.makedirs(folder, exist_ok=True)
      pixels = (digits.images[i] / 16.0 * 255.0)[:, :, None]
      image = tf.image.resize(pixels, [size, size], method='bilinear')
      image = tf.cast(tf.round(tf.clip_by_value(tf.tile(image, [1, 1, 3]), 0, 255)), tf.uint8)
      tf.io.write_file(os.path.join(folder, f'{i:04d}.png'), tf.io.encode_png(image))
  os.makedirs(os.path.dirname(root) or '.', exist_ok=True)
  try:
    os.rename(tmp, root)  # Atomic: concurrent processes see all files or none.
  except OSError:
    if not os.path.isdir(os.path.join(root, 'val')):
      raise
    tf.io.gfile.rmtree(tmp)  # Another process won the race.
  return root


def _load_digits():
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  return sk_datasets.load_digits()


def _digit_split_indices(split: str) -> np.ndarray:
  """The digits of `split` ('train' or 'val'): a fixed stratified 80/20 split."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  target = _load_digits().target
  train_idx, val_idx = model_selection.train_test_split(
      np.arange(len(target)), test_size=DIGITS_EVAL_FRACTION, stratify=target, random_state=0)
  return {'train': train_idx, 'val': val_idx}[split]


def digit_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The 8x8 digits of `split` ('train' or 'val', the split `materialize_digits` writes) as
  (ink float32 [N, 8, 8] in [0, 1], labels int32 [N])."""
  digits = _load_digits()
  index = _digit_split_indices(split)
  return ((digits.images[index] / 16.0).astype(np.float32),
          digits.target[index].astype(np.int32))
