r"""Input pipeline throughput: images/s per CPU core, next to the bare JPEG-decode rate.

  python -m benchmarks.input_pipeline                      # synthetic ImageNet-sized JPEGs
  python -m benchmarks.input_pipeline --folder_root=/data/imagenet   # your own image folder

Reports images per wall second and images per CPU second of this process (= per core;
robust to other load on the machine), measured in one run on the same images, of:
  decode  tf.data reading + `decode_jpeg` of whole images (the floor of any pipeline);
  train   the full training pipeline of `config.data` (official recipe by default:
          random-resized crop, flip, RandAugment, random erasing, Mixup/CutMix, batching);
  train, host part  the same recipe with `augment_on='device'`: the host decodes the crop's
          window and resizes it (uint8); flip, RandAugment, normalisation, erasing and
          Mixup/CutMix run in the compiled step (`rmt_jax.data.batch_augment`), whose cost
          per batch is measured beside it (on the local jax device; with --tpu_topology,
          XLA's TPU estimate too, and with --train_step_json its share of the train step
          that `rmt_jax.tpu_compile --json` estimated);
  eval    decode + resize + centre crop + normalise + padded batches;
  official  with --official_script, the official PyTorch pipeline's rate on the same files,
          run between ours (`official_pipeline_rate.py`, which needs torch, torchvision, timm);
  --breakdown  CPU milliseconds per image of each host stage (cumulative tf.data pipelines on
          the same files: read, decode of the crop window, resize, flip, RandAugment (and each
          of its ops at the policy's magnitude), normalise, erasing, batch, Mixup/CutMix);
  --json FILE  {"train": {"images_per_cpu_second": ..., "images_per_second": ...}, ...}.
  resume  seconds to the first batch of a fresh iterator vs. one restored mid-epoch
          (restoring skips raw records, it decodes nothing it skips).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import flags
import numpy as np

if __package__ in (None, ''):  # `python benchmarks/input_pipeline.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from rmt_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
from rmt_jax.runtime import command_line  # pylint: disable=g-import-not-at-top

PROGRAM = 'python -m benchmarks.input_pipeline'


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


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('folder_root', '', 'image folder (train/<class>/*.JPEG); default: '
                      'synthetic JPEGs', flag_values=flag_values)
  flags.DEFINE_integer('num_images', 512, 'synthetic JPEGs to write', flag_values=flag_values)
  flags.DEFINE_integer('source_height', 375, "the synthetic JPEGs' height",
                       flag_values=flag_values)
  flags.DEFINE_integer('source_width', 500, "the synthetic JPEGs' width",
                       flag_values=flag_values)
  flags.DEFINE_integer('image_size', 224, 'output height and width', flag_values=flag_values)
  flags.DEFINE_integer('batch_size', 64, 'images per batch', flag_values=flag_values)
  flags.DEFINE_integer('warmup_batches', 3, 'untimed batches before each measurement',
                       flag_values=flag_values)
  flags.DEFINE_integer('batches', 16, 'timed batches per measurement', flag_values=flag_values)
  flags.DEFINE_integer('repeats', 3, 'median of this many runs', flag_values=flag_values)
  flags.DEFINE_float('skip_seconds', 3.0, 'how long to measure the TFDS record-skipping rate',
                     flag_values=flag_values)
  flags.DEFINE_string('work_dir', tempfile.gettempdir(), 'where the synthetic JPEGs and '
                      'records are kept between runs', flag_values=flag_values)
  flags.DEFINE_bool('breakdown', False, 'also print the CPU time per image of each host stage',
                    flag_values=flag_values)
  flags.DEFINE_string('official_script', '', "path of official_pipeline_rate.py: measure the "
                      "official pipeline's rate on the same files, between ours",
                      flag_values=flag_values)
  flags.DEFINE_float('official_seconds', 20.0, 'seconds per official measurement',
                     flag_values=flag_values)
  flags.DEFINE_integer('device_batch', 256, "batch for timing the device part on jax's local "
                       'device; 0 skips it', flag_values=flag_values)
  flags.DEFINE_string('tpu_topology', '', "e.g. 'v5p:2x2x1': XLA's estimate of the device part "
                      'for one chip of it (needs libtpu)', flag_values=flag_values)
  flags.DEFINE_integer('tpu_batch_per_chip', 64, 'images per chip for --tpu_topology',
                       flag_values=flag_values)
  flags.DEFINE_string('train_step_json', '', "`python -m rmt_jax.tpu_compile ... --mode train "
                      "--json FILE`'s output for the same topology and images per chip: the "
                      "device part is reported as a share of that train step's XLA estimate",
                      flag_values=flag_values)
  flags.DEFINE_string('json', '', 'also write the rates here', flag_values=flag_values)


def main(argv: list[str] | None = None) -> int:
  """Measures and prints the table; returns the exit status."""
  options = flags.FlagValues()
  _define_flags(options)
  command_line.parse(options, argv, program=PROGRAM, doc=__doc__)
  tf.config.set_visible_devices([], 'GPU')
  cores = _cores()

  root = options.folder_root
  if not root:
    # Kept between runs (and not deleted under iterators still winding down).
    root = os.path.join(options.work_dir, 'rmt_jax_benchmark_jpegs_'
                        f'{options.num_images}_{options.source_height}x{options.source_width}')
    if not os.path.isdir(os.path.join(root, 'val')):
      write_synthetic_folder(root + '.tmp', options.num_images, options.source_height,
                             options.source_width)
      os.rename(root + '.tmp', root)
  files = tf.io.gfile.glob(os.path.join(root, 'train', '*', '*'))
  mean_kb = np.mean([os.path.getsize(f) for f in files[:200]]) / 1024
  print(f'{len(files)} images in {root} (mean {mean_kb:.0f} KB), {cores} CPU cores, '
        f'output {options.image_size}x{options.image_size}, batch {options.batch_size}')

  cfg = input_pipeline.default_config()
  cfg.update(dataset='folder', folder_root=root, image_size=options.image_size)
  plain = cfg.copy_and_resolve_references()
  plain.update(randaugment='', reprob=0.0, mixup=0.0, cutmix=0.0)
  on_device = cfg.copy_and_resolve_references()
  on_device.augment_on = 'device'
  batch_size, warmup, batches = options.batch_size, options.warmup_batches, options.batches
  eval_batches = min(batches, len(files) // batch_size - warmup)
  pipelines = {
      'decode (bare decode_jpeg)': lambda: bare_decode_rate(root, batch_size, warmup, batches),
      'train (official recipe)': lambda: _rate(input_pipeline.create_train_iterator(
          cfg, global_batch_size=batch_size, seed=0), batch_size, warmup, batches),
      'train (crop + flip only)': lambda: _rate(input_pipeline.create_train_iterator(
          plain, global_batch_size=batch_size, seed=0), batch_size, warmup, batches),
      'train, host part (device aug.)': lambda: _rate(input_pipeline.create_train_iterator(
          on_device, global_batch_size=batch_size, seed=0), batch_size, warmup, batches),
      'eval (resize + centre crop)': lambda: _rate(iter(input_pipeline.create_eval_iterator(
          cfg, global_batch_size=batch_size)), batch_size, warmup, eval_batches),
  }
  # One pipeline at a time (an iterator left alive keeps its threads prefetching), taking
  # turns, so that load from other processes spreads over all of them; median of repeats.
  if options.official_script:
    pipelines['official (PyTorch, timm)'] = lambda: official_rate(
        options.official_script, root, options.official_seconds)
  rates = {name: [] for name in pipelines}
  for _ in range(options.repeats):
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
  official = dict((n, c) for n, _, c in rows).get('official (PyTorch, timm)')
  if official:
    for name, _, per_core in rows[1:-1]:
      print(f'{name}: {per_core / official:.2f}x the official pipeline per CPU second')
  device = {}
  if options.device_batch > 0:
    device = device_part_cost(cfg, options.device_batch, options.image_size)
    print(f"device part (batch_augment.augment, form '{device['form']}') on "
          f"{device['device']}: {device['ms_per_batch']:.1f} ms per batch of "
          f"{options.device_batch} ({device['cpu_ms_per_batch']:.0f} CPU ms)")
  if options.tpu_topology:
    device.update(tpu_estimate(cfg, options.tpu_topology, options.tpu_batch_per_chip,
                               options.image_size))
    estimate = device['tpu_estimated_ms']
    print(f"device part on one {device['tpu_device_kind']} chip of {options.tpu_topology}, "
          f"{options.tpu_batch_per_chip} images: XLA's estimate "
          + (f'{estimate:.3f} ms' if estimate else "none (the cost model gave no time)")
          + " (form 'matmul'; an estimate, not a measurement)")
    if options.train_step_json and estimate:
      device.update(train_step_share(options.train_step_json, estimate, options.tpu_topology,
                                     options.tpu_batch_per_chip))
      print(f"{device['train_step_model']}'s train step on {options.tpu_topology}, "
            f"{options.tpu_batch_per_chip} images per chip: XLA's estimate "
            f"{device['train_step_ms']:.2f} ms; the device part is "
            f"{device['percent_of_train_step']:.1f}% of it")
  if options.breakdown:
    print_breakdown(stage_costs(files, cfg, batch_size, warmup, batches))
  if options.json:
    keys = {'decode (bare decode_jpeg)': 'decode', 'train (official recipe)': 'train',
            'train (crop + flip only)': 'train_crop_flip',
            'train, host part (device aug.)': 'train_host_part',
            'eval (resize + centre crop)': 'eval', 'official (PyTorch, timm)': 'official'}
    report = {keys[name]: {'images_per_cpu_second': per_core, 'images_per_second': wall}
              for name, wall, per_core in rows}
    if device:
      report['device_part'] = device
    with open(options.json, 'w') as f:
      json.dump(report, f, indent=1)
  steps, fresh_s, restored_s = _first_batch_seconds(cfg, options.batch_size,
                                                    min(2, options.repeats))
  print(f'first batch: fresh iterator {fresh_s:.2f} s, restored at step {steps - 1} of '
        f'{steps} {restored_s:.2f} s (folder source: skipping costs no decoding)')
  skip = record_skip_rate(files, options.work_dir, options.skip_seconds)
  print(f'TFDS restore skips raw records at {skip:.0f} records per CPU second: resuming in '
        f'the middle of an ImageNet epoch (640k records) costs ~{640_000 / skip:.0f} CPU s '
        'on one host, a 1/N share of that on each of N hosts')
  return 0


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


def official_rate(script: str, root: str, seconds: float) -> tuple[float, float]:
  """(images per wall second, per CPU second) of the official pipeline (its own process)."""
  out = subprocess.run([sys.executable, script, root, str(seconds)], check=True,
                       capture_output=True, text=True).stdout
  match = re.search(r'([\d.]+) img per CPU-second, ([\d.]+) img/s wall', out)
  if not match:
    raise RuntimeError(f'{script} printed no rate: {out[-500:]}')
  return float(match.group(2)), float(match.group(1))


def device_part_cost(cfg, batch: int, size: int) -> dict:
  """ms (wall and this process's CPU) per batch of the train step's device part on jax's
  default device (`device_augment.DeviceAugment`: the warp's kernel on TPUs), compiled, the
  median of 3 calls."""
  import jax  # pylint: disable=g-import-not-at-top
  from rmt_jax.data import batch_augment  # pylint: disable=g-import-not-at-top
  from rmt_jax.kernels import selection  # pylint: disable=g-import-not-at-top
  from rmt_jax.train import device_augment  # pylint: disable=g-import-not-at-top
  form = batch_augment.form_for(jax.devices())
  augment = device_augment.DeviceAugment(
      batch_augment.BatchRecipe.from_config(cfg), form,
      kernel=selection.for_devices(jax.devices()[:1]) == 'tpu')
  step = jax.jit(lambda x, y, k: augment.shard(x, y, k, 0))
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
  images, labels = jax.device_put(images), jax.device_put(np.arange(batch, dtype=np.int32))
  jax.block_until_ready(step(images, labels, jax.random.key(0)))
  walls, cpus = [], []
  for i in range(3):
    start, cpu = time.perf_counter(), _cpu_seconds()
    jax.block_until_ready(step(images, labels, jax.random.key(i + 1)))
    walls.append(time.perf_counter() - start)
    cpus.append(_cpu_seconds() - cpu)
  return {'device': str(jax.devices()[0].device_kind), 'form': form, 'batch': batch,
          'ms_per_batch': 1e3 * float(np.median(walls)),
          'cpu_ms_per_batch': 1e3 * float(np.median(cpus))}


def tpu_estimate(cfg, topology: str, batch_per_chip: int, size: int) -> dict:
  """XLA's estimated seconds (`cost_analysis()['optimal_seconds']`) of the train step's device
  part (`device_augment.DeviceAugment` for TPUs: `batch_augment.augment` with the warp's TPU
  kernel) for one chip of a TPU topology, compiled ahead of time with libtpu."""
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from rmt_jax.data import batch_augment  # pylint: disable=g-import-not-at-top
  from rmt_jax.train import device_augment  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(platform='tpu', topology_name=topology).devices
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  augment = device_augment.DeviceAugment(batch_augment.BatchRecipe.from_config(cfg),
                                         batch_augment.form_for(devices), kernel=True)
  args = (jax.ShapeDtypeStruct((batch_per_chip, size, size, 3), np.uint8, sharding=replicated),
          jax.ShapeDtypeStruct((batch_per_chip,), np.int32, sharding=replicated),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated))
  step = jax.jit(lambda x, y, k: augment.shard(x, y, k, 0))
  cost = step.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return {'tpu_topology': topology, 'tpu_device_kind': devices[0].device_kind,
          'tpu_batch_per_chip': batch_per_chip,
          # libtpu 0.0.42's cost model answers some programs with a negative time: none, then.
          'tpu_estimated_ms': (1e3 * float(cost['optimal_seconds'])
                               if cost.get('optimal_seconds', 0.0) > 0 else None)}


def train_step_share(path: str, device_ms: float, topology: str, batch_per_chip: int) -> dict:
  """The device part's share of the train step that `rmt_jax.tpu_compile --json` estimated.

  Raises:
    ValueError: the file is for another topology or another number of images per chip.
  """
  with open(path) as f:
    result = json.load(f)
  if result['topology'] != topology or result['images_per_chip'] != batch_per_chip:
    raise ValueError(f"{path} holds {result['topology']} at {result['images_per_chip']:g} "
                     f'images per chip, not {topology} at {batch_per_chip}')
  step_ms = 1e3 * result['train']['estimated_step_seconds']
  return {'train_step_model': result['model'], 'train_step_ms': step_ms,
          'train_step_augment_on': result.get('augment_on', 'host'),
          'percent_of_train_step': 100 * device_ms / step_ms}


def stage_costs(files: list[str], cfg, batch_size: int, warmup: int,
                batches: int) -> list[tuple[str, float]]:
  """CPU ms per image of each host stage of the 'host' recipe: the differences between
  cumulative tf.data pipelines over `files` (AUTOTUNE maps, batches of `batch_size`), and of
  each RandAugment op (applied to every cached crop at the policy's magnitude, weighted by
  how often the policy applies it)."""
  from rmt_jax.data import augment, randaugment  # pylint: disable=g-import-not-at-top
  from rmt_jax.data import mixup  # pylint: disable=g-import-not-at-top
  size, policy = cfg.image_size, randaugment.parse_policy(cfg.randaugment)
  mix_cfg = input_pipeline.mixup_config(cfg)

  def seed(i):
    return tf.stack([i, tf.constant(7, tf.int64)])

  def crop(i, f):
    return augment.decode_and_random_resized_crop(
        tf.io.read_file(f), seed(i), size=size, scale=tuple(cfg.rrc_scale),
        ratio=tuple(cfg.rrc_ratio), interpolation=cfg.interpolation)

  def window(i, f):
    data = tf.io.read_file(f)
    shape = augment.image_shape(data)
    return tf.shape(augment.decode_and_crop(data, augment.random_resized_crop_window(
        shape, seed(i), scale=tuple(cfg.rrc_scale), ratio=tuple(cfg.rrc_ratio))))

  flip = lambda i, f: augment.random_horizontal_flip(crop(i, f), seed(i + 1), cfg.hflip)
  ra = lambda i, f: randaugment.randaugment(flip(i, f), seed(i + 2), policy)
  norm = lambda i, f: augment.normalize(ra(i, f), cfg.mean, cfg.std)
  erase = lambda i, f: augment.random_erasing(norm(i, f), seed(i + 3), probability=cfg.reprob,
                                              mode=cfg.remode)

  def ms(fn, batch_fn=None, source=None):
    ds = source if source is not None else (
        tf.data.Dataset.from_tensor_slices(files).enumerate().repeat())
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)
    if batch_fn is not None:
      ds = ds.map(batch_fn, num_parallel_calls=tf.data.AUTOTUNE)
    return 1e3 / _rate(iter(ds.prefetch(2)), batch_size, warmup, batches)[1]

  mix = lambda x, y: mixup.mix_batch(x, y, tf.constant([1, 2], tf.int64), mix_cfg)
  cumulative = [
      ('read file', ms(lambda i, f: tf.strings.length(tf.io.read_file(f)))),
      ('decode the crop window', ms(window)),
      (f'resize ({cfg.interpolation}, antialiased) + batch uint8', ms(crop)),
      ('flip', ms(flip)),
      ('RandAugment', ms(ra)),
      ('normalise + batch float32', ms(norm)),
      ('random erasing', ms(erase)),
      ('Mixup/CutMix + label smoothing', ms(lambda i, f: (erase(i, f), tf.cast(i % 1000,
                                                                                tf.int32)),
                                            batch_fn=mix)),
  ]
  rows = [(cumulative[0][0], cumulative[0][1])]
  rows += [(name, cost - cumulative[k][1]) for k, (name, cost) in enumerate(cumulative[1:])]
  rows.append(('all of the above', cumulative[-1][1]))
  crops = tf.data.Dataset.from_tensor_slices(files[:batch_size * 2]).enumerate().map(
      lambda i, f: (i, crop(i, f))).cache()
  list(crops)  # fill the cache
  crops = crops.repeat()
  base = ms(lambda i, x: x, source=crops)
  weight = policy.num_layers * policy.prob / len(policy.ops)
  for name in policy.ops:
    cost = ms(lambda i, x, name=name: randaugment.apply_op(x, name, policy.magnitude, seed(i)),
              source=crops) - base
    rows.append((f'  RandAugment {name} ({cost:.2f} ms when applied)', cost * weight))
  return rows


def print_breakdown(rows: list[tuple[str, float]]) -> None:
  print(f'{"host stage (cumulative pipelines, differences)":58s} {"CPU ms/image":>12s}')
  for name, cost in rows:
    print(f'{name:58s} {cost:12.2f}')


if __name__ == '__main__':
  sys.exit(main())
