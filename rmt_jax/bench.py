r"""Throughput of RMT against the machine's own ceiling: eval and train images/s, FLOP/s, memory.

    python -m rmt_jax.bench --variant rmt_t --batch 16 --resolution 224 --dtype float32
    python -m rmt_jax.bench --variant rmt_s --mode eval --repeats 7 --json rmt_s.json
    python -m rmt_jax.bench --variant rmt_t --dtype bfloat16          # on an accelerator
    python -m rmt_jax.bench --variant rmt_t --dtype bfloat16 --residual_dtype bfloat16
    python -m rmt_jax.bench --variant rmt_t --devices 2               # data parallel

For one variant, batch size, resolution and compute dtype, on the default device (or N
of them, below):
  eval     the jitted forward pass (inference mode: running BatchNorm statistics, no drop path);
  train    the trainer's step (`rmt_jax.train.steps.train_step`), jitted with the state donated:
           forward with batch statistics and drop path, soft-target cross-entropy, backward,
           AdamW update, EMA of the weights and BatchNorm statistics;
  ceiling  a size^3 matrix product in the same dtype on the same device (2048^3 by default),
           the roofline every figure is also given as a fraction of.

With `--devices N` the batch is split over N devices (the trainer's data-parallel mesh,
`rmt_jax.train.sharding`; BatchNorm statistics and gradients are reduced over the whole batch, as in
training). On accelerators these are the first N local devices. On CPU, N > 1 splits the host
into N XLA devices (JAX's `jax_num_cpu_devices`) that run their halves of the batch side by
side: XLA CPU runs one computation's operations largely one after another, each spread over
the cores, and the small and element-wise ones leave cores idle; N devices keep them busy
(measured on a 2-core VM with 2 devices, batch 16: eval 1.13x for RMT-T and 1.15x for RMT-S,
train 1.11x and 1.05x). The ceiling is then the faster of the product on one device and the
product split by rows over the N devices: the whole machine's ceiling is the one the model is
held to.

The three are compiled first (compile seconds reported, never timed), then timed in turns,
`repeats` rounds of (3 x ceiling, eval, train), each call waited on with `block_until_ready`;
the model's figures are medians, the ceiling is the fastest product. Taking them in turns
matters on a shared machine: a neighbour's load slows the ceiling and the model alike. Still,
on a loaded machine the fractions are optimistic and the images/s pessimistic: report the load
average printed with them.

Each timed call also records the process's CPU seconds in user and kernel mode and its page
faults: on XLA CPU with glibc's malloc, a train step re-faults its temporaries every time (see
`rmt_jax.runtime.host_allocator`), and the table then says so.

FLOP/s are given two ways. 'model' counts 2 x the multiply-accumulates of the network's dots
and convolutions (`rmt_jax.summary`, the fvcore / paper convention), and 3x that for a training
step (forward + the two backward products): the convention of published utilisation figures,
and the one issue 7's targets use. 'xla' is the compiled computation's own `cost_analysis()`,
which also counts element-wise work (norms, softmax, GELU, the optimizer) and, on CPU, depthwise
convolutions in whichever form runs.

Weights are synthetic (normal(0, 0.02) kernels, unit scales, zero biases), drawn in NumPy from
the shapes that `jax.eval_shape(model.init)` gives: throughput does not depend on the values, and
XLA's CPU compiler spends longer on the random initialisers than on the model itself.
"""

import json
import os
import platform
import resource
import sys
import time
from typing import Any, Callable

from absl import flags
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rmt_jax.runtime import command_line
from rmt_jax.runtime import host_allocator
from rmt_jax.train import sharding
from rmt_jax.train import steps as train_steps
from rmt_jax.analysis import counting
from rmt_jax.models import RMT, canonical_name, create_model
from rmt_jax.kernels import selection as kernel_forms

PROGRAM = 'python -m rmt_jax.bench'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# The training recipe's optimizer constants (official RMT: AdamW, weight decay 0.05; EMA as in
# timm's ModelEmaV2). Their values do not change the cost of a step.
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
EMA_DECAY = 0.9999
# Matrix products per round: the ceiling is the fastest of them all.
CEILING_CALLS = 3


def synthetic_variables(model: RMT, images: jax.Array, seed: int = 0) -> Any:
  """Variables of the model's structure filled with plausible values, without running `init`.

  Args:
    model: the network.
    images: an input of the benchmarked shape (only its shape and dtype are used).
    seed: NumPy seed of the kernels.

  Returns:
    {'params', 'batch_stats'} with the shapes and dtypes of `model.init`.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], 'key', '')
    if name in ('scale', 'var'):
      value = np.ones(leaf.shape)
    elif name in ('bias', 'mean'):
      value = np.zeros(leaf.shape)
    else:
      value = rng.normal(0.0, 0.02, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def make_train_step(model: RMT, variables: Any, learning_rate: float = LEARNING_RATE,
                    weight_decay: float = WEIGHT_DECAY, ema_decay: float = EMA_DECAY
                    ) -> tuple[Callable[..., Any], Any]:
  """The trainer's step (`rmt_jax.train.steps.train_step`) with AdamW and the EMA, and its state.

  Args:
    model: the network.
    variables: {'params', 'batch_stats'}.
    learning_rate: AdamW's step size (constant: the schedule costs nothing measurable).
    weight_decay: AdamW's decoupled weight decay.
    ema_decay: decay of the weights' exponential moving average.

  Returns:
    (step, state): `step(state, images, targets) -> (state, metrics)` (not yet jitted) and
    a fresh `steps.TrainState`.
  """
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)
  # Copies: the step donates its state, and the caller may still use `variables`.
  params = jax.tree.map(jnp.copy, variables['params'])
  batch_stats = jax.tree.map(jnp.copy, variables['batch_stats'])
  state = train_steps.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), ema_params=jax.tree.map(jnp.copy, params),
      ema_batch_stats=jax.tree.map(jnp.copy, batch_stats), rng=jax.random.PRNGKey(1))

  def step(state, images, targets):
    return train_steps.train_step(state, {'image': images, 'label': targets}, model=model,
                                  tx=tx, ema=ema_decay)

  return step, state


class _Timed:
  """One compiled computation, its arguments, and the seconds of each timed call."""

  def __init__(self, name: str, fn: Callable[..., Any], args: tuple, donate: tuple = ()):
    self.name = name
    start = time.perf_counter()
    self.compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    self.compile_s = time.perf_counter() - start
    self.args = args
    self.stateful = bool(donate)
    self.seconds: list[float] = []
    # Per call, for the whole process: CPU seconds in user and kernel mode, minor page faults.
    self.user_s: list[float] = []
    self.kernel_s: list[float] = []
    self.page_faults: list[int] = []

  def call(self) -> None:
    out = self.compiled(*self.args)
    if self.stateful:  # the train step returns the state it consumed
      self.args = (out[0], *self.args[1:])
    jax.block_until_ready(out)

  def timed_call(self) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    self.call()
    self.seconds.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    self.user_s.append(after.ru_utime - before.ru_utime)
    self.kernel_s.append(after.ru_stime - before.ru_stime)
    self.page_faults.append(after.ru_minflt - before.ru_minflt)

  def xla_flops(self) -> float:
    cost = self.compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
      cost = cost[0]
    return float(cost.get('flops', 0.0)) if cost else 0.0

  def compiled_bytes(self) -> int | None:
    """Arguments + outputs + temporaries of the compiled computation (what it needs at peak)."""
    try:
      m = self.compiled.memory_analysis()
    except Exception:  # pylint: disable=broad-except  # not every backend implements it
      return None
    if m is None:
      return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


# Printed, with `host_allocator.cpu_hint()`, when a CPU run on the libc allocator spends a
# noticeable share of its CPU time in the kernel.
CPU_ALLOCATOR_NOTE = ('note: {share:.0%} of the {name} CPU time was spent in the kernel '
                      '({faults:,.0f} page faults per call). ')
# The hint needs both: a kernel share of the CPU time above this, and this many kernel seconds
# per call (rusage counts in clock ticks; a tiny model's calls are too short to judge).
KERNEL_SHARE_HINT = 0.05
KERNEL_SECONDS_HINT = 0.05


def _device_peak_bytes(device: jax.Device) -> int | None:
  stats = device.memory_stats()  # None on the CPU backend
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def _host_peak_bytes() -> int:
  # ru_maxrss is in KiB on Linux, bytes on macOS.
  scale = 1 if sys.platform == 'darwin' else 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def check_devices(devices: int, batch: int) -> None:
  """Raises ValueError unless `batch` splits over `devices` local devices that exist."""
  local = jax.local_devices()
  if devices < 1 or devices > len(local):
    hint = (' (XLA CPU: set jax_num_cpu_devices before JAX starts, as `--devices` of the '
            'command does)' if local[0].platform == 'cpu' else '')
    raise ValueError(f'devices must be between 1 and the {len(local)} local devices, '
                     f'got {devices}{hint}')
  if batch % devices:
    raise ValueError(f'batch {batch} does not split over {devices} devices')


def run(variant: str, batch: int, resolution: int, dtype: str = 'float32', mode: str = 'both',
        repeats: int = 5, warmup: int = 1, ceiling_size: int = 2048,
        remat: bool = False, devices: int = 1,
        residual_dtype: str = 'float32', kernels: str = 'auto') -> dict[str, Any]:
  """Compiles, then times in turns, the matmul ceiling and the model's eval and/or train step.

  Args:
    variant: a name `create_model` knows ('rmt_t', 'rmt_s', ..., 'rmt_tiny').
    batch: images per step.
    resolution: input height and width.
    dtype: compute dtype, 'float32' or 'bfloat16' (parameters stay float32).
    mode: 'eval', 'train' or 'both'.
    repeats: timed rounds; each figure is the median of `repeats` calls.
    warmup: untimed rounds after compilation.
    ceiling_size: n of the n x n x n matrix product that measures the ceiling.
    remat: rematerialise every stage's blocks in the backward pass.
    devices: split the batch over this many local devices (see the module docstring; on CPU
      the process must have been started with that many, `jax_num_cpu_devices`).
    residual_dtype: the residual stream's dtype (`RMT.residual_dtype`): 'float32', the official
      recipe's, or 'bfloat16'.
    kernels: the model's forms: 'auto' (the devices'), 'xla', 'cpu' or 'tpu'.

  Returns:
    A JSON-ready dict: the setup, the machine, 'ceiling' and one entry per mode with images/s,
    seconds, FLOP/s both ways and as fractions of the ceiling, compile seconds and memory.
  """
  if mode not in ('eval', 'train', 'both'):
    raise ValueError(f"mode must be 'eval', 'train' or 'both', got {mode!r}")
  for name, value in (('dtype', dtype), ('residual_dtype', residual_dtype)):
    if value not in DTYPES:
      raise ValueError(f'{name} must be one of {sorted(DTYPES)}, got {value!r}')
  if repeats < 1:
    raise ValueError(f'repeats must be at least 1, got {repeats}')
  check_devices(devices, batch)
  local = jax.local_devices()
  compute_dtype = DTYPES[dtype]
  variant = canonical_name(variant)
  model = create_model(variant, dtype=compute_dtype, residual_dtype=DTYPES[residual_dtype],
                       remat=(remat,) * len(create_model(variant).depths),
                       kernels=(kernel_forms.for_devices(local[:devices]) if kernels == 'auto'
                                else kernel_forms.check(kernels)))
  device = local[0]
  mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}),
                              local[:devices])
  on_batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  images = jax.device_put(
      np.random.default_rng(0).normal(size=(batch, resolution, resolution, 3)).astype(np.float32),
      on_batch)
  # Soft targets, as the input pipeline's Mixup / label smoothing produce them.
  targets = jax.device_put(
      jax.nn.one_hot(np.arange(batch) % model.num_classes, model.num_classes), on_batch)
  variables = jax.device_put(synthetic_variables(model, images), replicated)

  a = np.asarray(np.random.default_rng(1).normal(size=(ceiling_size, ceiling_size)),
                 compute_dtype)
  ceilings = [_Timed('ceiling', jnp.matmul, (jax.device_put(a, device),) * 2)]
  if devices > 1:  # the left factor's rows split like a batch, the right one whole
    ceilings.append(_Timed('ceiling', jnp.matmul,
                           (jax.device_put(a, on_batch), jax.device_put(a, replicated))))
  timed = list(ceilings)
  if mode in ('eval', 'both'):
    timed.append(_Timed('eval', sharding.traced_on(mesh, model.apply), (variables, images)))
  if mode in ('train', 'both'):
    step, state = make_train_step(model, variables)
    state = jax.device_put(state, replicated)
    timed.append(_Timed('train', sharding.traced_on(mesh, step), (state, images, targets),
                        donate=(0,)))

  for _ in range(warmup):
    for t in timed:
      t.call()
  for _ in range(repeats):
    for t in timed:
      for _ in range(CEILING_CALLS if t in ceilings else 1):
        t.timed_call()

  forward_model_flops = 2.0 * counting.count_macs(model, resolution, batch)
  # The ceiling is the fastest product seen, not the median: a two-thread matmul stalls
  # whenever a neighbour takes one of its cores, and a ceiling that is too low would flatter
  # every fraction below it.
  ceiling_seconds = [s for c in ceilings for s in c.seconds]
  ceiling_s = float(np.min(ceiling_seconds))
  ceiling_flops = 2.0 * ceiling_size ** 3 / ceiling_s
  result: dict[str, Any] = {
      'variant': variant, 'batch': batch, 'resolution': resolution, 'dtype': dtype,
      'residual_dtype': residual_dtype, 'kernels': model.kernels,
      'remat': remat, 'repeats': repeats,
      'device': f'{device.platform}: {device.device_kind}', 'num_devices': devices,
      'host': platform.processor() or platform.machine(), 'cpus': os.cpu_count(),
      'jax': jax.__version__, 'flax': flax.__version__,
      'host_allocator': host_allocator.host_allocator(),
      'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None,
      'ceiling': {'size': ceiling_size, 'seconds': ceiling_s, 'flops_per_s': ceiling_flops,
                  'median_flops_per_s': 2.0 * ceiling_size ** 3 / float(np.median(
                      ceiling_seconds)),
                  'all_seconds': ceiling_seconds,
                  'one_device_flops_per_s': 2.0 * ceiling_size ** 3 / min(ceilings[0].seconds),
                  'split_flops_per_s': (2.0 * ceiling_size ** 3 / min(ceilings[1].seconds)
                                        if devices > 1 else None)},
      'forward_model_flops_per_image': forward_model_flops / batch,
  }
  for t in timed[len(ceilings):]:
    seconds = float(np.median(t.seconds))
    model_flops = forward_model_flops * (3.0 if t.name == 'train' else 1.0)
    # cost_analysis() describes one device's share of an SPMD-partitioned computation.
    xla_flops = t.xla_flops() * devices
    result[t.name] = {
        'images_per_s': batch / seconds, 'seconds': seconds, 'all_seconds': t.seconds,
        'compile_s': t.compile_s,
        'model_flops': model_flops, 'model_flops_per_s': model_flops / seconds,
        'model_fraction_of_ceiling': model_flops / seconds / ceiling_flops,
        'xla_flops': xla_flops, 'xla_flops_per_s': xla_flops / seconds,
        'xla_fraction_of_ceiling': xla_flops / seconds / ceiling_flops,
        'compiled_bytes': t.compiled_bytes(),
        'cpu_user_s': float(np.median(t.user_s)), 'cpu_kernel_s': float(np.median(t.kernel_s)),
        'page_faults': float(np.median(t.page_faults)),
    }
  result['host_peak_bytes'] = _host_peak_bytes()
  peaks = [_device_peak_bytes(d) for d in local[:devices]]
  result['device_peak_bytes'] = None if None in peaks else max(peaks)
  return result


def format_table(result: dict[str, Any]) -> str:
  """The result as a plain-text table, one row per timed computation."""
  gib = 2.0 ** 30
  c = result['ceiling']
  load = result['load_average']
  lines = [
      f"{result['variant']}  batch {result['batch']}  {result['resolution']}x"
      f"{result['resolution']}  {result['dtype']}"
      + (f" ({result['residual_dtype']} stream)"
         if result.get('residual_dtype', 'float32') != 'float32' else '')
      + f"{'  remat' if result['remat'] else ''}  on "
      f"{result['device']}"
      + (f" x {result['num_devices']} devices" if result.get('num_devices', 1) > 1 else '')
      + f" ({result['cpus']} cpus), jax {result['jax']}, "
      f"median of {result['repeats']}, malloc: {result['host_allocator']}"
      + (f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ''),
      f"ceiling: {c['size']}^3 {result['dtype']} matmul {c['flops_per_s'] / 1e9:.1f} GFLOP/s "
      f"({c['seconds'] * 1e3:.1f} ms, fastest of {len(c['all_seconds'])}; median "
      f"{c['median_flops_per_s'] / 1e9:.1f} GFLOP/s"
      + (f"; one device {c['one_device_flops_per_s'] / 1e9:.1f}, split over the devices "
         f"{c['split_flops_per_s'] / 1e9:.1f}" if c.get('split_flops_per_s') else '') + ')',
      f"{'':<6}{'images/s':>10}{'ms/step':>10}{'model GFLOP/s':>15}{'of ceiling':>12}"
      f"{'xla GFLOP/s':>13}{'of ceiling':>12}{'compile s':>11}{'compiled GiB':>14}",
  ]
  for name in ('eval', 'train'):
    if name not in result:
      continue
    r = result[name]
    mem = f"{r['compiled_bytes'] / gib:.2f}" if r['compiled_bytes'] is not None else 'n/a'
    lines.append(
        f"{name:<6}{r['images_per_s']:>10.2f}{r['seconds'] * 1e3:>10.1f}"
        f"{r['model_flops_per_s'] / 1e9:>15.1f}{r['model_fraction_of_ceiling']:>12.1%}"
        f"{r['xla_flops_per_s'] / 1e9:>13.1f}{r['xla_fraction_of_ceiling']:>12.1%}"
        f"{r['compile_s']:>11.1f}{mem:>14}")
  for name in ('eval', 'train'):
    if name in result:
      r = result[name]
      lines.append(f"{name} per call, whole process: {r['cpu_user_s']:.2f} CPU-s user, "
                   f"{r['cpu_kernel_s']:.2f} CPU-s kernel, {r['page_faults']:,.0f} page faults")
  device_peak = result['device_peak_bytes']
  lines.append(f"peak host memory {result['host_peak_bytes'] / gib:.2f} GiB, peak device memory "
               + (f'{device_peak / gib:.2f} GiB' if device_peak is not None
                  else 'n/a (the backend reports none)'))
  lines.append(f"model FLOPs = 2 x MACs ({result['forward_model_flops_per_image'] / 1e9:.2f} "
               'GFLOP per image forward, x3 for a train step); xla = cost_analysis()'
               + ('; compiled GiB per device' if result.get('num_devices', 1) > 1 else ''))
  for name in ('eval', 'train'):
    r = result.get(name)
    if r is None or result['host_allocator'] != 'libc' or not result['device'].startswith('cpu'):
      continue
    share = r['cpu_kernel_s'] / max(r['cpu_user_s'] + r['cpu_kernel_s'], 1e-9)
    if share > KERNEL_SHARE_HINT and r['cpu_kernel_s'] >= KERNEL_SECONDS_HINT:
      lines.append(CPU_ALLOCATOR_NOTE.format(share=share, name=name, faults=r['page_faults'])
                   + host_allocator.cpu_hint())
  return '\n'.join(lines)


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('variant', 'rmt_t', 'a variant create_model knows (rmt_t, ..., rmt_tiny)',
                      flag_values=flag_values)
  flags.DEFINE_integer('batch', 16, 'images per step', flag_values=flag_values)
  flags.DEFINE_enum('kernels', 'auto', list(kernel_forms.KERNELS), 'the forms of the operations '
                    "that have backend-specific ones: auto (the devices' own), xla (plain), "
                    'cpu, tpu (see rmt_jax.kernels.selection)', flag_values=flag_values)
  flags.DEFINE_integer('resolution', 224, 'input height and width', flag_values=flag_values)
  flags.DEFINE_enum('dtype', 'float32', sorted(DTYPES), 'compute dtype (parameters stay '
                    'float32)', flag_values=flag_values)
  flags.DEFINE_enum('residual_dtype', 'float32', sorted(DTYPES),
                    "the residual stream's dtype (RMT.residual_dtype)", flag_values=flag_values)
  flags.DEFINE_enum('mode', 'both', ['eval', 'train', 'both'], 'which steps to time',
                    flag_values=flag_values)
  flags.DEFINE_integer('repeats', 5, 'timed rounds (medians of this many calls)',
                       flag_values=flag_values)
  flags.DEFINE_integer('warmup', 1, 'untimed rounds after compiling', flag_values=flag_values)
  flags.DEFINE_integer('ceiling_size', 2048, 'n of the n^3 matrix product of the ceiling',
                       flag_values=flag_values)
  flags.DEFINE_boolean('remat', False, 'rematerialise the blocks in the backward pass',
                       flag_values=flag_values)
  flags.DEFINE_integer('devices', 1, 'split the batch over this many devices (on CPU: split '
                       'the host into this many XLA devices)', flag_values=flag_values)
  flags.DEFINE_string('json', None, 'also write the result to this file',
                      flag_values=flag_values)


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status (2: a usage error, in one line)."""
  options = flags.FlagValues()
  _define_flags(options)
  command_line.parse(options, argv, program=PROGRAM, doc=__doc__)
  if options.devices > 1:
    # Must precede the backend's start; only the CPU backend reads it, so it is harmless on
    # accelerator hosts.
    try:
      jax.config.update('jax_num_cpu_devices', options.devices)
    except RuntimeError as e:
      print(f'error: --devices: {e}', file=sys.stderr)
      return 2
  try:
    canonical_name(options.variant)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    check_devices(options.devices, options.batch)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  result = run(options.variant, options.batch, options.resolution, options.dtype, options.mode,
               options.repeats, options.warmup, options.ceiling_size, options.remat,
               options.devices, options.residual_dtype, options.kernels)
  print(format_table(result), flush=True)
  if options.json:
    with open(options.json, 'w') as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
