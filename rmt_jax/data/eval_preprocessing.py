"""The evaluation preprocessing stored with weights: how an image file becomes a model input.

A model answers well only on inputs prepared as its evaluation prepared them: the digits demo
evaluates 32x32 images whole (crop_pct 1.0, bilinear), the official weights 224 crops at
crop_pct 0.875 (bicubic). So training runs (`rmt_jax.train.loop`, from `config.data`) and the
converter (`OFFICIAL`) store the recipe with the weights, in their metadata:

    "eval_preprocessing": {"image_size": 224, "crop_pct": 0.875, "interpolation": "bicubic",
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

that is: resize the shorter side to floor(image_size / crop_pct), centre-crop image_size,
subtract mean and divide by std (fractions of 255, timm's convention). `python -m
rmt_jax.predict`, `python -m rmt_jax.visualize` (`resolve`: the stored recipe, flags over it)
and the evaluation-only mode of `main.py` (`from_metadata`) read it back; weights written before
it was stored get a default: `OFFICIAL` for the commands, `config.data`'s for evaluation only.
The transform itself is TensorFlow's (`rmt_jax.data.augment`); this module has no TensorFlow, so
that reading the recipe costs nothing.
"""

import dataclasses
from typing import Any, Mapping

from absl import flags

METADATA_KEY = 'eval_preprocessing'
# timm's IMAGENET_DEFAULT_MEAN / _STD, which every official RMT run normalises with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The resize methods `rmt_jax.data.augment.resize` takes (tf.image.resize's names, antialiased like
# PIL's when downscaling).
INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'area', 'lanczos3')

STORED = 'stored with the weights'
DEFAULT = 'the default for weights that store none'


@dataclasses.dataclass(frozen=True)
class EvalPreprocessing:
  """The evaluation transform of one set of weights; the defaults are the official ones.

  Attributes:
    image_size: side of the square crop the model sees.
    crop_pct: the crop's fraction of the resized shorter side (1.0: the whole image).
    interpolation: the resize's method ('bicubic', 'bilinear', ...; see `augment.resize`).
    mean: per-channel RGB mean subtracted, as fractions of 255.
    std: per-channel RGB standard deviation divided by, as fractions of 255.
  """
  image_size: int = 224
  crop_pct: float = 0.875
  interpolation: str = 'bicubic'
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def to_metadata(self) -> dict[str, Any]:
    """The JSON-serialisable dict stored under `METADATA_KEY`."""
    return {'image_size': int(self.image_size), 'crop_pct': float(self.crop_pct),
            'interpolation': str(self.interpolation), 'mean': [float(m) for m in self.mean],
            'std': [float(s) for s in self.std]}

  def describe(self) -> str:
    """One readable line, e.g. '224 px centre crop at crop_pct 0.875, bicubic, ImageNet
    mean/std'."""
    if (tuple(self.mean), tuple(self.std)) == (IMAGENET_MEAN, IMAGENET_STD):
      normalisation = 'ImageNet mean/std'
    else:
      normalisation = f'mean {list(self.mean)}, std {list(self.std)}'
    return (f'{self.image_size} px centre crop at crop_pct {self.crop_pct}, '
            f'{self.interpolation}, {normalisation}')


OFFICIAL = EvalPreprocessing()


def from_config(data: Any) -> EvalPreprocessing:
  """What the input pipeline's evaluation does under `data` (a run's `config.data`).

  Args:
    data: a config with the fields of `input_pipeline.default_config()` (image_size, crop_pct,
      interpolation, mean, std).
  """
  return EvalPreprocessing(image_size=int(data.image_size), crop_pct=float(data.crop_pct),
                           interpolation=str(data.interpolation),
                           mean=tuple(float(m) for m in data.mean),
                           std=tuple(float(s) for s in data.std))


def from_metadata(metadata: Mapping[str, Any],
                  default: EvalPreprocessing = OFFICIAL) -> tuple[EvalPreprocessing, str]:
  """The preprocessing stored in a weights description, and where it came from.

  Args:
    metadata: the description stored with the weights (`checkpoint.load_variables`).
    default: for weights that store none (written before it was stored).

  Returns:
    (preprocessing, `STORED` or `DEFAULT`). Fields missing from a stored dict take `default`'s
    values; fields this version does not know are ignored (a newer writer's additions).
  """
  stored = metadata.get(METADATA_KEY)
  if not stored:
    return default, DEFAULT
  known = {f.name for f in dataclasses.fields(EvalPreprocessing)}
  fields = {k: tuple(v) if k in ('mean', 'std') else v for k, v in stored.items() if k in known}
  return dataclasses.replace(default, **fields), STORED


def resolve(metadata: Mapping[str, Any], overridden_by: str = 'the caller',
            **overrides: Any) -> tuple[EvalPreprocessing, str]:
  """The stored preprocessing with the caller's overrides (e.g. command-line flags) applied.

  Args:
    metadata: the description stored with the weights.
    overridden_by: who gives the overrides, for the description (e.g. 'the flags').
    **overrides: `EvalPreprocessing` fields; None leaves the stored value.

  Returns:
    (preprocessing, where it came from: `STORED`, `DEFAULT`, or e.g. 'image_size from the
    flags; the rest stored with the weights').

  Raises:
    ValueError: an unknown interpolation, or a size or crop fraction out of range.
  """
  preprocessing, origin = from_metadata(metadata)
  given = {k: v for k, v in overrides.items() if v is not None}
  if given:
    preprocessing = dataclasses.replace(preprocessing, **given)
    origin = f'{", ".join(given)} from {overridden_by}; the rest {origin}'
  if preprocessing.interpolation not in INTERPOLATIONS:
    raise ValueError(f'interpolation must be one of {", ".join(INTERPOLATIONS)}, got '
                     f'{preprocessing.interpolation!r}')
  if preprocessing.image_size < 1 or not 0 < preprocessing.crop_pct <= 1:
    raise ValueError(f'image_size must be at least 1 and crop_pct in (0, 1], got '
                     f'{preprocessing.image_size} and {preprocessing.crop_pct}')
  return preprocessing, origin


def add_flags(flag_values: flags.FlagValues) -> None:
  """Defines, on a command's `flag_values`, the flags that override the stored preprocessing:
  --image_size, --crop_pct, --interpolation (each None unless given; see `resolve`)."""
  flags.DEFINE_integer('image_size', None, 'crop size (default: the one stored with the '
                       'weights, else 224)', flag_values=flag_values)
  flags.DEFINE_float('crop_pct', None, 'centre crop fraction of the resized shorter side '
                     '(default: the one stored with the weights, else the official 0.875)',
                     flag_values=flag_values)
  flags.DEFINE_enum('interpolation', None, list(INTERPOLATIONS), 'resize method (default: the '
                    'one stored with the weights, else bicubic)', flag_values=flag_values)
