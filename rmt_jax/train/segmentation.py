"""Semantic segmentation: RMT's backbone under a Semantic FPN head, trained by the shared loop.

The task beside classification (`tasks.py`): its network (`rmt_jax.models.dense_heads`), its
loss (per-pixel cross-entropy), its evaluation step (a confusion matrix per set of weights, from
which come the mean IoU over classes, `miou`, each class's IoU and the pixel accuracy, as
mmseg computes them: intersections and unions summed over the whole held-out set, then divided),
its data (`rmt_jax.data.mosaics`, the digit mosaics), and a picture of a few held-out images
beside their ground truth and prediction, written to the workdir at each evaluation
(`SAMPLES_FILE`). The optimizer, EMA, sharding, checkpoints and metrics are the classifier's
(`steps.build_programs`, `loop.py`).
"""

import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from rmt_jax.data import mosaics
from rmt_jax.models import dense_heads
from rmt_jax.train import sharding
from rmt_jax.train import steps
from rmt_jax.train import tasks
from rmt_jax.weights import checkpoint

SAMPLES_FILE = 'segmentation_samples.png'
# Class colours of the pictures: black background, ten distinct digit colours.
PALETTE = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)], np.uint8)


def backbone_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `create_backbone` overrides of `config` (model_overrides, drop path, remat,
  norm_eval); saved with checkpoints."""
  overrides = dict(config.get('model_overrides', {}) or {})
  if config.get('drop_path_rate') is not None and config.drop_path_rate >= 0:
    overrides['drop_path_rate'] = float(config.drop_path_rate)
  if config.get('remat') is not None:
    overrides['remat'] = [bool(r) for r in config.remat]
  if config.get('norm_eval') is not None:
    overrides['norm_eval'] = bool(config.norm_eval)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def build_model(config: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh | None = None) -> dense_heads.SemanticSegmenter:
  """`config.model`'s backbone under a Semantic FPN head of `config.head`'s widths."""
  return dense_heads.create_segmenter(
      config.model, int(config.num_classes), channels=int(config.head.channels),
      head_channels=int(config.head.head_channels), norm_groups=int(config.head.norm_groups),
      dtype=jnp.dtype(config.get('dtype', 'float32')),
      kernels=steps.kernel_forms_for(config, mesh), **backbone_overrides(config))


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over every pixel: logits [B, H, W, C], labels int [B, H, W]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1).mean()


def confusion_matrix(labels: jax.Array, predictions: jax.Array, weights: jax.Array,
                     num_classes: int) -> jax.Array:
  """[num_classes, num_classes] float32: entry (t, p) sums the weights of the pixels of true
  class t predicted as p."""
  index = labels.reshape(-1) * num_classes + predictions.reshape(-1)
  counts = jnp.zeros(num_classes * num_classes, jnp.float32).at[index].add(
      jnp.broadcast_to(weights, labels.shape).reshape(-1).astype(jnp.float32))
  return counts.reshape(num_classes, num_classes)


def eval_step(model: Any, variable_sets: Mapping[str, Mapping[str, Any]],
              batch: Mapping[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
  """Sums over one held-out batch, for each set of weights (e.g. 'raw' and 'ema').

  Padding examples (mask 0) count nowhere.

  Returns:
    {name: {'loss': summed pixel cross-entropy, 'pixels': pixels counted, 'confusion':
    [C, C] pixel counts (`confusion_matrix`), 'prediction': int32 [B, H, W] argmax}}; the
    predictions are not sums (`Segmentation.evaluate` keeps the first batch's).
  """
  labels, mask = batch['label'], batch['mask'][:, None, None]
  out = {}
  for name, variables in variable_sets.items():
    logits = model.apply({'params': variables['params'],
                          'batch_stats': variables['batch_stats']}, batch['image'], train=False)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    loss = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    prediction = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out[name] = {'loss': jnp.sum(loss * mask), 'pixels': jnp.sum(jnp.broadcast_to(mask, loss.shape)),
                 'confusion': confusion_matrix(labels, prediction, mask, logits.shape[-1]),
                 'prediction': prediction}
  return out


def iou_metrics(confusion: np.ndarray, class_names: list[str] | None = None
                ) -> dict[str, float]:
  """mIoU, each class's IoU and the pixel accuracy of a confusion matrix (true x predicted).

  A class's IoU is TP / (TP + FP + FN) over the whole set; the mean is over the classes that
  occur in the labels or the predictions (mmseg's nanmean), others are left out.

  Returns:
    {'miou', 'pixel_accuracy', 'iou/<class name>' for each class that occurs}.
  """
  confusion = np.asarray(confusion, np.float64)
  names = class_names or [str(i) for i in range(len(confusion))]
  true_positives = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - true_positives
  present = union > 0
  iou = np.where(present, true_positives / np.maximum(union, 1e-12), np.nan)
  metrics = {'miou': float(np.nanmean(iou)) if present.any() else 0.0,
             'pixel_accuracy': float(true_positives.sum() / max(confusion.sum(), 1e-12))}
  metrics.update({f'iou/{names[c]}': float(iou[c]) for c in range(len(iou)) if present[c]})
  return metrics


def draw_samples(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                 scale: int = 2) -> np.ndarray:
  """One row per image: the input, the ground truth, the prediction, colour-coded by class
  (`PALETTE`), each enlarged `scale` times, white gaps between; uint8 [rows, cols, 3]."""
  gap = 4
  rows = []
  for image, label, prediction in zip(images, labels, predictions):
    panels = [image, PALETTE[label], PALETTE[prediction]]
    panels = [np.repeat(np.repeat(p, scale, 0), scale, 1) for p in panels]
    white = np.full((panels[0].shape[0], gap, 3), 255, np.uint8)
    rows.append(np.concatenate([panels[0], white, panels[1], white, panels[2]], axis=1))
    rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
  return np.concatenate(rows[:-1], axis=0)


class Segmentation(tasks.Task):
  """Semantic segmentation of digit mosaics (see the module docstring)."""

  name = 'segmentation'

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._eval_set = None
    self._samples = 6

  def train_batches(self, config, mesh):
    self._check(config)
    return mosaics.MosaicTrainIterator(config.data, global_batch_size=config.global_batch_size,
                                       seed=config.seed,
                                       mesh_sharding=sharding.batch_sharding(mesh))

  def eval_batches(self, config, mesh):
    self._check(config)
    self._eval_set = mosaics.MosaicEvalSet(config.data, global_batch_size=config.eval_batch_size,
                                           mesh_sharding=sharding.batch_sharding(mesh))
    self._samples = int(config.get('segmentation_samples', self._samples))
    return self._eval_set

  def build_programs(self, config, mesh, steps_per_epoch, total_steps):
    return steps.build_programs(config, mesh, steps_per_epoch, total_steps,
                                model=build_model(config, mesh), criterion=pixel_cross_entropy,
                                evaluation=eval_step)

  def evaluate(self, eval_step_fn, state, batches: Iterable[Any], step):
    totals, first = None, None
    for batch in batches:
      out = eval_step_fn(state, batch)
      if first is None:
        first = jax.device_get({name: o['prediction'] for name, o in out.items()})
      sums = {name: {k: v for k, v in o.items() if k != 'prediction'} for name, o in out.items()}
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    results = {}
    for name, s in totals.items():
      metrics = {'loss': float(s['loss'] / max(s['pixels'], 1))}
      metrics.update(iou_metrics(s['confusion'], mosaics.CLASS_NAMES))
      results[tasks.SPLITS.get(name, name)] = metrics
    if first is not None and self._eval_set is not None and jax.process_index() == 0:
      self._write_samples(first, results, step)
    return results

  def _write_samples(self, predictions: Mapping[str, np.ndarray],
                     results: Mapping[str, Mapping[str, float]], step: int) -> None:
    """The picture of the first held-out mosaics, predicted by the weights with the higher
    mIoU (raw or EMA)."""
    del step
    name = max(predictions, key=lambda n: results[tasks.SPLITS.get(n, n)]['miou'])
    k = min(self._samples, len(self._eval_set.images), len(predictions[name]))
    picture = draw_samples(self._eval_set.images[:k], self._eval_set.labels[:k],
                           np.asarray(predictions[name][:k]))
    path = os.path.join(self._workdir, SAMPLES_FILE)
    tf.io.gfile.makedirs(self._workdir)
    if tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)
    checkpoint.write_atomically(path, tf.io.encode_png(picture).numpy())

  def variables_for_network(self, variables):
    # Backbone weights (converted mmseg / ImageNet ones, `convert torch2flax --backbone`) go
    # under 'backbone', the head starting afresh; a segmentation run's weights fit as they are.
    out = {}
    for collection in ('params', 'batch_stats'):
      tree = dict(variables.get(collection, {}))
      out[collection] = tree if not tree or 'backbone' in tree else {'backbone': tree}
    return out

  def checkpoint_metadata(self, config):
    return {'task': self.name, 'model': config.model,
            'model_overrides': backbone_overrides(config),
            'head': {k: int(v) for k, v in config.head.items()},
            'num_classes': int(config.num_classes), 'class_names': list(mosaics.CLASS_NAMES)}

  @staticmethod
  def _check(config):
    if config.data.dataset != 'digit_mosaics':
      raise ValueError("config.task='segmentation' reads config.data.dataset='digit_mosaics' "
                       f'only, got {config.data.dataset!r}')
    if int(config.num_classes) != mosaics.NUM_CLASSES:
      raise ValueError(f'digit mosaics have {mosaics.NUM_CLASSES} classes (background + 10); '
                       f'config.num_classes is {config.num_classes}')
