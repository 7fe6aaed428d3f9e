"""Digit mosaics: an offline semantic segmentation dataset made from scikit-learn's digits.

Each mosaic is a square canvas with a few of the 8x8 digits pasted at random positions and
sizes, upscaled bilinearly, in boxes that do not overlap. Its label map has 11 classes:
0 = background, 1 + d = digit d, on the pixels where the pasted digit's ink is at least
`ink_threshold` (of full ink); everything else is background.

Training mosaics are drawn from the training digits (the stratified 80% that the
classification demo trains on, `sources.digit_split`) and are a function of (seed, global
index) alone: the batch of step k is the same whatever the process count or a restart, so the
iterator's position is one number. The held-out set is a fixed list of mosaics made from the
held-out 20% of the digits, the same for every run.
"""

import dataclasses
from typing import Iterator

import jax
import ml_collections
import numpy as np

from rmt_jax.data import sources

BACKGROUND = 0
NUM_CLASSES = 11  # Background + the ten digits.
CLASS_NAMES = ['background'] + [f'digit_{d}' for d in range(10)]
# The held-out mosaics' seed: fixed, so that every run scores the same images.
EVAL_SEED = 20_251_207


@dataclasses.dataclass(frozen=True)
class MosaicSpec:
  """How mosaics are drawn.

  Attributes:
    canvas_size: side of the square canvas, in pixels.
    digits: (fewest, most) digits per mosaic, both inclusive.
    digit_size: (smallest, largest) side of a pasted digit, in pixels, both inclusive.
    ink_threshold: a digit's pixel is labelled with it where its ink is at least this
      fraction of full ink (the digits' 0..16 scale), background elsewhere.
    gap: pixels kept free between the boxes of two digits.
  """
  canvas_size: int = 64
  digits: tuple[int, int] = (1, 4)
  digit_size: tuple[int, int] = (16, 32)
  ink_threshold: float = 0.5
  gap: int = 1

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> 'MosaicSpec':
    """The spec of `config.data` (`image_size` and the `mosaic` fields)."""
    m = cfg.mosaic
    return cls(canvas_size=int(cfg.image_size), digits=tuple(m.digits),
               digit_size=tuple(m.digit_size), ink_threshold=float(m.ink_threshold),
               gap=int(m.gap))


@dataclasses.dataclass(frozen=True)
class Placement:
  """One pasted digit: its class (0..9), its index in the digits it was drawn from, its
  box's top-left corner and side, in pixels."""
  digit: int
  index: int
  top: int
  left: int
  size: int


def _bilinear_matrix(size: int, source: int = 8) -> np.ndarray:
  """[size, source] weights of a half-pixel-centred bilinear upscaling (PyTorch's
  align_corners=False, jax.image.resize's 'bilinear'), edges clamped."""
  centres = (np.arange(size) + 0.5) * source / size - 0.5
  low = np.floor(centres).astype(int)
  frac = centres - low
  weights = np.zeros((size, source))
  rows = np.arange(size)
  np.add.at(weights, (rows, np.clip(low, 0, source - 1)), 1 - frac)
  np.add.at(weights, (rows, np.clip(low + 1, 0, source - 1)), frac)
  return weights


def upscale(digit: np.ndarray, size: int) -> np.ndarray:
  """An 8x8 digit (ink in [0, 1]) as size x size, bilinear."""
  w = _bilinear_matrix(size, digit.shape[0])
  return np.clip(w @ digit @ w.T, 0.0, 1.0)


def compose(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray,
            spec: MosaicSpec) -> tuple[np.ndarray, np.ndarray, list[Placement]]:
  """One mosaic.

  Args:
    rng: draws the number of digits, which digits, their sizes and places.
    digits: [N, 8, 8] ink in [0, 1]; labels: [N] their classes (0..9).
    spec: the canvas and the ranges.

  Returns:
    (image uint8 [S, S, 3] grey, label map uint8 [S, S] with values in 0..10, the placements).
    A digit that finds no free place after a few tries is left out.
  """
  s = spec.canvas_size
  ink = np.zeros((s, s), np.float32)
  label = np.zeros((s, s), np.uint8)
  taken = np.zeros((s, s), bool)
  placed = []
  for _ in range(rng.integers(spec.digits[0], spec.digits[1] + 1)):
    index = rng.integers(len(digits))
    size = int(rng.integers(spec.digit_size[0], min(spec.digit_size[1], s) + 1))
    for _ in range(10):
      top, left = (int(v) for v in rng.integers(0, s - size + 1, size=2))
      g = spec.gap
      if not taken[max(top - g, 0):top + size + g, max(left - g, 0):left + size + g].any():
        break
    else:
      continue
    pasted = upscale(digits[index], size)
    ink[top:top + size, left:left + size] = pasted
    label[top:top + size, left:left + size] = np.where(
        pasted >= spec.ink_threshold, labels[index] + 1, BACKGROUND)
    taken[top:top + size, left:left + size] = True
    placed.append(Placement(int(labels[index]), int(index), top, left, size))
  image = np.repeat(np.round(ink * 255.0).astype(np.uint8)[:, :, None], 3, axis=-1)
  return image, label, placed


def compose_batch(seed: int, first: int, count: int, digits: np.ndarray, labels: np.ndarray,
                  spec: MosaicSpec) -> tuple[np.ndarray, np.ndarray]:
  """Mosaics `first` .. `first + count - 1` of the stream of `seed`: (uint8 [n, S, S, 3],
  uint8 [n, S, S]). Mosaic i depends on (seed, i) alone."""
  images, maps = [], []
  for i in range(first, first + count):
    image, label, _ = compose(np.random.default_rng((seed, i)), digits, labels, spec)
    images.append(image)
    maps.append(label)
  return np.stack(images), np.stack(maps)


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 mosaics -> float32 in [-1, 1], what the network sees."""
  return images.astype(np.float32) / 127.5 - 1.0


def _local_part(global_batch_size: int) -> tuple[int, int]:
  """(this process's first example in a global batch, its local batch size)."""
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(f'global batch {global_batch_size} does not split over {count} processes.')
  local = global_batch_size // count
  return jax.process_index() * local, local


def _to_global(batch: dict[str, np.ndarray], sharding, global_batch: int) -> dict:
  if sharding is None:
    return batch
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
          for k, v in batch.items()}


class MosaicTrainIterator:
  """Endless training batches {'image': float32 [B, S, S, 3] in [-1, 1], 'label': int32
  [B, S, S]}, global arrays when a sharding is given; checkpointable like
  `input_pipeline.TrainIterator` (`get_state`, `set_state`, `steps_per_epoch`).

  An epoch is a nominal `config.data.mosaic.mosaics_per_epoch` mosaics (the stream is endless);
  it is the unit of the schedule's warmup and of `eval_every_epochs`.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
               mesh_sharding=None):
    self._spec = MosaicSpec.from_config(cfg)
    self._digits, self._labels = sources.digit_split('train')
    self._global_batch = global_batch_size
    self._first, self._local = _local_part(global_batch_size)
    self._seed = seed
    self._sharding = mesh_sharding
    self.steps_per_epoch = max(int(cfg.mosaic.mosaics_per_epoch) // global_batch_size, 1)
    self._step = 0

  def __iter__(self) -> 'MosaicTrainIterator':
    return self

  def __next__(self) -> dict:
    first = self._step * self._global_batch + self._first
    images, labels = compose_batch(self._seed, first, self._local, self._digits, self._labels,
                                   self._spec)
    self._step += 1
    return _to_global({'image': normalize(images), 'label': labels.astype(np.int32)},
                      self._sharding, self._global_batch)

  def get_state(self) -> dict:
    """The position of the next batch, JSON-serialisable."""
    return {'step': self._step, 'seed': self._seed, 'global_batch_size': self._global_batch}

  def set_state(self, state: dict) -> None:
    """Continues from `state`, as an uninterrupted iterator would."""
    self._step = int(state['step'])


class MosaicEvalSet:
  """The held-out mosaics: `config.data.mosaic.eval_mosaics` of them, made from the held-out
  digits with a fixed seed. Iterating gives one pass of batches {'image', 'label', 'mask'}
  ('mask' float32 [B], 0 on the padding of the last batch), re-iterable.

  Attributes:
    images: uint8 [N, S, S, 3], the whole set (for pictures).
    labels: uint8 [N, S, S].
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, global_batch_size: int,
               mesh_sharding=None):
    digits, labels = sources.digit_split('val')
    self.images, self.labels = compose_batch(EVAL_SEED, 0, int(cfg.mosaic.eval_mosaics), digits,
                                             labels, MosaicSpec.from_config(cfg))
    self._global_batch = global_batch_size
    self._first, self._local = _local_part(global_batch_size)
    self._sharding = mesh_sharding
    self.num_batches = -(-len(self.images) // global_batch_size)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict]:
    n = len(self.images)
    for b in range(self.num_batches):
      index = np.arange(self._local) + b * self._global_batch + self._first
      valid = index < n
      index = np.where(valid, index, 0)
      yield _to_global({'image': normalize(self.images[index]),
                        'label': self.labels[index].astype(np.int32),
                        'mask': valid.astype(np.float32)}, self._sharding, self._global_batch)
