"""Classify image files with RMT weights and print the top classes.

    python -m rmt_jax.predict --model rmt_s --weights DIR cat.jpg dog.png

`DIR` is a variables directory (from `python -m rmt_jax.convert torch2flax` or a training run,
see `rmt_jax.checkpoint.load_variables`). Images get the official evaluation preprocessing of the
input pipeline (shorter side to size / crop_pct, bicubic; centre crop; ImageNet mean/std). Class
names for 1000-class models are the TFDS `imagenet2012` labels (WordNet synset ids, e.g.
n01440764); other models print the names stored with their weights, or class indices.
"""

import argparse
import os
import sys

# TensorFlow only decodes images here; it must not claim an accelerator that JAX will use.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def imagenet_class_names() -> list[str]:
  """The 1000 labels of TFDS `imagenet2012`, in label order (synset ids); reads no data."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as empty:
    return list(tfds.builder('imagenet2012', data_dir=empty).info.features['label'].names)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True, help="variant, e.g. rmt_s or RMT_S")
  parser.add_argument('--weights', required=True, help='variables directory')
  parser.add_argument('--top', type=int, default=5, help='classes to print per image')
  parser.add_argument('--image-size', type=int, default=None,
                      help='crop size (default: the one stored with the weights, else 224)')
  parser.add_argument('--crop-pct', type=float, default=0.875,
                      help='centre crop fraction of the resized image (official: 0.875)')
  parser.add_argument('images', nargs='+', help='image files (JPEG, PNG, GIF, BMP)')
  args = parser.parse_args(argv)
  try:
    rows = predict(args.model, args.weights, args.images, top=args.top,
                   image_size=args.image_size, crop_pct=args.crop_pct)
  except PredictError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for path, ranked in rows:
    print(path)
    for rank, (name, prob) in enumerate(ranked, 1):
      print(f'  {rank}. {name:<12} {prob:.4f}')
  return 0


class PredictError(Exception):
  """Bad input to the predict command; the message says what to fix."""


def predict(model_name: str, weights: str, images: list[str], *, top: int = 5,
            image_size: int | None = None,
            crop_pct: float = 0.875) -> list[tuple[str, list[tuple[str, float]]]]:
  """Top classes and probabilities for each image file.

  Args:
    model_name: the variant the weights belong to.
    weights: a variables directory.
    images: image file paths.
    top: how many classes per image.
    image_size: the crop size; default from the weights' metadata, else 224.
    crop_pct: centre crop fraction.

  Returns:
    [(path, [(class name, probability), ...]), ...] in the order of `images`.

  Raises:
    PredictError: unreadable weights or images, or weights of another variant.
  """
  # Imported here so that `--help` and argument errors answer at once.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from rmt_jax import checkpoint, input_pipeline  # pylint: disable=g-import-not-at-top
  from rmt_jax.models import canonical_name, create_model  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')
  try:
    name = canonical_name(model_name)
    variables, metadata = checkpoint.load_variables(weights)
  except (ValueError, checkpoint.CheckpointNotFoundError) as e:
    raise PredictError(str(e)) from None
  stored = metadata.get('model')
  if stored and canonical_name(stored) != name:
    raise PredictError(f'{weights} holds {stored} weights, not {model_name}')
  model = create_model(name, **metadata.get('model_overrides', {}))
  missing = [p for p in images if not os.path.isfile(p)]
  if missing:
    raise PredictError(f'no such image file: {", ".join(missing)}')

  cfg = input_pipeline.default_config()
  cfg.image_size = image_size or metadata.get('image_size', 224)
  cfg.crop_pct = crop_pct
  batch = []
  for path in images:
    try:
      raw = {'image': tf.io.read_file(path), 'label': tf.constant(0, tf.int64)}
      batch.append(input_pipeline.eval_preprocess(raw, cfg)['image'].numpy())
    except tf.errors.OpError:
      raise PredictError(f'cannot decode {path}: not a JPEG, PNG, GIF, BMP or WebP image'
                         ) from None
  logits = jax.jit(model.apply)({k: variables[k] for k in ('params', 'batch_stats')},
                                np.stack(batch))
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  num_classes = probs.shape[-1]
  names = metadata.get('class_names') or (
      imagenet_class_names() if num_classes == 1000 else [str(i) for i in range(num_classes)])
  rows = []
  for path, p in zip(images, probs):
    order = np.argsort(-p, kind='stable')[:top]
    rows.append((path, [(names[i], float(p[i])) for i in order]))
  return rows


if __name__ == '__main__':
  sys.exit(main())
