r"""The model's matrix products and convolutions timed alone: the step's speed if nothing else cost.

  python -m benchmarks.matmul_bound --variant rmt_t --mode train
  python -m benchmarks.matmul_bound --variant rmt_s --mode eval --top 25 --json bound.json

`rmt_jax.bench` measures a step against the machine's matmul ceiling. This command says how much
of the gap the products themselves leave: it traces the same computation (the eval forward pass
or the trainer's step, `rmt_jax.bench`), collects every `dot_general` and `conv_general_dilated`
of its jaxpr (for train: the forward products, and the backward ones that autodiff and the
model's own VJPs write), and times each distinct one (operand shapes, dtypes, dimension numbers)
alone on the default device (one device, as the step): jitted, inputs ready, the median of
`repeats` calls. Weighted by how often each occurs, their sum is the time the step would take if
every other operation (norms, softmax, GELU, transposes, drop path, the optimizer) cost nothing,
and the model's FLOPs over that time, as a fraction of the ceiling, is the most the step can
reach while the products run as they do:

  bound = model FLOPs / (sum of the products' times alone) / ceiling.

An estimate rather than a strict bound: alone, a product may find its operands in cache where
the step would not, or lack an element-wise epilogue XLA would have fused into it. The table
lists the products that take the most time, with their own FLOP/s: where the library is slow
on the model's shapes, no change elsewhere in the step can close the gap.

FLOPs of a product: 2 x (output elements) x (elements contracted per output); for a
convolution, the kernel window times its input features per group, divided by the input
dilation (a strided conv's input gradient dilates the output gradient with zeros, which do no
work).
"""

import collections
import json
import os
import sys
import time
from typing import Any, Callable

if __package__ in (None, ''):  # `python benchmarks/matmul_bound.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.extend.core  # pylint: disable=g-import-not-at-top
# JAX's own dead-code elimination of jaxprs (nested ones included); it has no public name.
from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from rmt_jax import bench  # pylint: disable=g-import-not-at-top
from rmt_jax.models import canonical_name, create_model  # pylint: disable=g-import-not-at-top
from rmt_jax.kernels import selection as kernel_forms  # pylint: disable=g-import-not-at-top
from rmt_jax.runtime import command_line  # pylint: disable=g-import-not-at-top

PROGRAM = 'python -m benchmarks.matmul_bound'

_PRODUCTS = ('dot_general', 'conv_general_dilated')


def _subjaxprs(params: dict[str, Any]):
  """The jaxprs nested in an equation's parameters (jit, custom_jvp/vjp, remat, cond, ...)."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _walk(jaxpr, multiplicity: int, counts: collections.Counter, eqns: dict) -> None:
  """Counts the products of `jaxpr` and its nested jaxprs into `counts`, one `eqns` each."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _PRODUCTS:
      key = (eqn.primitive.name,
             tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars),
             tuple(sorted((k, repr(v)) for k, v in eqn.params.items())))
      eqns.setdefault(key, eqn)
      counts[key] += multiplicity
    if eqn.primitive.name == 'scan':
      inner = multiplicity * int(eqn.params['length'])
    elif eqn.primitive.name == 'while':
      raise ValueError('matmul_bound cannot count the products of a while loop')
    else:
      inner = multiplicity
    for sub in _subjaxprs(eqn.params):
      _walk(sub, inner, counts, eqns)


def product_flops(eqn) -> float:
  """2 x output elements x elements contracted per output (see the module docstring)."""
  out = float(np.prod(eqn.outvars[0].aval.shape))
  if eqn.primitive.name == 'dot_general':
    (lhs_contracting, _), _ = eqn.params['dimension_numbers']
    lhs_shape = eqn.invars[0].aval.shape
    return 2.0 * out * float(np.prod([lhs_shape[d] for d in lhs_contracting]))
  rhs_shape = eqn.invars[1].aval.shape
  rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...)
  window = float(np.prod([rhs_shape[d] for d in rhs_spec[2:]]))
  in_features = rhs_shape[rhs_spec[1]]
  dilation = float(np.prod(eqn.params['lhs_dilation'] or (1,)))
  return 2.0 * out * window * in_features / dilation


def product_form(eqn) -> str:
  """The contraction in short: 'c3.0 b-' = lhs axis 3 with rhs axis 0, no batch axes."""
  if eqn.primitive.name == 'dot_general':
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    axes = lambda a: ','.join(map(str, a)) or '-'
    return f'c{axes(lc)}.{axes(rc)} b{axes(lb)}.{axes(rb)}'
  p = eqn.params
  return (f"s{'x'.join(map(str, p['window_strides']))}"
          f" ld{'x'.join(map(str, p['lhs_dilation'] or (1, 1)))}"
          f" rd{'x'.join(map(str, p['rhs_dilation'] or (1, 1)))}"
          + (f" g{p['feature_group_count']}" if p['feature_group_count'] > 1 else '')
          + (f" bg{p['batch_group_count']}" if p['batch_group_count'] > 1 else ''))


def collect_products(fn: Callable[..., Any], *args) -> list[dict[str, Any]]:
  """The distinct dot_general / conv_general_dilated equations of `fn`'s jaxpr and their counts.

  Returns:
    One dict per distinct product: 'op', 'shapes' (operands), 'form' (`product_form`),
    'count', 'flops' (one call) and 'eqn' (the jaxpr equation, to re-run it).
  """
  counts: collections.Counter = collections.Counter()
  eqns: dict = {}
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  # Dead code out first, as XLA will: a custom VJP (the stem's conv3x3) computes the input
  # gradient of the first conv too, which nothing uses.
  jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  _walk(jaxpr, 1, counts, eqns)
  products = []
  for key, count in counts.items():
    eqn = eqns[key]
    products.append({'op': key[0], 'shapes': [list(s) for s, _ in key[1]],
                     'form': product_form(eqn), 'count': count, 'flops': product_flops(eqn),
                     'eqn': eqn})
  return products


def time_product(eqn, repeats: int, seed: int = 0) -> float:
  """Median seconds of the equation alone, jitted, on random operands that are ready."""
  rng = np.random.default_rng(seed)
  operands = [jnp.asarray(rng.normal(size=v.aval.shape), v.aval.dtype) for v in eqn.invars]
  params = dict(eqn.params)
  compiled = jax.jit(lambda *xs: eqn.primitive.bind(*xs, **params)).lower(*operands).compile()
  jax.block_until_ready(compiled(*operands))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*operands))
    seconds.append(time.perf_counter() - start)
  return float(np.median(seconds))


def run(variant: str, mode: str, batch: int, resolution: int, dtype: str = 'float32',
        repeats: int = 5, step_repeats: int = 3) -> dict[str, Any]:
  """Times the step (`rmt_jax.bench.run`) and then each of its products alone.

  Returns:
    A JSON-ready dict: bench's result for the mode (step time, ceiling) and 'products' (each
    with count, FLOPs and seconds alone) and 'bound' (seconds, FLOP/s, fraction of ceiling).
  """
  if mode not in ('eval', 'train'):
    raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
  variant = canonical_name(variant)
  step = bench.run(variant, batch, resolution, dtype, mode, repeats=step_repeats)
  # The forms bench.run timed (one device's), so that the jaxpr holds only the products it ran.
  model = create_model(variant, dtype=bench.DTYPES[dtype],
                       kernels=kernel_forms.for_devices(jax.local_devices()[:1]))
  images = jnp.zeros((batch, resolution, resolution, 3), jnp.float32)
  variables = bench.synthetic_variables(model, images)
  if mode == 'eval':
    products = collect_products(model.apply, variables, images)
  else:
    train_step, state = bench.make_train_step(model, variables)
    targets = jax.nn.one_hot(np.arange(batch) % model.num_classes, model.num_classes)
    products = collect_products(train_step, state, images, targets)
  for i, p in enumerate(products):
    p['seconds'] = time_product(p.pop('eqn'), repeats, seed=i)
    print(f'\rtimed {i + 1}/{len(products)} products', end='', file=sys.stderr, flush=True)
  print(file=sys.stderr)
  products.sort(key=lambda p: -p['seconds'] * p['count'])
  bound_s = sum(p['seconds'] * p['count'] for p in products)
  ceiling = step['ceiling']['flops_per_s']
  model_flops = step[mode]['model_flops']
  return {
      'variant': variant, 'mode': mode, 'batch': batch, 'resolution': resolution, 'dtype': dtype,
      'device': step['device'], 'jax': step['jax'], 'host_allocator': step['host_allocator'],
      'ceiling': step['ceiling'], 'step': step[mode], 'products': products,
      'bound': {'seconds': bound_s, 'share_of_step': bound_s / step[mode]['seconds'],
                'product_flops': sum(p['flops'] * p['count'] for p in products),
                'model_flops_per_s': model_flops / bound_s,
                'fraction_of_ceiling': model_flops / bound_s / ceiling}}


def format_report(result: dict[str, Any], top: int = 15) -> str:
  """The summary lines and the `top` products by total time."""
  s, b, c = result['step'], result['bound'], result['ceiling']
  calls = sum(p['count'] for p in result['products'])
  lines = [
      f"{result['variant']} {result['mode']}  batch {result['batch']}  {result['resolution']}x"
      f"{result['resolution']}  {result['dtype']}  on {result['device']}, jax {result['jax']}, "
      f"malloc: {result['host_allocator']}",
      f"ceiling {c['flops_per_s'] / 1e9:.1f} GFLOP/s; step {s['seconds'] * 1e3:.1f} ms = "
      f"{s['model_flops_per_s'] / 1e9:.1f} GFLOP/s = {s['model_fraction_of_ceiling']:.1%} of "
      'the ceiling',
      f"products: {calls} calls of {len(result['products'])} distinct ones, "
      f"{b['product_flops'] / 1e9:.1f} GFLOP, {b['seconds'] * 1e3:.1f} ms alone "
      f"({b['share_of_step']:.0%} of the step)",
      f"bound: {b['model_flops_per_s'] / 1e9:.1f} GFLOP/s = {b['fraction_of_ceiling']:.1%} of "
      'the ceiling if nothing but the products cost time',
      f"{'calls':>6}{'ms each':>9}{'ms total':>10}{'GFLOP/s':>9}  op, operand shapes, form "
      '(dot: contracting / batch axes of lhs.rhs; conv: strides, dilations, groups)',
  ]
  for p in result['products'][:top]:
    shapes = ' x '.join('(' + ','.join(map(str, s)) + ')' for s in p['shapes'])
    lines.append(f"{p['count']:>6}{p['seconds'] * 1e3:>9.2f}"
                 f"{p['seconds'] * p['count'] * 1e3:>10.1f}"
                 f"{p['flops'] / p['seconds'] / 1e9:>9.1f}  {p['op']} {shapes}  {p['form']}")
  return '\n'.join(lines)


def _define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('variant', 'rmt_t', 'a variant create_model knows (rmt_t, ..., rmt_tiny)',
                      flag_values=flag_values)
  flags.DEFINE_enum('mode', 'train', ['eval', 'train'], 'the forward pass or the train step',
                    flag_values=flag_values)
  flags.DEFINE_integer('batch', 16, 'images per step', flag_values=flag_values)
  flags.DEFINE_integer('resolution', 224, 'input height and width', flag_values=flag_values)
  flags.DEFINE_enum('dtype', 'float32', sorted(bench.DTYPES), 'compute dtype',
                    flag_values=flag_values)
  flags.DEFINE_integer('repeats', 5, 'timed calls of each product', flag_values=flag_values)
  flags.DEFINE_integer('step_repeats', 3, 'timed calls of the step', flag_values=flag_values)
  flags.DEFINE_integer('top', 15, 'products listed', flag_values=flag_values)
  flags.DEFINE_string('json', None, 'also write the result to this file',
                      flag_values=flag_values)


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status (2: a usage error, in one line)."""
  options = flags.FlagValues()
  _define_flags(options)
  command_line.parse(options, argv, program=PROGRAM, doc=__doc__)
  try:
    canonical_name(options.variant)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  result = run(options.variant, options.mode, options.batch, options.resolution, options.dtype,
               options.repeats, options.step_repeats)
  print(format_report(result, options.top), flush=True)
  if options.json:
    with open(options.json, 'w') as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
