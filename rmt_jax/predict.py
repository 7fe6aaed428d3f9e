"""Classify image files with RMT weights and print the top classes.

    python -m rmt_jax.predict --weights DIR cat.jpg dog.png [--model rmt_s] [--json]

`DIR` is a variables directory (from `python -m rmt_jax.convert torch2flax`) or a training
workdir, local or on an object store (gs://...); the model is rebuilt from the description
stored with the weights, so `--model` is only a check. Images get the evaluation preprocessing
stored with the weights (`rmt_jax.data.eval_preprocessing`: the run's own, e.g. 32 px whole
digits for the demo; the official 224 crop at crop_pct 0.875, bicubic, ImageNet mean/std for
converted weights and for weights that store none), each field overridable by its flag
(`--image_size`, `--crop_pct`, `--interpolation`), and one line on stderr says which was used
and where it came from. They go through the model in batches of a fixed size (one compilation
whatever the number of images). Class names are those stored with the weights (the folder names
of a model trained on an image folder; ImageNet's for converted and ImageNet models), else
ImageNet's readable names for 1000-class models, else the class indices.
"""

import json
import sys
from typing import Any

from absl import flags

from rmt_jax import kernels as kernels_lib
from rmt_jax.data import eval_preprocessing
from rmt_jax.runtime import command_line
from rmt_jax.runtime import console

PROGRAM = 'python -m rmt_jax.predict'


class PredictError(Exception):
  """Bad input to the predict command; the message says what to fix."""


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('weights', None, 'variables directory or training workdir (local or '
                      'gs://...)', flag_values=flag_values, required=True)
  flags.DEFINE_string('model', None, 'variant, e.g. rmt_s or RMT_S; default: the one the '
                      'weights name (given, it must agree with them)', flag_values=flag_values)
  flags.DEFINE_integer('top', 5, 'classes to print per image', flag_values=flag_values)
  flags.DEFINE_integer('batch_size', 16, 'images per forward pass (the last batch is padded)',
                       flag_values=flag_values)
  eval_preprocessing.add_flags(flag_values)
  flags.DEFINE_enum('kernels', 'auto', list(kernels_lib.KERNELS), 'the forms of the operations '
                    "that have backend-specific ones: auto (the devices' own), xla (plain), "
                    'cpu, tpu (see rmt_jax.kernels.selection)', flag_values=flag_values)
  flags.DEFINE_boolean('json', False, 'print one JSON list: [{"image", "top": [{"label", '
                       '"name", "probability"}]}]', flag_values=flag_values)


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status (errors: one line on stderr, status 1;
  usage errors: status 2).

  Args:
    argv: the arguments after the program name: flags and image files (JPEG, PNG, GIF, BMP),
      local or gs://...; None takes `sys.argv[1:]`.
  """
  options = flags.FlagValues()
  _define_flags(options)
  images = command_line.parse(options, argv, program=PROGRAM, doc=__doc__,
                              positional=('image', '...'))
  try:
    rows = predict(options.weights, images, model_name=options.model, top=options.top,
                   batch_size=options.batch_size, image_size=options.image_size,
                   crop_pct=options.crop_pct, interpolation=options.interpolation,
                   kernels=options.kernels)
  except PredictError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if options.json:
    print(json.dumps(rows, indent=1))
    return 0
  for row in rows:
    print(row['image'])
    for rank, entry in enumerate(row['top'], 1):
      print(f"  {rank}. {entry['name']:<12} {entry['probability']:.4f}")
  return 0


def predict(weights: str, images: list[str], *, model_name: str | None = None, top: int = 5,
            batch_size: int = 16, image_size: int | None = None,
            crop_pct: float | None = None,
            interpolation: str | None = None, kernels: str = 'auto') -> list[dict[str, Any]]:
  """Top classes and probabilities for each image file.

  The images are preprocessed as the weights' metadata says (`eval_preprocessing.resolve`:
  the stored recipe, else the official one), with the fields given here overriding it; one
  line on stderr says which preprocessing was used and where it came from.

  Args:
    weights: a variables directory or a training workdir.
    images: image file paths (local or gs://...).
    model_name: if given, the variant the weights must hold.
    top: how many classes per image.
    batch_size: images per forward pass; the last batch is padded to it.
    image_size: the crop size; None: the stored one.
    crop_pct: centre crop fraction of the resized shorter side; None: the stored one.
    interpolation: resize method (`eval_preprocessing.INTERPOLATIONS`); None: the stored one.

  Returns:
    [{'image': path, 'top': [{'label': int, 'name': str, 'probability': float}, ...]}, ...]
    in the order of `images`, each 'top' in decreasing probability.

  Raises:
    PredictError: unreadable weights or images, weights of another variant, or a bad
      preprocessing field.
  """
  # Imported here so that `--help` and argument errors answer at once.
  console.quiet_startup()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # pylint: disable=g-import-not-at-top
  from rmt_jax.weights import checkpoint
  from rmt_jax.data import class_names
  from rmt_jax.data import input_pipeline
  from rmt_jax.weights import loading
  from rmt_jax.models import canonical_name
  # pylint: enable=g-import-not-at-top

  # TensorFlow only decodes images here; it must not claim an accelerator that JAX will use.
  tf.config.set_visible_devices([], 'GPU')
  if batch_size < 1 or top < 1:
    raise PredictError('--batch_size and --top must be at least 1')
  try:
    wanted = canonical_name(model_name) if model_name else None
    model, variables, metadata = loading.load_with_metadata(weights, kernels=kernels)
  except (ValueError, checkpoint.CheckpointNotFoundError) as e:
    raise PredictError(str(e)) from None
  stored = metadata['model']
  if wanted and canonical_name(stored) != wanted:
    raise PredictError(f'{weights} holds {stored} weights, not {model_name}')
  missing = [p for p in images if not tf.io.gfile.exists(p) or tf.io.gfile.isdir(p)]
  if missing:
    raise PredictError(f'no such image file: {", ".join(missing)}')
  try:
    preprocessing, origin = eval_preprocessing.resolve(
        metadata, 'the flags', image_size=image_size, crop_pct=crop_pct,
        interpolation=interpolation)
  except ValueError as e:
    raise PredictError(str(e)) from None

  cfg = input_pipeline.with_eval_preprocessing(input_pipeline.default_config(), preprocessing)
  pixels = []
  for path in images:
    try:
      raw = {'image': tf.io.read_file(path), 'label': tf.constant(0, tf.int64)}
      pixels.append(input_pipeline.eval_preprocess(raw, cfg)['image'].numpy())
    except tf.errors.OpError:
      raise PredictError(f'cannot decode {path}: not a JPEG, PNG, GIF, BMP or WebP image'
                         ) from None
  print(f'preprocessing: {preprocessing.describe()} ({origin})', file=sys.stderr)
  forward = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x), axis=-1))
  probs = []
  for start in range(0, len(pixels), batch_size):
    chunk = np.stack(pixels[start:start + batch_size])
    # Padded to the batch size: every call has the same shape, so it compiles once.
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]),
                                             chunk.dtype)])
    probs.append(np.asarray(forward(variables, padded))[:len(chunk)])
  probs = np.concatenate(probs)
  num_classes = probs.shape[-1]
  names = metadata.get('class_names') or class_names.default_class_names(num_classes)
  if len(names) != num_classes:
    raise PredictError(f'{weights} stores {len(names)} class names for a model with '
                       f'{num_classes} outputs')
  rows = []
  for path, p in zip(images, probs):
    order = np.argsort(-p, kind='stable')[:top]
    rows.append({'image': path, 'top': [{'label': int(i), 'name': str(names[i]),
                                         'probability': float(p[i])} for i in order]})
  return rows


if __name__ == '__main__':
  sys.exit(main())
