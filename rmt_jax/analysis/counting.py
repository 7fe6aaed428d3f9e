"""Parameter counts and multiply-accumulates of RMT networks, measured from the computation.

MACs are counted from the HLO module that `jax.jit` hands to XLA: every `dot` and `convolution`
contributes (output elements) x (contracted elements). That is the convention of fvcore, which
the paper's "FLOPs" column uses (MACs / 2^30: RMT-S 4.5G); fvcore also counts norms and pooling
(about 0.5% more). Depthwise convs are counted as convolutions whichever form runs.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax.models import RMT

_HLO_DEF = re.compile(
    r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\(([^)]*)\)(.*)$')


def count_params(model: RMT, resolution: int = 224) -> int:
  """Number of trainable parameters (the `params` collection), without allocating them."""
  variables = _abstract_variables(model, resolution)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables['params'])))


def count_macs(model: RMT, resolution: int = 224, batch: int = 1) -> int:
  """Multiply-accumulates of one forward pass (eval mode) at resolution x resolution.

  Args:
    model: the module; its depthwise convs are counted as convolutions.
    resolution: input height and width.
    batch: images per pass.

  Returns:
    MACs of all dot and convolution ops of the jitted forward pass.
  """
  model = model.clone(kernels='xla')
  variables = _abstract_variables(model, resolution)
  images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32)
  lowered = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images)
  return hlo_macs(lowered.compiler_ir('hlo').as_hlo_text())


def hlo_macs(hlo_text: str) -> int:
  """MACs of the dot and convolution instructions of an unoptimised HLO module's text."""
  shapes: dict[str, list[int]] = {}
  ops = []
  for line in hlo_text.splitlines():
    match = _HLO_DEF.match(line)
    if match:
      name, shape, op, args, attrs = match.groups()
      shapes[name] = [int(d) for d in shape.split(',') if d]
      if op in ('dot', 'convolution'):
        ops.append((name, op, args, attrs))
  total = 0
  for name, op, args, attrs in ops:
    lhs_name, rhs_name = (a.strip().split(' ')[-1].lstrip('%') for a in args.split(',')[:2])
    lhs, rhs = shapes[lhs_name], shapes[rhs_name]
    if op == 'dot':
      contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', attrs).group(1)
      per_output = int(np.prod([lhs[int(i)] for i in contracting.split(',') if i]))
    else:  # kernel labels, e.g. 01io: every kernel dim but the output features is contracted
      kernel_labels = re.search(r'dim_labels=\w+_(\w+)->', attrs).group(1)
      per_output = int(np.prod([rhs[i] for i, c in enumerate(kernel_labels) if c != 'o']))
    total += int(np.prod(shapes[name])) * per_output
  return total


def _abstract_variables(model: RMT, resolution: int) -> Any:
  images = jnp.zeros((1, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
