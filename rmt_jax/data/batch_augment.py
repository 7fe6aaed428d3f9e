"""The per-pixel part of the training recipe as jax batch ops, to run inside the compiled step.

With `config.data.augment_on = 'device'` the host (tf.data) only reads each file, decodes the
random-resized crop's window and resizes it (uint8 [B, S, S, 3], int32 labels). The rest of the
official recipe runs here, on the accelerator, as big_vision mixes in its train step:

  horizontal flip -> RandAugment -> normalise by mean/std -> random erasing -> Mixup/CutMix +
  label smoothing

each op with the meaning and the parameter distributions of the host's TensorFlow op
(`augment.py`, `randaugment.py`, `mixup.py`, which follow timm) and every random choice drawn from
one key: per example where timm draws per image, per batch for Mixup/CutMix. Only jax and numpy.

RandAugment as array ops (`randaugment_batch`): each of the policy's layers draws (op, applied,
magnitude, sign) per image. The flip and the ops that move pixels (rotate, shear, translate) of
both layers compose into one affine warp per image, between the two layers' value ops (exactly
timm's order except for the 1 image in 36 whose layers are both geometric: one resampling of the
composed map instead of two). The warp samples bilinearly in two 1-D passes (along x, then along
y, e.g. Catmull and Smith's two-pass warp), which equals the host's 2-D bilinear sampling exactly
for shears and translations and differs by interpolation rounding for rotations. The per-pixel
value ops are a select among their outputs; those with statistics or a filter, and Equalize, run
on the images that drew them only (`value_layer`, `on_chosen`). `form` picks how the passes
sample, how Equalize counts and looks up and how `on_chosen` takes and puts back its images:
'gather' (two taps a pixel, a bincount, gathers and scatters; cheap on CPUs) or 'matmul' (an
interpolation matrix per line, MXU work on TPUs, where gathers and scatters are slow; compares
for Equalize; a dynamic slice and an in-place update per image taken); both give the same
images within one grey level of the warp's rounding (`form_for`). The warp itself may be passed
in (`Warp`; `plain_warp` by default): the train step runs `augment` on each device's share of the
batch with the TPU kernel's warp on TPUs (`rmt_jax.train.device_augment`), sized by the policy's
largest scale (`warp_scale_bound`).
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax.data import policies
from rmt_jax.data.eval_preprocessing import IMAGENET_MEAN, IMAGENET_STD

_GRAY = (0.299, 0.587, 0.114)  # PIL's 'L' conversion (ITU-R 601-2 luma).
FORMS = ('gather', 'matmul')

# A batch's warp: (uint8 images [B, H, W, 3], float32 affine data [B, 6] as `affine` takes it)
# -> uint8 images; `plain_warp`'s function (a kernel may be passed in instead).
Warp = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class BatchRecipe:
  """What `augment` does: the fields of `config.data` it reads (see `from_config`)."""
  hflip: float = 0.5
  randaugment: policies.RandAugmentPolicy | None = policies.parse_policy(
      'rand-m9-mstd0.5-inc1')
  fill: tuple[int, int, int] = policies.DEFAULT_FILL
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  reprob: float = 0.25
  remode: str = 'pixel'
  re_min_area: float = 0.02
  re_max_area: float = 1 / 3
  re_min_aspect: float = 0.3
  mixup: policies.MixupConfig = policies.MixupConfig()

  @classmethod
  def from_config(cls, config_data: Any) -> 'BatchRecipe':
    """The recipe of `config.data` (`rmt_jax.data.config.default_config`)."""
    c = config_data
    if c.remode not in ('pixel', 'rand', 'const'):
      raise ValueError(f"random erasing mode must be 'pixel', 'rand' or 'const', got {c.remode!r}")
    return cls(hflip=float(c.hflip), randaugment=policies.parse_policy(c.randaugment),
               mean=tuple(c.mean), std=tuple(c.std), reprob=float(c.reprob),
               remode=c.remode, re_min_area=float(c.re_min_area),
               re_max_area=float(c.re_max_area), re_min_aspect=float(c.re_min_aspect),
               mixup=policies.MixupConfig(
                   mixup_alpha=float(c.mixup), cutmix_alpha=float(c.cutmix),
                   prob=float(c.mixup_prob), switch_prob=float(c.mixup_switch_prob),
                   label_smoothing=float(c.label_smoothing), num_classes=int(c.num_classes)))


def form_for(devices: Sequence[Any]) -> str:
  """The warp's form for the devices the step is compiled for: 'matmul' on TPUs, else 'gather'."""
  return 'matmul' if devices and devices[0].platform == 'tpu' else 'gather'


def augment(images: jax.Array, labels: jax.Array, key: jax.Array, recipe: BatchRecipe,
            form: str = 'gather', warp: Warp | None = None) -> tuple[jax.Array, jax.Array]:
  """The recipe after the crop, on a batch.

  Args:
    images: uint8 [B, H, W, 3], the resized crops.
    labels: int [B] class indices.
    key: the batch's key (e.g. the step's, folded with the step number).
    recipe: what to do.
    form: 'gather' or 'matmul' (`form_for`); the same images either way.
    warp: RandAugment's warp of the batch; None: `plain_warp` in `form` (the train step passes
      the TPU kernel, `rmt_jax.train.device_augment`).

  Returns:
    (float32 [B, H, W, 3] normalised images, float32 [B, num_classes] targets summing to 1).
  """
  if form not in FORMS:
    raise ValueError(f'form must be one of {FORMS}, got {form!r}')
  k_flip, k_ra, k_erase, k_mix = jax.random.split(key, 4)
  batch = images.shape[0]
  if recipe.randaugment is not None:
    # The flip joins RandAugment's first warp (`randaugment`), with the same draws.
    flip = (jax.random.uniform(k_flip, (batch,)) < recipe.hflip if recipe.hflip > 0
            else jnp.zeros((batch,), bool))
    images = randaugment_batch(images, jax.random.split(k_ra, batch), recipe.randaugment,
                               recipe.fill, form, flip, warp)
    if form == 'matmul':
      # TPUs: XLA fuses the last value layer's select into normalisation and then lays the
      # RandAugment passes out around that fusion, at a cost above the uint8 batch's write and
      # read that the fusion saves (`docs/input_pipeline_speed.md`).
      images = jax.lax.optimization_barrier(images)
  elif recipe.hflip > 0:
    images = random_horizontal_flip(images, k_flip, recipe.hflip)
  out = normalize(images, recipe.mean, recipe.std)
  if recipe.reprob > 0:
    out = jax.vmap(lambda x, k: random_erasing(
        x, k, probability=recipe.reprob, mode=recipe.remode, min_area=recipe.re_min_area,
        max_area=recipe.re_max_area, min_aspect=recipe.re_min_aspect))(
            out, jax.random.split(k_erase, batch))
  return mix_batch(out, labels, k_mix, recipe.mixup)


# ---------------------------------------------------------------------------------------
# Flip, normalisation, random erasing.


def random_horizontal_flip(images: jax.Array, key: jax.Array, prob: float = 0.5) -> jax.Array:
  """Mirrors each image of [B, H, W, C] with probability `prob`."""
  flip = jax.random.uniform(key, (images.shape[0],)) < prob
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def normalize(images: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """uint8 in [0, 255] -> float32 standardised by `mean` and `std` (fractions of 255)."""
  mean = jnp.asarray([m * 255 for m in mean], jnp.float32)
  std = jnp.asarray([s * 255 for s in std], jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def _randint_inclusive(key, high):
  """Uniform integer in [0, high], like Python's `random.randint(0, high)`."""
  return jnp.floor(jax.random.uniform(key) * (high + 1.0)).astype(jnp.int32)


def random_erasing(image: jax.Array, key: jax.Array, *, probability: float = 0.25,
                   mode: str = 'pixel', min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, attempts: int = 10) -> jax.Array:
  """timm `RandomErasing` (count 1) on one normalised float image [H, W, C] (`vmap` it).

  With probability `probability`, one rectangle of area fraction in [min_area, max_area] and
  log-uniform aspect in [min_aspect, 1/min_aspect] (the first of `attempts` draws that fits) is
  replaced by per-pixel normal noise ('pixel'), one normal colour per channel ('rand') or zeros
  ('const').
  """
  if mode not in ('pixel', 'rand', 'const'):
    raise ValueError(f"random erasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
  height, width, channels = image.shape
  k_apply, k_area, k_aspect, k_y, k_x, k_fill = jax.random.split(key, 6)
  area = height * width * jax.random.uniform(k_area, (attempts,), minval=min_area,
                                             maxval=max_area)
  aspect = jnp.exp(jax.random.uniform(k_aspect, (attempts,), minval=math.log(min_aspect),
                                      maxval=math.log(1 / min_aspect)))
  erase_h = jnp.round(jnp.sqrt(area * aspect))
  erase_w = jnp.round(jnp.sqrt(area / aspect))
  fits = (erase_w < width) & (erase_h < height)
  first = jnp.argmax(fits)
  h, w = erase_h[first], erase_w[first]
  top = _randint_inclusive(k_y, height - h)
  left = _randint_inclusive(k_x, width - w)
  apply = (jax.random.uniform(k_apply) < probability) & jnp.any(fits)
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  inside = (apply & (rows >= top) & (rows < top + h.astype(jnp.int32))
            & (cols >= left) & (cols < left + w.astype(jnp.int32)))
  if mode == 'pixel':
    fill = jax.random.normal(k_fill, image.shape, image.dtype)
  elif mode == 'rand':
    fill = jax.random.normal(k_fill, (1, 1, channels), image.dtype)
  else:
    fill = jnp.zeros((1, 1, channels), image.dtype)
  return jnp.where(inside, fill, image)


# ---------------------------------------------------------------------------------------
# Mixup / CutMix + label smoothing (one draw per batch, as timm's `Mixup(mode='batch')`).


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(height: int, width: int, lam: jax.Array, key: jax.Array):
  """timm `rand_bbox`: a box of side ratio sqrt(1 - lam) around a uniform centre, clipped."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  k_y, k_x = jax.random.split(key)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  return y0, y1, x0, x1


def mix_batch(images: jax.Array, labels: jax.Array, key: jax.Array,
              config: policies.MixupConfig) -> tuple[jax.Array, jax.Array]:
  """Mixes float [B, H, W, C] with integer labels [B]: (images, soft targets [B, K]).

  Example i is mixed with example B-1-i; CutMix's lambda is corrected to the pasted area.
  """
  targets = smooth_one_hot(labels, config.num_classes, config.label_smoothing)
  if not config.active:
    return images, targets
  k_apply, k_switch, k_lam, k_box = jax.random.split(key, 4)
  use_cutmix = jnp.asarray(config.mixup_alpha <= 0)
  if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < config.switch_prob
  mix_lam = (jax.random.beta(k_lam, config.mixup_alpha, config.mixup_alpha)
             if config.mixup_alpha > 0 else 1.0)
  cut_lam = (jax.random.beta(k_lam, config.cutmix_alpha, config.cutmix_alpha)
             if config.cutmix_alpha > 0 else 1.0)
  lam = jnp.where(use_cutmix, cut_lam, mix_lam)
  lam = jnp.where(jax.random.uniform(k_apply) < config.prob, lam, 1.0)
  _, height, width, _ = images.shape
  y0, y1, x0, x1 = cutmix_box(height, width, lam, k_box)
  box_lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]
  in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1) & (lam < 1.0)
  flipped = images[::-1]
  cut = jnp.where(in_box, flipped, images)
  mixed = images * lam + flipped * (1.0 - lam)
  images = jnp.where(use_cutmix, cut, jnp.where(lam < 1.0, mixed, images))
  lam = jnp.where(use_cutmix, box_lam, lam)
  return images, targets * lam + targets[::-1] * (1.0 - lam)


# ---------------------------------------------------------------------------------------
# RandAugment's value ops, on one uint8 image [H, W, 3] (as randaugment.py's).


def _blend(degenerate, image, factor):
  """PIL `ImageEnhance`: degenerate + factor * (image - degenerate), clipped, truncated."""
  degenerate = jnp.asarray(degenerate, jnp.float32)
  out = degenerate + factor * (image.astype(jnp.float32) - degenerate)
  return jnp.clip(out, 0.0, 255.0).astype(jnp.uint8)


def _grayscale(image):
  """PIL 'L' conversion, float32 [H, W, 1]."""
  return jnp.round(jnp.sum(image.astype(jnp.float32) * jnp.asarray(_GRAY), -1, keepdims=True))


def auto_contrast(image):
  """Stretches each channel's [min, max] to [0, 255]; flat channels stay as they are."""
  x = image.astype(jnp.int32)
  lo, hi = x.min((0, 1)), x.max((0, 1))
  # PIL's table is int(i * scale + offset); the exact quotient here (PIL's double rounding
  # gives 254 instead of 255 at a channel's maximum for some ranges).
  out = (x - lo) * 255 // jnp.maximum(hi - lo, 1)
  return jnp.where(hi > lo, jnp.clip(out, 0, 255), x).astype(jnp.uint8)


def _histogram(values, form):
  """Counts of 0..255 in int32 `values` [N]: a scatter-add ('gather' form), or ('matmul') a
  compare with every bin summed over the values (TPUs scatter slowly; the compares fuse into
  one reduction)."""
  if form == 'gather':
    return jnp.bincount(values, length=256)
  return jnp.sum((values[:, None] == jnp.arange(256)).astype(jnp.int32), 0)


def _lookup(table, values, form):
  """table[values] for an int32 table [256]: a gather ('gather' form), or ('matmul') the sum of
  the table masked by a compare with every index (TPUs gather slowly; this fuses into one
  elementwise pass with a 256-wide reduction)."""
  if form == 'gather':
    return table[values]
  return jnp.sum(jnp.where(values[..., None] == jnp.arange(256), table, 0), -1)


def _equalize_channel(channel, form='gather'):
  """PIL `ImageOps.equalize` for one uint8 channel [H, W]."""
  values = channel.astype(jnp.int32)
  hist = _histogram(values.reshape(-1), form)
  step = (values.size - hist[values.max()]) // 255  # All but the last non-empty bin.
  safe = jnp.maximum(step, 1)
  lut = jnp.clip((jnp.cumsum(hist) - hist + safe // 2) // safe, 0, 255)
  lut = jnp.where(step > 0, lut, jnp.arange(256))
  return _lookup(lut, values, form).astype(jnp.uint8)


def equalize(image, form: str = 'gather'):
  """PIL `ImageOps.equalize`; `form` as the warp's (`form_for`), the same images either way."""
  return jnp.stack([_equalize_channel(image[..., c], form) for c in range(3)], -1)


def invert(image):
  return 255 - image


def posterize(image, bits):
  """Keeps the top `bits` bits of each value (bits >= 8 is identity)."""
  bits = jnp.clip(jnp.asarray(bits, jnp.int32), 0, 8)
  mask = ((255 << (8 - bits)) & 255).astype(jnp.uint8)
  return image & mask


def solarize(image, threshold):
  """Inverts the values >= threshold."""
  x = image.astype(jnp.int32)
  return jnp.where(x >= threshold, 255 - x, x).astype(jnp.uint8)


def solarize_add(image, addition, threshold: int = 128):
  """Adds `addition` to the values < threshold, clipped to 255."""
  x = image.astype(jnp.int32)
  return jnp.where(x < threshold, jnp.minimum(x + addition, 255), x).astype(jnp.uint8)


def color(image, factor):
  return _blend(_grayscale(image), image, factor)


def contrast(image, factor):
  mean = jnp.floor(jnp.mean(_grayscale(image)) + 0.5)
  return _blend(mean, image, factor)


def brightness(image, factor):
  return _blend(0.0, image, factor)


def sharpness(image, factor):
  """PIL `ImageEnhance.Sharpness`: blend with the SMOOTH-filtered image (border kept)."""
  x = image.astype(jnp.float32)
  height, width, _ = x.shape
  weights = ((1, 1, 1), (1, 5, 1), (1, 1, 1))
  # Neighbours of a zero-padded copy, and a mask for the border (an elementwise select rather
  # than an update of the interior: one fusion on TPUs).
  padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
  smooth = sum(weights[dy][dx] / 13.0 * padded[dy:height + dy, dx:width + dx]
               for dy in range(3) for dx in range(3))
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
  degenerate = jnp.where(interior, jnp.round(smooth), x)
  return _blend(degenerate, image, factor)


# ---------------------------------------------------------------------------------------
# RandAugment's geometric ops: one affine warp.


def _resample(lines, source, form):
  """Linear interpolation along axis 1: out[l, m] = lines[l] at position source[l, m], with
  zeros outside [0, N - 1]. lines [L, N, C] float32, source [L, M]."""
  size = lines.shape[1]
  if form == 'matmul':
    taps = jnp.maximum(0.0, 1.0 - jnp.abs(source[..., None] - jnp.arange(size)))
    return jnp.einsum('lmn,lnc->lmc', taps, lines, precision=jax.lax.Precision.HIGH)
  low = jnp.floor(source)
  frac = (source - low)[..., None]
  low = low.astype(jnp.int32)

  def tap(index):
    inside = ((index >= 0) & (index < size))[..., None]
    values = jnp.take_along_axis(lines, jnp.clip(index, 0, size - 1)[..., None], axis=1)
    return jnp.where(inside, values, 0.0)

  return tap(low) * (1.0 - frac) + tap(low + 1) * frac


def affine(image, matrix, fill=policies.DEFAULT_FILL, form: str = 'gather'):
  """Samples input(M @ [x, y, 1]) for each output pixel; outside -> `fill`.

  `matrix` holds PIL's `Image.AFFINE` data (a, b, c, d, e, f): output (x, y) reads the input
  at (a x + b y + c, d x + e y + f); e must not be 0 (|angle| < 90 degrees for rotations).
  Two 1-D linear passes: first along x, J(p, q) = input(g(p, q), q) for every input row q with
  g(p, q) = (a - b d / e) p + (b / e) q + c - b f / e, then along y, output(x, y) =
  J(x, d x + e y + f), which is input(u, v) at the same (u, v) as the 2-D map.
  """
  a, b, c, d, e, f = (matrix[i] for i in range(6))
  fill = jnp.asarray(fill, jnp.float32)
  # Sampling (image - fill) with zeros outside and adding fill back blends edge pixels with
  # the fill colour, as PIL's fillcolor and the host's projective transform do.
  x = image.astype(jnp.float32) - fill
  height, width, _ = x.shape
  cols = jnp.arange(width, dtype=jnp.float32)
  rows = jnp.arange(height, dtype=jnp.float32)
  source_x = (a - b * d / e) * cols[None, :] + (b / e) * rows[:, None] + (c - b * f / e)
  half = _resample(x, source_x, form)  # [q, p, C]
  source_y = d * cols[:, None] + e * rows[None, :] + f  # [x, y]
  out = _resample(jnp.swapaxes(half, 0, 1), source_y, form)  # [x, y, C]
  out = jnp.swapaxes(out, 0, 1) + fill
  return jnp.clip(jnp.round(out), 0.0, 255.0).astype(jnp.uint8)


def plain_warp(fill=policies.DEFAULT_FILL, form: str = 'gather') -> Warp:
  """`affine` on each image of a batch with its own affine data."""
  return jax.vmap(lambda image, matrix: affine(image, matrix, fill, form))


@functools.lru_cache(maxsize=None)
def warp_scale_bound(policy: policies.RandAugmentPolicy) -> float:
  """The largest scale at which a pass of the policy's warps samples a line: |a - b d / e|
  along x, e along y, over every map of its geometric ops at levels up to its maximum, two
  composed (a warp takes at most two layers' ops, `randaugment_batch`) and the flip (which
  changes no scale). inf where some map's e could be <= 0 (a vertical mirror, or a rotation of
  90 degrees or more), which the two passes cannot sample (`affine`)."""
  names = [n for n in policy.ops if n in policies.GEOMETRIC_OPS]
  levels = np.linspace(0.0, policy.magnitude_max / policies.LEVEL_DENOM, 41)
  linear = [np.eye(2)]
  with jax.ensure_compile_time_eval():
    for name in names:
      for negate in (False, True):
        m = np.asarray(jax.vmap(lambda lv, name=name, negate=negate: geometric_matrix(
            name, lv, negate, 2, 2))(levels))
        linear += list(np.stack([m[:, [0, 1]], m[:, [3, 4]]], axis=1))
  maps = np.stack(linear)
  pairs = np.einsum('aij,bjk->abik', maps, maps).reshape(-1, 2, 2)
  e = pairs[:, 1, 1]
  if np.min(e) <= 1e-6:
    return math.inf
  along_x = np.abs(np.linalg.det(pairs) / e)
  return float(max(np.max(along_x), np.max(e)))


def rotation_share(policy: policies.RandAugmentPolicy) -> float:
  """The expected share of images whose first warp rotates (both passes then scale): the
  first warp takes the first two layers' geometric ops."""
  per_layer = policy.prob * policy.ops.count('Rotate') / max(len(policy.ops), 1)
  return 1.0 - (1.0 - per_layer) ** min(policy.num_layers, 2)


def geometric_matrix(name: str, level, negate, height: int, width: int):
  """The affine data of timm's op `name` at `level` (magnitude / 10), sign flipped by `negate`."""
  signed = lambda v: jnp.where(negate, -v, v)  # timm's `_randomly_negate`.
  one, zero = jnp.ones(()), jnp.zeros(())
  if name == 'Rotate':
    angle = signed(level * 30.0) * math.pi / 180
    cy, cx = (height - 1) / 2, (width - 1) / 2
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])
  if name == 'ShearX':
    return jnp.stack([one, signed(level * 0.3), zero, zero, one, zero])
  if name == 'ShearY':
    return jnp.stack([one, zero, zero, signed(level * 0.3), one, zero])
  if name == 'TranslateXRel':
    return jnp.stack([one, zero, signed(level * 0.45) * width, zero, one, zero])
  if name == 'TranslateYRel':
    return jnp.stack([one, zero, zero, zero, one, signed(level * 0.45) * height])
  raise ValueError(f'{name!r} is not a geometric RandAugment op')


def value_op(image, name: str, level, negate, form: str = 'gather'):
  """timm's value op `name` at `level` (magnitude / 10), sign flipped by `negate`."""
  signed = lambda v: jnp.where(negate, -v, v)
  enhance = level * 1.8 + 0.1
  increasing = 1.0 + signed(level * 0.9)
  ops = {
      'AutoContrast': lambda: auto_contrast(image),
      'Equalize': lambda: equalize(image, form),
      'Invert': lambda: invert(image),
      'Posterize': lambda: posterize(image, (level * 4).astype(jnp.int32)),
      'PosterizeIncreasing': lambda: posterize(image, 4 - (level * 4).astype(jnp.int32)),
      'Solarize': lambda: solarize(image, (level * 256).astype(jnp.int32)),
      'SolarizeIncreasing': lambda: solarize(image, 256 - (level * 256).astype(jnp.int32)),
      'SolarizeAdd': lambda: solarize_add(image, (level * 110).astype(jnp.int32)),
      'Color': lambda: color(image, enhance),
      'Contrast': lambda: contrast(image, enhance),
      'Brightness': lambda: brightness(image, enhance),
      'Sharpness': lambda: sharpness(image, enhance),
      'ColorIncreasing': lambda: color(image, increasing),
      'ContrastIncreasing': lambda: contrast(image, increasing),
      'BrightnessIncreasing': lambda: brightness(image, increasing),
      'SharpnessIncreasing': lambda: sharpness(image, increasing),
  }
  if name not in ops:
    raise ValueError(f'Unknown RandAugment value op {name!r}')
  return ops[name]()


def apply_op(image, name: str, magnitude, negate, fill=policies.DEFAULT_FILL,
             form: str = 'gather'):
  """Applies timm's op `name` at `magnitude` (0..10) to one uint8 image [H, W, 3]."""
  level = jnp.asarray(magnitude, jnp.float32) / policies.LEVEL_DENOM
  if name in policies.GEOMETRIC_OPS:
    matrix = geometric_matrix(name, level, negate, image.shape[0], image.shape[1])
    return affine(image, matrix, fill, form)
  return value_op(image, name, level, negate, form)


def _magnitude(key, policy):
  if math.isinf(policy.magnitude_std):
    magnitude = jax.random.uniform(key, maxval=policy.magnitude)
  elif policy.magnitude_std > 0:
    magnitude = policy.magnitude + policy.magnitude_std * jax.random.normal(key)
  else:
    magnitude = jnp.asarray(policy.magnitude, jnp.float32)
  return jnp.clip(magnitude, 0.0, policy.magnitude_max)


def layer_parameters(key, policy: policies.RandAugmentPolicy):
  """One layer's draws for one image: (op index into `policy.ops`, applied, magnitude, negate).

  Op uniform over `policy.ops`, applied with probability `policy.prob`, magnitude N(M, std)
  clipped to [0, max] (uniform in [0, M] for std inf), sign flipped with probability 1/2.
  """
  k_op, k_apply, k_mag, k_sign = jax.random.split(key, 4)
  return (jax.random.randint(k_op, (), 0, len(policy.ops)),
          jax.random.uniform(k_apply) < policy.prob, _magnitude(k_mag, policy),
          jax.random.uniform(k_sign) > 0.5)


def compose(first, then):
  """The affine data (as `affine` takes it) of warping by `first`, then by `then`: with PIL's
  output-to-input maps, the product first @ then."""
  def square(m):
    return jnp.stack([m[0:3], m[3:6], jnp.asarray([0.0, 0.0, 1.0])])
  return (square(first) @ square(then))[:2].reshape(6)


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def mirror_matrix(width: int):
  """The affine data of a horizontal flip: output (x, y) reads the input at (W - 1 - x, y)."""
  return jnp.asarray([-1.0, 0.0, width - 1.0, 0.0, 1.0, 0.0])


def on_chosen(images, chosen, fn, form: str = 'gather', chunk: int = 8):
  """`fn` (uint8 [K, H, W, 3] -> the same) on the images of [B, H, W, 3] where `chosen` [B],
  the others as they are: the chosen images are gathered `chunk` at a time (a loop that runs once
  unless more than `chunk` were chosen), transformed and put back, so that a batch pays for an op
  that a few images draw on those images only, not on all of them. `fn` also gets each slot's
  index into the batch, `B` for the slots past the chosen ones (what it makes of those is
  dropped).
  """
  batch = images.shape[0]
  chunk = max(1, min(chunk, batch))
  count = jnp.sum(chosen.astype(jnp.int32))
  order = jnp.concatenate([jnp.argsort(~chosen, stable=True),  # The chosen ones first.
                           jnp.zeros((chunk,), jnp.int32)])

  def body(carry):
    start, images = carry
    valid = start + jnp.arange(chunk) < count
    index = jax.lax.dynamic_slice(order, (start,), (chunk,))
    picked = jnp.where(valid, index, batch)
    if form == 'gather':
      # Slots past the chosen ones point outside the batch: read clipped, written nowhere.
      taken = jnp.take(images, picked, axis=0, mode='clip')
      return start + chunk, images.at[picked].set(fn(taken, picked), mode='drop')
    # TPUs: one dynamic slice per slot and in-place updates, each a whole image (contiguous
    # along the batch axis), where a gather and a scatter run slowly and one-hot products pass
    # over the whole batch. Updates clamp their index instead of dropping it, so a slot past
    # the chosen ones reads the first slot's image and writes it back unchanged, before the
    # first slot writes what that image became (the updates run from the last slot down).
    source = jnp.where(valid, index, index[0])
    taken = jnp.stack([jax.lax.dynamic_index_in_dim(images, source[k], keepdims=False)
                       for k in range(chunk)])
    out = jnp.where(valid.reshape((chunk,) + (1,) * (images.ndim - 1)), fn(taken, picked),
                    taken)
    for k in reversed(range(chunk)):
      images = jax.lax.dynamic_update_index_in_dim(images, out[k], source[k], 0)
    return start + chunk, images

  return jax.lax.while_loop(lambda carry: carry[0] < count, body, (jnp.int32(0), images))[1]


def equalize_chosen(images, chosen, form: str = 'gather', chunk: int = 8):
  """`equalize` of the images [B, H, W, 3] where `chosen` [B], the others as they are
  (`on_chosen`: RandAugment picks Equalize for 1 image in 30 a layer)."""
  return on_chosen(images, chosen, lambda x, _: jax.vmap(lambda i: equalize(i, form))(x), form,
                   chunk)


# Value ops that need more than one pass over an image (statistics, a filter, a histogram): run
# on the images that drew them only (`on_chosen`); the others are one elementwise pass.
_GATHERED_OPS = ('AutoContrast', 'Contrast', 'ContrastIncreasing', 'Color', 'ColorIncreasing',
                 'Sharpness', 'SharpnessIncreasing')


def _value_select(images, names, index, level, negate, form):
  """Per image, `value_op` number index - 1 of `names` (index 0: the image as it is)."""
  if not names:
    return images
  branches = [lambda x, lv, ng: x] + [
      (lambda x, lv, ng, name=name: value_op(x, name, lv, ng, form)) for name in names]
  return jax.vmap(lambda x, j, lv, ng: jax.lax.switch(j, branches, x, lv, ng))(
      images, index, level, negate)


def value_layer(images, op, apply, level, negate, policy: policies.RandAugmentPolicy,
                form: str = 'gather'):
  """One RandAugment layer's value ops on [B, H, W, 3]: image b gets `policy.ops[op[b]]` where
  `apply[b]` and that op is a value op, else stays as it is.

  The ops with statistics or a filter (`_GATHERED_OPS`, 4 in 30 images a layer) and Equalize (1
  in 30) run on the images that drew them: one `on_chosen` for both (room for twice their
  expected number), Equalize on those of them that drew it (a second `on_chosen`, over the few
  gathered images rather than the batch). Then the per-pixel ops, a select among their outputs
  in one elementwise pass over the batch, which XLA fuses with the pass that reads the layer's
  output.
  """
  ops = policy.ops
  values = [n for n in ops if n not in policies.GEOMETRIC_OPS]
  groups = [[n for n in values if n not in _GATHERED_OPS and n != 'Equalize'],
            [n for n in values if n in _GATHERED_OPS], [n for n in values if n == 'Equalize']]
  batch = images.shape[0]
  indices = []
  for names in groups:
    index = jnp.zeros(op.shape, jnp.int32)
    for j, name in enumerate(names):
      index = jnp.where(apply & (op == ops.index(name)), j + 1, index)
    indices.append(index)
  gathered, equalized = groups[1], groups[2]

  def chunk_for(count, size):
    return int(math.ceil(2 * size * policy.prob * count / len(ops))) + 1

  def fn(x, picked):
    take = lambda v: jnp.take(v, picked, mode='clip')  # Slots past the chosen: index `batch`.
    if gathered:
      x = _value_select(x, gathered, take(indices[1]), take(level), take(negate), form)
    if equalized:
      chosen = (picked < batch) & (take(indices[2]) > 0)
      x = on_chosen(x, chosen, lambda y, _: jax.vmap(lambda i: equalize(i, form))(y), form,
                    chunk_for(len(equalized), batch))
    return x

  if gathered or equalized:
    chosen = (indices[1] > 0) | (indices[2] > 0)
    images = on_chosen(images, chosen, fn, form,
                       chunk_for(len(gathered) + len(equalized), batch))
  # The select last (its images and `on_chosen`'s are disjoint), so that it fuses with the
  # pass that reads the layer's output instead of being written out before `on_chosen`.
  if groups[0]:
    images = _value_select(images, groups[0], indices[0], level, negate, form)
  return images


def randaugment(image, key, policy: policies.RandAugmentPolicy, fill=policies.DEFAULT_FILL,
                form: str = 'gather', flip: jax.Array | None = None):
  """`randaugment_batch` on one uint8 image [H, W, 3] with its key (and flip)."""
  return randaugment_batch(image[None], key[None], policy, fill, form,
                           None if flip is None else jnp.asarray(flip)[None])[0]


def randaugment_batch(images, keys, policy: policies.RandAugmentPolicy,
                      fill=policies.DEFAULT_FILL, form: str = 'gather',
                      flip: jax.Array | None = None, warp: Warp | None = None):
  """`policy.num_layers` random ops on each uint8 image of [B, H, W, 3], drawn per image by
  `layer_parameters` from its key in `keys` [B]; images where `flip` [B] holds are mirrored first;
  the warps by `warp` (default `plain_warp(fill, form)`), whose maps stay within
  `warp_scale_bound(policy)`.

  Each layer applies one op, geometric or value. The program runs the layers' value ops in order
  with n - 1 warps between them (one for n = 1), every layer's geometric op composed into the
  warp next to it: layer i's into the warp after layer i - 1's value op (the first warp for
  layers 0 and 1), which is the op's place in the sequence since the layer's own value op is
  then the identity. The flip joins the first warp: every value op commutes with a horizontal
  mirror (per-pixel maps, per-channel statistics, a symmetric 3x3 filter). So a batch runs
  n - 1 warps instead of n warps and a flip, and each image's ops happen in timm's order; where
  two geometric ops share a warp (two layers of 2, for 1 image in 36 under the default policy),
  the image is resampled once for the composed map instead of twice (the same geometry, one
  interpolation's rounding and blur fewer). The value ops: `value_layer`.
  """
  _, height, width, _ = images.shape
  ops = policy.ops
  geometric = [n for n in ops if n in policies.GEOMETRIC_OPS]
  warp = plain_warp(fill, form) if warp is None else warp
  layers = jax.vmap(lambda k: [layer_parameters(layer_key, policy)
                               for layer_key in jax.random.split(k, policy.num_layers)])(keys)
  identity = jnp.broadcast_to(jnp.asarray(IDENTITY), (images.shape[0], 6))
  warps = [identity] * max(policy.num_layers - 1, 1)
  if flip is not None:
    warps[0] = jnp.where(flip[:, None], mirror_matrix(width), identity)
  if geometric:
    for i, (op, apply, magnitude, negate) in enumerate(layers):
      level = magnitude / policies.LEVEL_DENOM
      matrix = identity  # The identity where this layer's op moves no pixels.
      for name in geometric:
        chosen = (apply & (op == ops.index(name)))[:, None]
        matrix = jnp.where(chosen, jax.vmap(
            lambda lv, ng, name=name: geometric_matrix(name, lv, ng, height, width))(
                level, negate), matrix)
      slot = max(i - 1, 0)
      warps[slot] = jax.vmap(compose)(warps[slot], matrix)
  for i, (op, apply, magnitude, negate) in enumerate(layers):
    images = value_layer(images, op, apply, magnitude / policies.LEVEL_DENOM, negate, policy,
                         form)
    if i < len(warps) and (geometric or flip is not None):
      images = warp(images, warps[i])
  return images
