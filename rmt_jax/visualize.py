"""Draw what RMT attends to: each head's decay prior and attention map around a query point.

    python -m rmt_jax.visualize --weights DIR IMAGE --out attention.png \\
        [--stage S] [--block B] [--query X,Y] [--image_size N] [--crop_pct F] [--interpolation M]
    python -m rmt_jax.visualize --decay_only --model rmt_s --out priors.png [--query X,Y]

The first writes one PNG: the (preprocessed) image with the query token marked, and for each
head of block B of stage S its decay prior `gamma_h ** manhattan_distance` around the query and
the attention of the query over the map (for axial blocks the effective 2-d attention of the row
then column passes), both upsampled onto the image. `DIR` is a variables directory or a training
workdir; the model comes from its metadata, and the image is preprocessed as `rmt_jax.predict`
does it (the evaluation preprocessing stored with the weights, each field overridable by its
flag). The second draws the priors of every stage's heads for an image of --image_size (default
224), without weights. X, Y are pixels of the centre crop (default: its centre). Needs
matplotlib (in requirements.txt; the model does not).
"""

import os
import sys
from typing import Any

from absl import flags
import numpy as np

from rmt_jax import kernels as kernels_lib
from rmt_jax.data import eval_preprocessing
from rmt_jax.runtime import command_line

# TensorFlow only decodes images here; it must not claim an accelerator that JAX will use.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

PROGRAM = 'python -m rmt_jax.visualize'
_PRIOR_CMAP, _ATTENTION_CMAP, _ALPHA = 'viridis', 'inferno', 0.6


class VisualizeError(Exception):
  """Bad input to the visualize command; the message says what to fix."""


def load_model(path: str, kernels: str = 'auto') -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """(model, {'params', 'batch_stats'}, metadata) from a variables directory or a training
  workdir; `kernels` the model's forms (see rmt_jax.kernels.selection)."""
  from rmt_jax.weights import checkpoint  # pylint: disable=g-import-not-at-top
  from rmt_jax.weights import loading  # pylint: disable=g-import-not-at-top
  try:
    return loading.load_with_metadata(path, kernels=kernels)
  except checkpoint.CheckpointNotFoundError as e:
    raise VisualizeError(str(e)) from None


def load_image(path: str, preprocessing: eval_preprocessing.EvalPreprocessing
               ) -> tuple[np.ndarray, np.ndarray]:
  """An image file preprocessed as `rmt_jax.predict` does it.

  Args:
    path: the image file.
    preprocessing: e.g. the one stored with the weights (`eval_preprocessing.resolve`).

  Returns:
    (uint8 (size, size, 3) crop to draw, float32 (size, size, 3) normalised model input).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from rmt_jax.data import augment  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  if not os.path.isfile(path):
    raise VisualizeError(f'no such image file: {path}')
  try:
    crop = augment.decode_and_center_crop(
        tf.io.read_file(path), size=preprocessing.image_size, crop_pct=preprocessing.crop_pct,
        interpolation=preprocessing.interpolation)
  except tf.errors.OpError:
    raise VisualizeError(f'cannot decode {path}: not a JPEG, PNG, GIF, BMP or WebP image'
                         ) from None
  return crop.numpy(), augment.normalize(crop, preprocessing.mean, preprocessing.std).numpy()


def query_token(query: tuple[int, int], image_shape: tuple[int, int],
                map_shape: tuple[int, int]) -> tuple[int, int]:
  """The (row, column) of the map token that covers pixel `query` = (x, y) of the image."""
  (x, y), (height, width), (rows, cols) = query, image_shape, map_shape
  if not (0 <= x < width and 0 <= y < height):
    raise VisualizeError(f'--query {x},{y} is outside the {width}x{height} image')
  return min(y * rows // height, rows - 1), min(x * cols // width, cols - 1)


def _overlay(ax, image: np.ndarray | None, values: np.ndarray, image_shape: tuple[int, int],
             token: tuple[int, int], cmap: str, vmax: float, title: str, label: str) -> None:
  """Draws `values` (a map) stretched over the image's extent, and marks the query token."""
  height, width = image_shape
  rows, cols = values.shape
  extent = (0, width, height, 0)
  if image is not None:
    ax.imshow(image, extent=extent)
  # Nearest: each token stays the block of pixels it stands for.
  ax.imshow(values, extent=extent, cmap=cmap, vmin=0.0, vmax=vmax, interpolation='nearest',
            alpha=_ALPHA if image is not None else 1.0)
  ax.plot((token[1] + 0.5) * width / cols, (token[0] + 0.5) * height / rows, marker='+',
          color='cyan', markersize=8, markeredgewidth=1.5)
  ax.set_title(title, fontsize=7)
  ax.set_label(label)
  ax.set_axis_off()


def attention_figure(image: np.ndarray, priors: np.ndarray, attention: np.ndarray,
                     token: tuple[int, int], log_gammas: np.ndarray, title: str) -> Any:
  """The image, then per head its prior (top row) and the query's attention (bottom row).

  Args:
    image: uint8 (height, width, 3).
    priors: (heads, rows, cols), from `attention_maps.decay_prior`.
    attention: (heads, rows, cols), from `attention_maps.query_attention`.
    token: the query's (row, column) on the map.
    log_gammas: (heads,) the decay rates, for the titles.
    title: the figure's title.

  Returns:
    A matplotlib Figure; its axes are labelled 'image', 'prior/<h>' and 'attention/<h>'.
  """
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  heads = priors.shape[0]
  fig = figure.Figure(figsize=(max(1.7 * (heads + 1), 5.0), 4.0), dpi=100, layout='constrained')
  grid = fig.add_gridspec(2, heads + 1)
  ax = fig.add_subplot(grid[:, 0])
  ax.imshow(image)
  rows, cols = priors.shape[1:]
  ax.plot((token[1] + 0.5) * image.shape[1] / cols, (token[0] + 0.5) * image.shape[0] / rows,
          marker='+', color='cyan', markersize=10, markeredgewidth=2)
  ax.set_title('image, query', fontsize=8)
  ax.set_label('image')
  ax.set_axis_off()
  for h in range(heads):
    gamma = float(np.exp(log_gammas[h]))
    _overlay(fig.add_subplot(grid[0, h + 1]), image, priors[h], image.shape[:2], token,
             _PRIOR_CMAP, 1.0, f'head {h} prior\ngamma {gamma:.4f}', f'prior/{h}')
    # Each head on its own scale: a sharp head's peak would wash out a diffuse one.
    _overlay(fig.add_subplot(grid[1, h + 1]), image, attention[h], image.shape[:2], token,
             _ATTENTION_CMAP, float(attention[h].max()),
             f'head {h} attention\nmax {float(attention[h].max()):.3f}', f'attention/{h}')
  fig.suptitle(title, fontsize=9)
  return fig


def prior_figure(model: Any, image_size: int, query: tuple[int, int]) -> Any:
  """Every stage's heads' decay priors around the pixel `query` of an image_size^2 image.

  Returns:
    A matplotlib Figure, one row per stage; its axes are labelled 'prior/<stage>/<h>'.
  """
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from rmt_jax.models import attention_maps, decay  # pylint: disable=g-import-not-at-top
  stages = len(model.depths)
  shapes = attention_maps.map_shapes(image_size, image_size, stages)
  most = max(model.num_heads)
  fig = figure.Figure(figsize=(max(1.5 * most, 5.0), 1.8 * stages + 0.4), dpi=100,
                       layout='constrained')
  grid = fig.add_gridspec(stages, most)
  for s, shape in enumerate(shapes):
    rates = (model.num_heads[s], model.init_values[s], model.heads_ranges[s])
    token = query_token(query, (image_size, image_size), shape)
    priors = attention_maps.decay_prior(*shape, *token, rates)
    for h, gamma in enumerate(np.exp(decay.log_gamma(*rates))):
      _overlay(fig.add_subplot(grid[s, h]), None, priors[h], (image_size, image_size), token,
               _PRIOR_CMAP, 1.0, f'stage {s} ({shape[0]}x{shape[1]}) head {h}\n'
               f'gamma {gamma:.4f}', f'prior/{s}/{h}')
  fig.suptitle(f'decay priors gamma_h ** manhattan distance\n{image_size}x{image_size} input',
               fontsize=9)
  return fig


def block_attention(model: Any, variables: Any, image: np.ndarray, inputs: np.ndarray,
                    stage: int, block: int, query: tuple[int, int]) -> Any:
  """The figure of one block: captures the model's attention on `inputs` and draws it.

  Args:
    model: an `RMT`.
    variables: its {'params', 'batch_stats'}.
    image: uint8 (size, size, 3), what is drawn.
    inputs: float32 (size, size, 3), what the model sees.
    stage: which stage.
    block: which block of it.
    query: pixel (x, y) of the image.

  Returns:
    `attention_figure`'s Figure.
  """
  from rmt_jax.models import attention_maps, decay  # pylint: disable=g-import-not-at-top
  if not 0 <= stage < len(model.depths):
    raise VisualizeError(f'--stage {stage}: the model has stages 0..{len(model.depths) - 1}')
  if not 0 <= block < model.depths[stage]:
    raise VisualizeError(f'--block {block}: stage {stage} has blocks '
                         f'0..{model.depths[stage] - 1}')
  shape = attention_maps.map_shapes(*image.shape[:2], len(model.depths))[stage]
  token = query_token(query, image.shape[:2], shape)
  _, maps = attention_maps.capture(model, variables, inputs[None])
  attention = np.asarray(attention_maps.query_attention(maps[stage, block], *token, *shape))[0]
  rates = (model.num_heads[stage], model.init_values[stage], model.heads_ranges[stage])
  form = 'axial (row then column)' if model.axial[stage] else 'whole'
  return attention_figure(image, attention_maps.decay_prior(*shape, *token, rates), attention,
                          token, decay.log_gamma(*rates),
                          f'stage {stage} block {block}: {form} attention\n'
                          f'{shape[0]}x{shape[1]} map, query token row {token[0]} col {token[1]}')


def _parse_query(text: str | None, image_size: int) -> tuple[int, int]:
  if text is None:
    return image_size // 2, image_size // 2
  try:
    x, y = (int(v) for v in text.split(','))
  except ValueError:
    raise VisualizeError(f'--query takes X,Y in pixels, got {text!r}') from None
  return x, y


def run(options: flags.FlagValues, image: str | None) -> None:
  """Writes the PNG that the parsed command line asks for (see the module docstring).

  Args:
    options: the command's parsed flags (`main`).
    image: the image file; None with --decay_only.
  """
  if options.decay_only:
    if not options.model:
      raise VisualizeError('--decay_only needs --model NAME (e.g. rmt_s)')
    from rmt_jax.models import create_model  # pylint: disable=g-import-not-at-top
    try:
      model = create_model(options.model)
    except ValueError as e:
      raise VisualizeError(str(e)) from None
    size = options.image_size or 224
    fig = prior_figure(model, size, _parse_query(options.query, size))
  else:
    if not options.weights or not image:
      raise VisualizeError('give --weights DIR and an IMAGE (or --decay_only --model NAME)')
    model, variables, metadata = load_model(options.weights, options.kernels)
    try:
      preprocessing, origin = eval_preprocessing.resolve(
          metadata, 'the flags', image_size=options.image_size, crop_pct=options.crop_pct,
          interpolation=options.interpolation)
    except ValueError as e:
      raise VisualizeError(str(e)) from None
    pixels, inputs = load_image(image, preprocessing)
    fig = block_attention(model, variables, pixels, inputs, options.stage, options.block,
                          _parse_query(options.query, preprocessing.image_size))
    print(f'preprocessing: {preprocessing.describe()} ({origin})', file=sys.stderr)
  fig.savefig(options.out, format='png')


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('weights', None, 'variables directory or training workdir',
                      flag_values=flag_values)
  flags.DEFINE_string('out', None, 'the PNG to write', flag_values=flag_values, required=True)
  flags.DEFINE_enum('kernels', 'auto', list(kernels_lib.KERNELS), 'the forms of the operations '
                    "that have backend-specific ones: auto (the devices' own), xla (plain), "
                    'cpu, tpu (see rmt_jax.kernels.selection)', flag_values=flag_values)
  flags.DEFINE_integer('stage', 0, 'stage to draw', flag_values=flag_values)
  flags.DEFINE_integer('block', 0, 'block of the stage', flag_values=flag_values)
  flags.DEFINE_string('query', None, 'X,Y: pixel of the crop to look from (default: centre)',
                      flag_values=flag_values)
  eval_preprocessing.add_flags(flag_values)
  flags.DEFINE_boolean('decay_only', False, "draw every stage's priors of --model, without "
                       'weights or image', flag_values=flag_values)
  flags.DEFINE_string('model', None, 'variant for --decay_only, e.g. rmt_s',
                      flag_values=flag_values)


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status (errors: one line on stderr, status 1;
  usage errors: status 2).

  Args:
    argv: the arguments after the program name: flags and, unless --decay_only, the image file
      (JPEG, PNG, GIF, BMP); None takes `sys.argv[1:]`.
  """
  options = flags.FlagValues()
  _define_flags(options)
  image = command_line.parse(options, argv, program=PROGRAM, doc=__doc__,
                             positional=('[image]',))
  try:
    run(options, image[0] if image else None)
  except VisualizeError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {options.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
