"""Where training metrics go: TensorBoard summaries, `workdir/metrics.jsonl`, the console.

Only process 0 writes (every process computes the same global metrics). Each log event is one
JSON line, e.g.

  {"step": 500, "split": "train", "loss": 3.1, "learning_rate": 0.0012,
   "images_per_sec": 5400.0, "time": 1764071234.5, "epoch": 0.8}
  {"step": 625, "split": "eval_ema", "loss": 1.2, "top1": 0.71, "top5": 0.90, ...}

and the same scalars appear in TensorBoard as '<split>/<name>'.
"""

import json
import os
import time
from typing import Any, Mapping

from absl import logging
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

METRICS_FILE = 'metrics.jsonl'
# tf.summary.scalar needs the tensorboard package; the raw op with the scalars plugin's
# marker writes the same event, and TensorBoard shows it as a scalar chart.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars')
).SerializeToString()
TENSORBOARD_DIR = 'tensorboard'


class MetricsWriter:
  """Appends log events to TensorBoard and `metrics.jsonl` under `workdir`.

  Args:
    workdir: the run's directory (local or any path tf.io.gfile reads, e.g. gs://).
    enabled: False on all processes but the first: writing is then a no-op.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._summary = None
    if enabled:
      tf.io.gfile.makedirs(workdir)
      # Appending: a resumed run continues the file (on object stores such as GCS, gfile
      # rewrites the object at each flush, which is cheap for a file of log lines).
      self._jsonl = tf.io.gfile.GFile(os.path.join(workdir, METRICS_FILE), 'a')
      self._summary = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))

  def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> dict[str, Any]:
    """Writes one event; returns it as the JSON object written.

    Args:
      step: the optimizer step the values refer to.
      split: 'train', 'eval', 'eval_ema', ...
      scalars: name -> number (None values are left out).
    """
    event: dict[str, Any] = {'step': int(step), 'split': split}
    event.update({k: float(v) for k, v in scalars.items() if v is not None})
    event['time'] = time.time()
    if not self._enabled:
      return event
    self._jsonl.write(json.dumps(event) + '\n')
    self._jsonl.flush()
    with self._summary.as_default(step=int(step)):
      for name, value in event.items():
        if name not in ('step', 'split', 'time'):
          tf.summary.write(f'{split}/{name}', tf.constant(value, tf.float32),
                           metadata=_SCALAR_METADATA)
    self._summary.flush()
    return event

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._summary.close()
      self._enabled = False


def format_duration(seconds: float) -> str:
  """'1:02:03' for 3723 s (ETA display)."""
  seconds = max(int(seconds), 0)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def log_progress(step: int, total_steps: int, steps_per_epoch: int, event: Mapping[str, Any],
                 eta_seconds: float | None) -> None:
  """One console line per log event: where the run is, how fast, and when it ends."""
  parts = [f'step {step}/{total_steps}', f'epoch {step / steps_per_epoch:.2f}']
  for name in ('loss', 'top1', 'top5', 'miou', 'pixel_accuracy', 'learning_rate',
               'images_per_sec'):
    if name in event:
      value = event[name]
      parts.append(f'{name} {value:.4g}' if name != 'images_per_sec' else f'{value:.0f} img/s')
  if eta_seconds is not None:
    parts.append(f'ETA {format_duration(eta_seconds)}')
  logging.info('[%s] %s', event.get('split', ''), '  '.join(parts))
