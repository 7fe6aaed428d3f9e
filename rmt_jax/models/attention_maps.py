"""Manhattan self-attention's weights and decay priors, for looking at them.

The network never needs its attention weights as an array (`layers._decayed_attention`
normalises after the product with v, and a fused kernel may never form them). To see them, build
the model with `capture_attention=True`: each `ManhattanSelfAttention` then also computes its
softmax weights here, in plain JAX from the same shifted queries and keys and the same decay, and
sows them into the `intermediates` collection:

    model = rmt_jax.create_model('rmt_s', capture_attention=True)
    logits, state = model.apply(variables, images, mutable=['intermediates'])
    state['intermediates']['layers_0']['blocks_0']['retention']['row_weights'][0]

or, keyed by (stage, block), `logits, maps = capture(model, variables, images)`.

Per block (float32, b = batch, n = heads, H x W = the stage's map, raster order y * W + x):
  - whole attention: 'weights' (b, n, HW, HW), query rows summing to 1;
  - axial attention: 'row_weights' (b, H, n, W, W) of the row pass over each row y, and
    'column_weights' (b, W, n, H, H) of the column pass over each column x (applied to the row
    pass' output). `query_attention` combines them into the effective 2-d attention of a query.

With `capture_attention=False` (the default) none of this is traced.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax.models import decay

Rates = tuple[int, float, float]  # (num_heads, initial_value, heads_range) of a stage


def softmax_weights(q: jax.Array, k: jax.Array, decay_bias: jax.Array) -> jax.Array:
  """softmax(q k^T + decay) over the keys: the weights `layers._decayed_attention` applies to v.

  Args:
    q: (..., i, d), already scaled and shifted.
    k: (..., j, d).
    decay_bias: (heads, i, j), broadcast against the logits' trailing axes.

  Returns:
    float32 (..., i, j), each row non-negative and summing to 1.
  """
  logits = jnp.einsum('...id,...jd->...ij', q, k, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits + decay_bias, axis=-1)


def block_weights(q: jax.Array, k: jax.Array, axial: bool, rates: Rates) -> dict[str, jax.Array]:
  """The attention weights of one MaSA call, in the layout documented at the top of this file.

  Args:
    q: (b, H, W, heads, d), scaled and theta-shifted, as `ManhattanSelfAttention` holds them.
    k: (b, H, W, heads, d), likewise.
    axial: the block's form.
    rates: (num_heads, initial_value, heads_range) of the stage.

  Returns:
    {'row_weights', 'column_weights'} (axial) or {'weights'} (whole).
  """
  batch, height, width, heads, key_dim = q.shape
  if axial:
    q_w, k_w = (t.transpose(0, 1, 3, 2, 4) for t in (q, k))  # (b, H, n, W, d)
    q_h, k_h = (t.transpose(0, 2, 3, 1, 4) for t in (q, k))  # (b, W, n, H, d)
    return {'row_weights': softmax_weights(q_w, k_w, decay.axial_decay(width, *rates)),
            'column_weights': softmax_weights(q_h, k_h, decay.axial_decay(height, *rates))}
  q_l, k_l = (t.reshape(batch, height * width, heads, key_dim).transpose(0, 2, 1, 3)
              for t in (q, k))  # (b, n, HW, d)
  return {'weights': softmax_weights(q_l, k_l, decay.manhattan_decay(height, width, *rates))}


def sow(module: nn.Module, q: jax.Array, k: jax.Array, axial: bool, rates: Rates) -> None:
  """Sows `block_weights(q, k, axial, rates)` into `module`'s 'intermediates' collection."""
  for name, weights in block_weights(q, k, axial, rates).items():
    module.sow('intermediates', name, weights)


def query_attention(block: dict[str, jax.Array], y: int, x: int, height: int,
                    width: int) -> jax.Array:
  """The attention of query (y, x) over every key position of the map.

  For an axial block this is the effective 2-d attention of the two passes: the output at (y, x)
  is sum_y' C[x][y, y'] * (sum_x' R[y'][x, x'] v[y', x']), so key (y', x') weighs
  C[x][y, y'] * R[y'][x, x'] (C the column weights of column x, R the row weights of row y'),
  which sums to 1 over all keys.

  Args:
    block: one block's weights, as sown (`capture`'s values).
    y: query row on the stage's map.
    x: query column.
    height: rows of the stage's map (`map_shapes`).
    width: columns.

  Returns:
    float32 (b, heads, height, width).
  """
  if 'weights' in block:
    weights = block['weights']  # (b, n, HW, HW)
    return weights[:, :, y * width + x, :].reshape(*weights.shape[:2], height, width)
  row, column = block['row_weights'], block['column_weights']  # (b,H,n,W,W), (b,W,n,H,H)
  return column[:, x, :, y, :, None] * row[:, :, :, x, :].transpose(0, 2, 1, 3)


def map_shapes(height: int, width: int, num_stages: int) -> list[tuple[int, int]]:
  """(H, W) of each stage's map for an image of height x width.

  The stem halves twice and each patch merging once, every time with a 3x3 stride-2 conv of
  padding 1, which maps n to ceil(n / 2).
  """
  shapes, size = [], (height, width)
  for stage in range(num_stages):
    for _ in range(2 if stage == 0 else 1):
      size = tuple(-(-n // 2) for n in size)
    shapes.append(size)
  return shapes


def decay_prior(height: int, width: int, y: int, x: int, rates: Rates) -> np.ndarray:
  """The explicit spatial prior around query (y, x): gamma_h ** manhattan_distance, per head.

  The attention logits carry log(gamma_h) * distance, so the prior multiplies the unnormalised
  weights exp(q k) by this map (1 at the query, decaying with the distance).

  Args:
    height: rows of the stage's map.
    width: columns.
    y: query row.
    x: query column.
    rates: (num_heads, initial_value, heads_range) of the stage.

  Returns:
    float32 (heads, height, width).
  """
  rows, cols = np.abs(np.arange(height) - y), np.abs(np.arange(width) - x)
  distance = (rows[:, None] + cols[None, :]).astype(np.float32)
  return np.exp(decay.log_gamma(*rates)[:, None, None] * distance[None])


def capture(model: nn.Module, variables: Any, images: jax.Array,
            ) -> tuple[jax.Array, dict[tuple[int, int], dict[str, Any]]]:
  """Runs `model` (an `RMT`, eval mode, jitted) and returns its output and every block's attention.

  Args:
    model: an `RMT`; it is cloned with `capture_attention=True`.
    variables: its {'params', 'batch_stats'}.
    images: NHWC, normalised as in training.

  Returns:
    (the model's output, {(stage, block): weights}), the weights as documented at the top of this
    file; `map_shapes` gives each stage's (H, W).
  """
  capturing = model.clone(capture_attention=True)
  apply = jax.jit(functools.partial(capturing.apply, mutable=['intermediates']))
  out, state = apply(variables, images)
  maps = {}
  for stage_name, stage in state['intermediates'].items():  # 'layers_{stage}'
    for block_name, block in stage.items():  # 'blocks_{block}'
      key = (int(stage_name.rsplit('_', 1)[1]), int(block_name.rsplit('_', 1)[1]))
      maps[key] = {name: value[0] for name, value in block['retention'].items()}
  return out, maps
