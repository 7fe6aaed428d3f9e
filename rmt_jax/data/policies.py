"""The augmentation recipe's parameters, with no TensorFlow and no jax: timm's RandAugment policy
strings and the Mixup/CutMix settings.

Both implementations read them: the host's TensorFlow ops (`randaugment.py`, `mixup.py`) and the
jax batch ops that run inside the compiled train step (`batch_augment.py`).
"""

import dataclasses
import math

LEVEL_DENOM = 10.0

# timm's `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS`, in its order.
RAND_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel')
RAND_INCREASING_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
    'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
    'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel')
# The ops that move pixels (an affine map of the image plane); the others map values.
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')

DEFAULT_FILL = (124, 116, 104)  # round(255 * ImageNet mean), timm's `img_mean` hparam.


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
  num_layers: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.0
  magnitude_max: float = 10.0
  prob: float = 0.5
  ops: tuple[str, ...] = RAND_TRANSFORMS


def parse_policy(config_str: str) -> RandAugmentPolicy | None:
  """Parses timm's RandAugment string; '' or 'none' disables it (returns None)."""
  if not config_str or config_str.lower() == 'none':
    return None
  parts = config_str.split('-')
  if parts[0] != 'rand':
    raise ValueError(f"RandAugment policy must start with 'rand', got {config_str!r}")
  fields = dataclasses.asdict(RandAugmentPolicy())
  increasing = False
  for part in parts[1:]:
    if part.startswith('mstd'):
      std = float(part[4:])
      fields['magnitude_std'] = math.inf if std > 100 else std
    elif part.startswith('mmax'):
      fields['magnitude_max'] = float(part[4:])
    elif part.startswith('inc'):
      increasing = bool(int(part[3:]))
    elif part.startswith('m'):
      fields['magnitude'] = float(part[1:])
    elif part.startswith('n'):
      fields['num_layers'] = int(part[1:])
    elif part.startswith('p'):
      fields['prob'] = float(part[1:])
    else:
      raise ValueError(f'Unknown RandAugment section {part!r} in {config_str!r}')
  fields['ops'] = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
  return RandAugmentPolicy(**fields)


@dataclasses.dataclass(frozen=True)
class MixupConfig:
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.1
  num_classes: int = 1000

  @property
  def active(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)
