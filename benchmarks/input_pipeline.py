r"""Input pipeline throughput: images/s per CPU core, next to the bare JPEG-decode rate.

  python -m benchmarks.input_pipeline                      # synthetic ImageNet-sized JPEGs
  python -m benchmarks.input_pipeline --folder_root=/data/imagenet   # your own image folder

Reports images per wall second and images per CPU second of this process (= per core;
robust to other load on the machine), measured in one run on the same images, of:
  decode  tf.data reading + `decode_jpeg` of whole images (the floor of any pipeline);
  train   the full training pipeline of `config.data` (official recipe by default:
          random-resized crop, flip, RandAugment, random erasing, Mixup/CutMix, batching);
  eval    decode + resize + centre crop + normalise + padded batches;
  resume  seconds to the first batch of a fresh iterator vs. one restored mid-epoch
          (restoring skips raw records, it decodes nothing it skips).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ''):  # `python benchmarks/input_pipeline.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from rmt_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def write_synthetic_folder(root: str, num_images: int, height: int, width: int,
                           num_classes: int = 10, seed: int = 0) -> None:
  """JPEGs (quality 90) with smooth structure plus noise, about ImageNet's bytes per pixel."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  for i in range(num_images):
    freq = rng.uniform(0.01, 0.08, size=(3, 2))
    phase = rng.uniform(0, 6.3, size=3)
    channels = [128 + 90 * np.sin(freq[c, 0] * yy + freq[c, 1] * xx + phase[c])
                for c in range(3)]
    pixels = np.stack(channels, -1) + rng.normal(0, 18, size=(height, width, 3))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    for split in ('train', 'val'):
      folder = os.path.join(root, split, f'class{i % num_classes:03d}')
      os.makedirs(folder, exist_ok=True)
      tf.io.write_file(os.path.join(folder, f'{i:06d}.JPEG'),
                       tf.io.encode_jpeg(pixels, quality=90))


def _cpu_seconds() -> float:
  times = os.times()
  return times.user + times.system


def _rate(iterator, batch_size: int, warmup: int, batches: int) -> tuple[float, float]:
  """(images per wall second, images per CPU second of this process) in steady state.

  Per CPU second is the per-core rate, and other processes on the machine barely move it;
  in steady state the prefetch buffers are as full at the end as at the start, so the CPU
  time in the window is the work for the images delivered in it.
  """
  for _ in range(warmup):
    next(iterator)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(batches):
    next(iterator)
  images = batches * batch_size
  # os.times() ticks in 10 ms: floor the interval for very short runs.
  return (images / (time.perf_counter() - start),
          images / max(_cpu_seconds() - cpu, 0.01))


def bare_decode_rate(root: str, batch_size: int, warmup: int,
                     batches: int) -> tuple[float, float]:
  files = tf.io.gfile.glob(os.path.join(root, 'train', '*', '*'))
  ds = tf.data.Dataset.from_tensor_slices(files).repeat()
  ds = ds.map(lambda f: tf.io.decode_jpeg(tf.io.read_file(f), channels=3),
              num_parallel_calls=tf.data.AUTOTUNE)
  # Whole images differ in size: count them without batching into one tensor.
  ds = ds.map(lambda image: tf.shape(image)[0]).batch(batch_size).prefetch(2)
  return _rate(ds.as_numpy_iterator(), batch_size, warmup, batches)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--folder_root', default='',
                      help='image folder (train/<class>/*.JPEG); default: synthetic JPEGs')
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--source_height', type=int, default=375)
  parser.add_argument('--source_width', type=int, default=500)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--warmup_batches', type=int, default=3)
  parser.add_argument('--batches', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=3, help='median of this many runs')
  parser.add_argument('--skip_seconds', type=float, default=3.0,
                      help='how long to measure the TFDS record-skipping rate')
  parser.add_argument('--work_dir', default=tempfile.gettempdir(),
                      help='where the synthetic JPEGs and records are kept between runs')
  args = parser.parse_args(argv)
  tf.config.set_visible_devices([], 'GPU')
  cores = _cores()

  root = args.folder_root
  if not root:
    # Kept between runs (and not deleted under iterators still winding down).
    root = os.path.join(args.work_dir, 'rmt_jax_benchmark_jpegs_'
                        f'{args.num_images}_{args.source_height}x{args.source_width}')
    if not os.path.isdir(os.path.join(root, 'val')):
      write_synthetic_folder(root + '.tmp', args.num_images, args.source_height,
                             args.source_width)
      os.rename(root + '.tmp', root)
  files = tf.io.gfile.glob(os.path.join(root, 'train', '*', '*'))
  mean_kb = np.mean([os.path.getsize(f) for f in files[:200]]) / 1024
  print(f'{len(files)} images in {root} (mean {mean_kb:.0f} KB), {cores} CPU cores, '
        f'output {args.image_size}x{args.image_size}, batch {args.batch_size}')

  cfg = input_pipeline.default_config()
  cfg.update(dataset='folder', folder_root=root, image_size=args.image_size)
  plain = cfg.copy_and_resolve_references()
  plain.update(randaugment='', reprob=0.0, mixup=0.0, cutmix=0.0)
  eval_batches = min(args.batches, len(files) // args.batch_size - args.warmup_batches)
  pipelines = {
      'decode (bare decode_jpeg)': lambda: bare_decode_rate(
          root, args.batch_size, args.warmup_batches, args.batches),
      'train (official recipe)': lambda: _rate(input_pipeline.create_train_iterator(
          cfg, global_batch_size=args.batch_size, seed=0), args.batch_size,
                                               args.warmup_batches, args.batches),
      'train (crop + flip only)': lambda: _rate(input_pipeline.create_train_iterator(
          plain, global_batch_size=args.batch_size, seed=0), args.batch_size,
                                                args.warmup_batches, args.batches),
      'eval (resize + centre crop)': lambda: _rate(iter(input_pipeline.create_eval_iterator(
          cfg, global_batch_size=args.batch_size)), args.batch_size, args.warmup_batches,
                                                   eval_batches),
  }
  # One pipeline at a time (an iterator left alive keeps its threads prefetching), taking
  # turns, so that load from other processes spreads over all of them; median of repeats.
  rates = {name: [] for name in pipelines}
  for _ in range(args.repeats):
    for name, run in pipelines.items():
      rates[name].append(run())
  rows = [(name, float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs])))
          for name, runs in rates.items()]
  decode = rows[0][2]
  print(f'{"pipeline":30s} {"images/s":>9s} {"per core":>9s} {"vs decode":>9s}  '
        'per-core runs (images per CPU second)')
  for name, wall, per_core in rows:
    runs = ' '.join(f'{r[1]:.0f}' for r in rates[name])
    print(f'{name:30s} {wall:9.1f} {per_core:9.1f} {per_core / decode:9.2f}  {runs}')
  steps, fresh_s, restored_s = _first_batch_seconds(cfg, args.batch_size,
                                                    min(2, args.repeats))
  print(f'first batch: fresh iterator {fresh_s:.2f} s, restored at step {steps - 1} of '
        f'{steps} {restored_s:.2f} s (folder source: skipping costs no decoding)')
  skip = record_skip_rate(files, args.work_dir, args.skip_seconds)
  print(f'TFDS restore skips raw records at {skip:.0f} records per CPU second: resuming in '
        f'the middle of an ImageNet epoch (640k records) costs ~{640_000 / skip:.0f} CPU s '
        'on one host, a 1/N share of that on each of N hosts')


def _first_batch_seconds(cfg, batch_size: int, trials: int) -> tuple[int, float, float]:
  """Seconds to the first batch, fresh and restored at the last step of epoch 0 (best of)."""
  times = {False: [], True: []}
  for restore in (True, False) * trials:
    it = input_pipeline.create_train_iterator(cfg, global_batch_size=batch_size, seed=0)
    if restore:
      it.set_state({'epoch': 0, 'step_in_epoch': it.steps_per_epoch - 1})
    start = time.perf_counter()
    next(it)
    times[restore].append(time.perf_counter() - start)
    del it
  steps = input_pipeline.num_examples(cfg, 'train') // batch_size
  return steps, min(times[False]), min(times[True])


def record_skip_rate(files: list[str], work_dir: str, seconds: float) -> float:
  """Records per CPU second that restoring a TFDS pipeline skips (read, never decoded)."""
  path = os.path.join(work_dir, 'rmt_jax_benchmark_records.tfrecord')
  with tf.io.TFRecordWriter(path) as writer:
    for f in files:
      feature = {'image': tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[tf.io.read_file(f).numpy()]))}
      writer.write(tf.train.Example(
          features=tf.train.Features(feature=feature)).SerializeToString())
  count, start, cpu = 0, time.perf_counter(), _cpu_seconds()
  while time.perf_counter() - start < seconds:
    # Same shape as a resumed TFDS epoch: shuffle buffer, then skip (nothing decoded).
    ds = tf.data.TFRecordDataset(path).repeat(20).shuffle(1024, seed=0).skip(20 * len(files))
    for _ in ds:
      pass
    count += 20 * len(files)
  return count / max(_cpu_seconds() - cpu, 0.01)


if __name__ == '__main__':
  main()
