"""Builds a miniature ImageNet in the real ILSVRC2012 release format, for tests.

`write_imagenet_tars` writes `ILSVRC2012_img_train.tar` (one inner tar per synset,
as in the real release) and `ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_XXXXXXXX.JPEG`
files) into a TFDS `manual_dir`; `write_image_folder` writes the same images in the
`train/<synset>/*.JPEG`, `val/<synset>/*.JPEG` layout that PyTorch users keep.

TFDS's `imagenet2012` builder labels validation images by zipping the *sorted* names
in the val tar with the first lines of its own `validation_labels.txt`, so the
miniature val set is images 1..N and its synsets are those of the first N lines;
the train tar holds exactly those synsets (the builder does not need all 1000).
"""

import dataclasses
import io
import os
import tarfile

import numpy as np


@dataclasses.dataclass(frozen=True)
class MiniImagenet:
  """What was written: file name -> label index (into TFDS's 1000-name list)."""
  synsets: list[str]
  train_labels: dict[str, int]
  val_labels: dict[str, int]


def _tfds_label_files():
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
  import tensorflow_datasets as tfds
  names = imagenet_common.label_names_file()
  val = tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')
  with open(os.fspath(names)) as f:
    all_synsets = f.read().split()
  with open(os.fspath(val)) as f:
    val_synsets = f.read().split()
  return all_synsets, val_synsets


def _jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  import tensorflow as tf
  # Smooth content (a colour ramp plus noise) so JPEG keeps it recognisable.
  base = rng.integers(0, 256, size=3)
  ramp = np.linspace(0, 80, width)[None, :, None]
  pixels = base + ramp + rng.normal(0, 10, size=(height, width, 3))
  pixels = np.clip(pixels, 0, 255).astype(np.uint8)
  return tf.io.encode_jpeg(pixels, quality=90).numpy()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _images(num_val: int, train_per_class: int, size: int, seed: int):
  """Generates (file name, synset, jpeg bytes) for the train and val sets."""
  all_synsets, val_synsets = _tfds_label_files()
  rng = np.random.default_rng(seed)
  val = []
  for i in range(num_val):
    name = f'ILSVRC2012_val_{i + 1:08d}.JPEG'
    # Mixed aspect ratios exercise the shorter-side resize and the crops.
    h, w = (size, size + 4) if i % 2 else (size + 6, size)
    val.append((name, val_synsets[i], _jpeg(rng, h, w)))
  synsets = sorted({s for _, s, _ in val})
  train = []
  for synset in synsets:
    for j in range(train_per_class):
      h, w = (size + 2 * j, size)
      train.append((f'{synset}_{j + 1}.JPEG', synset, _jpeg(rng, h, w)))
  index = {s: all_synsets.index(s) for s in synsets}
  return synsets, index, train, val


def write_imagenet_tars(manual_dir: str, *, num_val: int = 12,
                        train_per_class: int = 2, size: int = 16,
                        seed: int = 0) -> MiniImagenet:
  """Writes the two release tars into `manual_dir`; returns the labels."""
  synsets, index, train, val = _images(num_val, train_per_class, size, seed)
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for synset in synsets:
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        for name, s, data in train:
          if s == synset:
            _add_bytes(inner, name, data)
      _add_bytes(outer, f'{synset}.tar', inner_bytes.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as tar:
    for name, _, data in val:
      _add_bytes(tar, name, data)
  return MiniImagenet(
      synsets=synsets,
      train_labels={n: index[s] for n, s, _ in train},
      val_labels={n: index[s] for n, s, _ in val})


def write_image_folder(root: str, *, num_val: int = 12, train_per_class: int = 2,
                       size: int = 16, seed: int = 0) -> MiniImagenet:
  """Writes `root/{train,val}/<synset>/<name>.JPEG`; labels index the sorted synsets."""
  synsets, _, train, val = _images(num_val, train_per_class, size, seed)
  for split, items in (('train', train), ('val', val)):
    for name, synset, data in items:
      folder = os.path.join(root, split, synset)
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(data)
  folder_index = {s: i for i, s in enumerate(synsets)}
  return MiniImagenet(
      synsets=synsets,
      train_labels={n: folder_index[s] for n, s, _ in train},
      val_labels={n: folder_index[s] for n, s, _ in val})
