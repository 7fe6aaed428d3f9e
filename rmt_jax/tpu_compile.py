"""`python -m rmt_jax.tpu_compile`: compile a run's steps for a TPU slice from any machine.

Builds exactly what `main.py` builds for the config on that slice (mesh, shardings, model,
optimizer, train step, eval step: `steps.build_programs`), compiles it ahead of time with
libtpu for the slice's abstract devices (`jax.experimental.topologies`), and reports, per chip:
memory against the chip's HBM ("fits" or by how much it does not), XLA's FLOPs against the
model's, XLA's estimated step time (`cost_analysis()['optimal_seconds']`, the TPU compiler's
cost model: an estimate, not a measurement), the images/s and utilisation of the chip's bf16
peak that it implies, and the compile time. Beside XLA's estimate, a physical one
(`rmt_jax.analysis.tpu_floor`): each Pallas kernel's MXU work at the MXU's tile, vector work at
vreg granularity, bytes at the layouts' tiling and grid balance over TensorCores, read from the
traced program, where XLA sees only the kernels' declared costs; per kernel and per step (the
kernels' plus XLA's figure for everything else). With `--traffic`, also where each step's memory
traffic goes, by layer and by stage (`rmt_jax.analysis.tpu_traffic`): RMT's steps are bound by memory
traffic in that estimate. With `--block STAGE`, one block of that stage instead, forward and
backward on one chip (`compile_block`): the unit the kernels are tuned on.

  pip install 'libtpu==0.0.42.*'     # the libtpu jax 0.10.2 pins; or pip install '.[tpu-compile]'
  python -m rmt_jax.tpu_compile --config configs/rmt_s.py --topology v5p:2x2x1 \
      --batch_per_chip 64 [--mode train|eval|both] [--json FILE] [--traffic] \
      [--config.FIELD=VALUE ...]
  python -m rmt_jax.tpu_compile --config configs/rmt_s.py --topology v5p:2x2x1 \
      --batch_per_chip 64 --block 3 [--traffic]

Topology names are libtpu's: `v4:2x2x1`, `v5e:2x2`, `v5p:2x2x1`, `v6e:4x4`, ... A v4 chip is two
devices (one per TensorCore) in libtpu's v4 topologies; v5p, v5e and v6e chips are one each.
Compiling a full RMT-S train step takes minutes on a small CPU host. libtpu is never needed
otherwise: nothing else in rmt_jax imports it.
"""

import importlib.util
import json
import math
import os
import sys
import time
from typing import Any

# Read when libtpu loads (at the first topology query): on a host without a TPU they stop libtpu
# probing for TPU metadata. A TPU VM's own values are kept.
os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
# libtpu takes a host-wide lock when it loads; this process opens no chip (below), so it may run
# beside a training run or another compile that holds it.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from rmt_jax.kernels.tpu import operations as tpu_operations
from rmt_jax.train import device_augment
from rmt_jax.train import sharding
from rmt_jax.analysis import counting
from rmt_jax.analysis import tpu_floor
from rmt_jax.analysis import tpu_traffic
from rmt_jax.train import steps as train_steps
from rmt_jax.models import layers

INSTALL_HINT = ("libtpu is not installed: pip install 'libtpu==0.0.42.*' (the version jax 0.10.2 "
                "pins; or pip install '.[tpu-compile]'); it is only needed to compile for TPUs")
# ImageNet-1k's training split: the schedule's steps per epoch (shapes do not depend on it).
IMAGENET_TRAIN_IMAGES = 1_281_167


def topology_devices(topology: str) -> list[Any]:
  """The abstract TPU devices of a slice, e.g. 'v5p:2x2x1'.

  Raises:
    RuntimeError: libtpu is missing (the message says how to install it).
    ValueError: libtpu does not know the topology name.
  """
  if importlib.util.find_spec('libtpu') is None:
    raise RuntimeError(INSTALL_HINT)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=topology).devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu raises XlaRuntimeError)
    raise ValueError(f'libtpu could not describe the topology {topology!r}: {e} (names look '
                     "like 'v4:2x2x1', 'v5e:2x2', 'v5p:2x2x1', 'v6e:4x4')") from e


def _memory(compiled: Any) -> dict[str, int]:
  m = compiled.memory_analysis()
  out = {'arguments': int(m.argument_size_in_bytes), 'outputs': int(m.output_size_in_bytes),
         'aliased': int(m.alias_size_in_bytes), 'temporaries': int(m.temp_size_in_bytes),
         'code': int(m.generated_code_size_in_bytes)}
  # Donated arguments alias outputs: count those bytes once.
  out['total'] = (out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries']
                  + out['code'])
  return out


def _cost(compiled: Any) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return {'flops': float(cost.get('flops', 0.0)),
          'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
          'optimal_seconds': float(cost.get('optimal_seconds', 0.0))}


def custom_calls(compiled: Any) -> int:
  """The Pallas kernels (Mosaic custom calls) in a compiled TPU program's text."""
  return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def _physical(jaxpr: Any, compiled: Any, chip: str, devices_per_chip: int,
              xla_seconds: float | None, log: Any) -> dict[str, Any]:
  """`tpu_floor.floor` of a traced program, with the compiled program's custom-call count
  ('custom_calls'), which must equal the jaxpr's Pallas calls: a kernel that XLA dropped (its
  results unused) would be counted but never run."""
  physical = tpu_floor.floor(jaxpr, chip, devices_per_chip, xla_seconds)
  physical['custom_calls'] = custom_calls(compiled)
  if physical['custom_calls'] != physical['pallas_calls']:
    log(f"warning: the compiled program has {physical['custom_calls']} Pallas custom calls, "
        f"the traced one {physical['pallas_calls']}: the physical estimate counts kernels "
        'that XLA dropped (or misses some)')
  return physical


def compile_for_topology(config: Any, topology: str, mode: str = 'both',
                         log: Any = print, traffic: bool = False) -> dict[str, Any]:
  """Compiles the config's train and/or eval step for a TPU slice; see the module docstring.

  Args:
    config: a run config (as `main.py` takes it); `global_batch_size` is the slice's batch.
    topology: libtpu topology name.
    mode: 'train', 'eval' or 'both'.
    log: progress lines go here.
    traffic: also account each step's memory traffic by layer (`tpu_traffic`).

  Returns:
    A JSON-ready dict: the setup, the chip, and per step its memory, FLOPs, estimate, compile
    seconds (and with `traffic`, the breakdown under 'traffic').
  """
  if mode not in ('train', 'eval', 'both'):
    raise ValueError(f"mode must be 'train', 'eval' or 'both', got {mode!r}")
  devices = topology_devices(topology)
  kind = devices[0].device_kind
  if kind not in tpu_floor.DEVICE_KINDS:
    raise ValueError(f'no chip figures for {kind!r}; '
                     f'known: {", ".join(tpu_floor.DEVICE_KINDS)}')
  chip = tpu_floor.CHIPS[tpu_floor.DEVICE_KINDS[kind]]
  chips = len({tuple(d.coords) for d in devices})
  per_chip_devices = len(devices) // chips
  mesh = sharding.create_mesh(config.mesh, devices)
  batch, size = int(config.global_batch_size), int(config.data.image_size)
  steps_per_epoch = max(IMAGENET_TRAIN_IMAGES // batch, 1)
  programs = train_steps.build_programs(config, mesh, steps_per_epoch,
                                         int(math.ceil(config.num_epochs * steps_per_epoch)))
  model = programs.model
  macs = counting.count_macs(model.clone(dtype=jnp.float32), size, batch=1)
  result = {
      'topology': topology, 'chip': chip.name, 'device_kind': kind, 'chips': chips,
      'devices': len(devices), 'devices_per_chip': per_chip_devices,
      'mesh': dict(mesh.shape), 'model': config.model, 'dtype': str(config.get('dtype')),
      'residual_dtype': jnp.dtype(model.residual_dtype).name,
      'kernels': model.kernels, 'global_batch': batch, 'images_per_chip': batch / chips,
      'image_size': size, 'macs_per_image': macs,
      'augment_on': config.data.get('augment_on', 'host'),
      'hbm_per_chip': chip.hbm_bytes, 'peak_bf16_flops_per_chip': chip.bf16_flops}

  batch_sh = programs.batch_sharding
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=batch_sh)
  classes = int(config.num_classes)
  steps = {}
  if mode in ('train', 'both'):
    # With config.data.augment_on='device', uint8 crops and int labels: the step's figure then
    # includes the recipe's device part (`rmt_jax.train.device_augment`).
    train_batch = device_augment.train_batch_spec(config, batch, batch_sh)
    # Forward, input gradient and kernel gradient: 3 x the forward's 2 x MACs.
    steps['train'] = (programs.train_step, train_batch, 6 * macs * batch)
  if mode in ('eval', 'both'):
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sh)
    mask = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=batch_sh)
    # The eval step runs the raw and the EMA weights: two forward passes.
    steps['eval'] = (programs.eval_step, {'image': images, 'label': labels, 'mask': mask},
                     2 * 2 * macs * batch)

  for name, (fn, batch_spec, model_flops) in steps.items():
    log(f'{name}: compiling {config.model} for {topology} ({len(devices)} devices, global '
        f'batch {batch}) ...')
    start = time.perf_counter()
    traced = fn.trace(programs.abstract_state, batch_spec)
    compiled = traced.lower().compile()
    seconds = time.perf_counter() - start
    memory, cost = _memory(compiled), _cost(compiled)
    per_chip_memory = memory['total'] * per_chip_devices
    # libtpu 0.0.42's cost model answers v4 programs with a negative time: no estimate, then.
    step_s = cost['optimal_seconds'] if cost['optimal_seconds'] > 0 else None
    if step_s is None:
      log(f"{name}: XLA's cost model gave no step time ({cost['optimal_seconds']:g} s) for "
          f'{kind}; memory and FLOPs are still reported')

    def share_of_peak(step: float | None) -> float | None:
      return model_flops / chips / (step * chip.bf16_flops) if step else None

    entry = {
        'compile_seconds': seconds, 'memory_per_device': memory,
        'memory_per_chip': per_chip_memory,
        'fits': per_chip_memory <= chip.hbm_bytes,
        'headroom_bytes': chip.hbm_bytes - per_chip_memory,
        'xla_flops_per_chip': cost['flops'] * per_chip_devices,
        'model_flops_per_chip': model_flops / chips,
        'bytes_accessed_per_chip': cost['bytes_accessed'] * per_chip_devices,
        'estimated_step_seconds': step_s,
        'xla_optimal_seconds': cost['optimal_seconds'],
        'estimated_images_per_second': batch / step_s if step_s else None,
        'estimated_utilisation': share_of_peak(step_s)}
    # Beside XLA's estimate, what the chip would spend on the Pallas kernels (`tpu_floor`).
    physical = _physical(traced.jaxpr, compiled, chip.name, per_chip_devices, step_s, log)
    physical_s = physical.get('step_seconds')
    entry.update({
        'physical': physical, 'physical_step_seconds': physical_s,
        'physical_images_per_second': batch / physical_s if physical_s else None,
        'physical_utilisation': share_of_peak(physical_s),
        # What no rework of the kernels' vector work can exceed: their MXU work at its tile,
        # transcendentals and tiled bytes alone, and XLA's figure for the rest.
        'physical_utilisation_without_vector': share_of_peak(
            physical.get('step_seconds_without_vector'))})
    if traffic:
      entry['traffic'] = tpu_traffic.traffic(compiled)
    steps[name] = entry
    log(f'{name}: compiled in {seconds:.0f} s')
  result.update({k: v for k, v in steps.items()})
  return result


def compile_block(config: Any, topology: str, stage: int, images: int, log: Any = print,
                  traffic: bool = False) -> dict[str, Any]:
  """Compiles one block of `stage` (1-4) of the config's model, forward and backward, for one
  device of a TPU slice, and reports XLA's estimate and the physical one (`tpu_floor`) for it.

  The block is the stage's `RetBlock` with the model's dims, dtypes and kernel forms (those for
  the topology's devices), on `images` maps of the stage's size at the config's image size; its
  input is the residual stream (`residual_dtype`) and so is the cotangent. No drop path. The
  program returns the block's output beside the cotangents, so that every kernel of the block
  stays in it (with the cotangents alone XLA drops the forward kernel of the second half, whose
  output the backward pass does not read).

  Returns:
    A JSON-ready dict: the setup and the compiled program's flops, bytes (XLA's count), estimated
    seconds, compile seconds, the physical estimate ('physical', 'physical_seconds'; the
    kernels' and custom calls' counts in 'physical'), and with `traffic`, the breakdown under
    'traffic'.
  """
  devices = topology_devices(topology)
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ('data',))
  model = train_steps.build_model(config, mesh)
  if not 1 <= stage <= len(model.depths):
    raise ValueError(f'stage must be 1 to {len(model.depths)}, got {stage}')
  i = stage - 1
  block = layers.RetBlock(model.num_heads[i], model.init_values[i], model.heads_ranges[i],
                          model.axial[i], model.mlp_ratios[i], layerscale=model.layerscales[i],
                          layer_init_values=model.layer_init_values, dtype=model.dtype,
                          param_dtype=model.param_dtype, kernels=model.kernels)
  size = -(-int(config.data.image_size) // 2 ** (stage + 1))  # the stem's /4, then /2 a stage
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct((images, size, size, model.embed_dims[i]), model.residual_dtype,
                           sharding=replicated)
  with tpu_operations.plain_only():  # the weights, whatever form runs (`steps.init_state`)
    variables = jax.eval_shape(block.init, jax.random.key(0), x)
  variables = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), variables)

  def step(variables, x, cotangent):
    out, pullback = jax.vjp(block.apply, variables, x)
    return out, pullback(cotangent)

  log(f'block: compiling a stage-{stage} block of {config.model} ({images} x {size} x {size} x '
      f'{model.embed_dims[i]}) for one {devices[0].device_kind} device ...')
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    traced = jax.jit(step).trace(variables, x, x)
    compiled = traced.lower().compile()
  seconds = time.perf_counter() - start
  cost = _cost(compiled)
  kind = devices[0].device_kind
  xla_s = cost['optimal_seconds'] if cost['optimal_seconds'] > 0 else None
  physical = None
  if kind in tpu_floor.DEVICE_KINDS:
    per_chip_devices = len(devices) // len({tuple(d.coords) for d in devices})
    physical = _physical(traced.jaxpr, compiled, tpu_floor.DEVICE_KINDS[kind], per_chip_devices,
                         xla_s, log)
  result = {'topology': topology, 'device_kind': devices[0].device_kind, 'model': config.model,
            'stage': stage, 'images': images, 'map': [size, size, model.embed_dims[i]],
            'dtype': str(config.get('dtype')),
            'residual_dtype': jnp.dtype(model.residual_dtype).name, 'kernels': model.kernels,
            'compile_seconds': seconds, 'flops': cost['flops'],
            'bytes_accessed': cost['bytes_accessed'],
            'estimated_seconds': xla_s, 'physical': physical,
            'physical_seconds': physical.get('step_seconds') if physical else None}
  if traffic:
    result['traffic'] = tpu_traffic.traffic(compiled)
  return result


def format_block(result: dict[str, Any]) -> str:
  """`compile_block`'s result in one line."""
  estimate = result['estimated_seconds']
  return (f"{result['model']} stage-{result['stage']} block, {result['images']} x "
          f"{'x'.join(map(str, result['map']))}, forward + backward on one "
          f"{result['device_kind']} device, {result['dtype']} ({result['residual_dtype']} "
          f"residual stream), kernels {result['kernels']!r}: XLA's estimate "
          + (f'{1e3 * estimate:.3f} ms' if estimate else 'none') +
          f", {result['bytes_accessed'] / 1e9:.3f} GB, {result['flops'] / 1e9:.1f} GFLOP"
          + _physical_clause(result['physical'], result['physical_seconds']) +
          f" (compiled in {result['compile_seconds']:.0f} s). Estimates, not measurements.")


def _physical_clause(physical: dict[str, Any] | None, seconds: float | None) -> str:
  if not physical:
    return '; no physical estimate (no figures for this chip)'
  return (f"; physical estimate {f'{1e3 * seconds:.3f} ms' if seconds else 'none'} (its "
          f"{physical['pallas_calls']} Pallas kernels {1e3 * physical['kernel_seconds']:.3f} "
          f"ms, which XLA charges {1e3 * physical['kernel_xla_seconds']:.3f} ms)")


def _gib(n: float) -> str:
  return f'{n / 2**30:.2f}'


def format_table(result: dict[str, Any]) -> str:
  """The result as a Markdown table (one row per step): XLA's estimate and the physical one
  (its Pallas kernels as `tpu_floor` counts them, the rest as XLA does)."""
  lines = [
      f"{result['model']} on {result['topology']} ({result['chips']} x {result['chip']}, "
      f"{result['devices']} devices, mesh {result['mesh']}), {result['dtype']} "
      f"({result['residual_dtype']} residual stream), global batch "
      f"{result['global_batch']} ({result['images_per_chip']:g} per chip) at "
      f"{result['image_size']}px, kernels {result['kernels']!r}, augmentation on the "
      f"{result.get('augment_on', 'host')} (on the device: part of the train step). XLA's TPU "
      "cost model (its "
      "figure for a Pallas kernel is the kernel's declared cost) and the physical estimate "
      "(the kernels' MXU padding, vector work, tiled bytes and core balance, "
      "rmt_jax.analysis.tpu_floor, plus XLA's figure for the rest): estimates, not a "
      'measurement.', '',
      '| step | memory per chip, GiB (args + out + temp - aliased) | HBM GiB | fits | '
      'XLA GFLOP per chip | model GFLOP per chip | XLA est. step ms | XLA est. img/s | XLA est. '
      'utilisation | physical est. step ms | physical est. utilisation | compile s |',
      '| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for name in ('train', 'eval'):
    if name not in result:
      continue
    e = result[name]
    m = e['memory_per_device']
    n = result['devices_per_chip']
    fits = 'yes' if e['fits'] else f"no, by {_gib(-e['headroom_bytes'])} GiB"
    images = e['estimated_images_per_second']
    util = e['estimated_utilisation']
    estimate = (f"{1e3 * e['estimated_step_seconds']:.2f} | {images:.0f} | {100 * util:.1f}%"
                if images else 'none | - | -')
    physical = e.get('physical_step_seconds')
    estimate += (f" | {1e3 * physical:.2f} | {100 * e['physical_utilisation']:.1f}%"
                 if physical else ' | none | -')
    lines.append(
        f"| {name} | {_gib(e['memory_per_chip'])} ({_gib(n * m['arguments'])} + "
        f"{_gib(n * m['outputs'])} + {_gib(n * m['temporaries'])} - {_gib(n * m['aliased'])}) "
        f"| {_gib(result['hbm_per_chip'])} | {fits} | {e['xla_flops_per_chip'] / 1e9:.1f} | "
        f"{e['model_flops_per_chip'] / 1e9:.1f} | {estimate} | {e['compile_seconds']:.0f} |")
  for name in ('train', 'eval'):
    ceiling = result.get(name, {}).get('physical_utilisation_without_vector')
    if ceiling:
      lines.append(
          f"\n{name}: with the kernels' vector work free (their MXU work at its tile, "
          'transcendentals and tiled bytes alone, XLA\'s figure for the rest) the physical '
          f"estimate would be {1e3 * result[name]['physical']['step_seconds_without_vector']:.2f}"
          f' ms, {100 * ceiling:.1f}%: the most that reworking their vector work can reach.')
  return '\n'.join(lines)


_CONFIG = config_flags.DEFINE_config_file('config', None, 'A run config, as main.py takes.',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None, "libtpu topology name, e.g. 'v5p:2x2x1'.")
_BATCH_PER_CHIP = flags.DEFINE_integer(
    'batch_per_chip', 0, 'Images per chip (sets the global batch); 0 keeps the config\'s '
    'global_batch_size.')
_MODE = flags.DEFINE_enum('mode', 'both', ['train', 'eval', 'both'], 'Which steps to compile.')
_JSON = flags.DEFINE_string('json', '', 'Also write the result as JSON here.')
_BLOCK = flags.DEFINE_integer(
    'block', 0, 'Compile one block of this stage (1-4), forward and backward, on one device '
    '(batch_per_chip images) instead of the steps.')
_TRAFFIC = flags.DEFINE_bool(
    'traffic', False, "Also print where each step's memory traffic goes, by layer and stage "
    '(rmt_jax.analysis.tpu_traffic): what bounds the estimate.')


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # The compile targets the topology's abstract devices; the process itself runs on the CPU
  # backend, so it never opens a TPU (a TPU VM's chips stay free for a run beside it).
  jax.config.update('jax_platforms', 'cpu')
  config = _CONFIG.value
  try:
    devices = topology_devices(_TOPOLOGY.value)
  except (RuntimeError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if _BATCH_PER_CHIP.value:
    chips = len({tuple(d.coords) for d in devices})
    with config.unlocked():
      config.global_batch_size = _BATCH_PER_CHIP.value * chips
  log = lambda line: print(line, file=sys.stderr, flush=True)  # pylint: disable=unnecessary-lambda-assignment
  if _BLOCK.value:
    if not _BATCH_PER_CHIP.value:
      print('error: --block needs --batch_per_chip (the images of the one device)',
            file=sys.stderr)
      return 1
    result = compile_block(config, _TOPOLOGY.value, _BLOCK.value, _BATCH_PER_CHIP.value, log,
                           _TRAFFIC.value)
    print(format_block(result))
    if result['physical']:
      print('\n' + tpu_floor.format_kernels(result['physical']))
    if _TRAFFIC.value:
      print('\n' + tpu_traffic.format_summary(result['traffic'], result['bytes_accessed']))
    if _JSON.value:
      with open(_JSON.value, 'w') as f:
        json.dump(result, f, indent=1)
    return 0
  result = compile_for_topology(config, _TOPOLOGY.value, _MODE.value, log, _TRAFFIC.value)
  print(format_table(result))
  for name in ('train', 'eval'):
    if name in result:
      print(f'\n{name}: ' + tpu_floor.format_kernels(result[name]['physical']))
    if _TRAFFIC.value and name in result:
      print(f'\n{name}: ' + tpu_traffic.format_summary(
          result[name]['traffic'], result[name]['bytes_accessed_per_chip'] /
          result['devices_per_chip']))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'topology'])
  app.run(lambda argv: sys.exit(main(argv)))
