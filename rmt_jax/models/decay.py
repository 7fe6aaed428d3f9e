"""RMT's explicit spatial prior: the Manhattan decay and the rotary ("theta shift") tables.

Everything here is a function of static shapes and the stage's hyper-parameters, computed once
per shape in NumPy float32 and embedded in the compiled computation as a constant. Nothing here
is a parameter. The official code stores two of these tables as buffers (`Relpos.angle`,
`Relpos.decay`); `rmt_jax.convert` regenerates them from these functions.

The frequencies and decay rates are computed in float64 and rounded once to float32; the rotary
phases `position * frequency` are then rounded to float32 as in the official code, because at
thousands of positions that rounding is part of the function. The official buffers are computed
in float32 by `torch.linspace`, `pow` and `log`, whose last bit depends on the device and its vector
width (PyTorch's CPU linspace differs between AVX2 and AVX-512), so no float32 recipe reproduces
every official checkpoint bit for bit; these agree with them within a few units in the last place
(tests/test_decay.py measures it), far inside float32 parity of the network's outputs.
"""

import functools

import numpy as np


def rotary_angles(key_dim: int) -> np.ndarray:
  """Per-channel rotation frequencies of the theta shift (the official `Relpos.angle`).

  Args:
    key_dim: channels per head of queries and keys (even).

  Returns:
    float32 array (key_dim,): `1 / 10000 ** linspace(0, 1, key_dim // 2)`, each frequency
    repeated for the two channels of an interleaved pair.
  """
  if key_dim % 2:
    raise ValueError(f'key_dim must be even for the rotary table, got {key_dim}')
  angle = 1.0 / 10000.0 ** np.linspace(0.0, 1.0, key_dim // 2)
  return np.repeat(angle, 2).astype(np.float32)


def log_gamma(num_heads: int, initial_value: float, heads_range: float) -> np.ndarray:
  """Per-head log decay rates `log(gamma_h)` (the official `Relpos.decay`).

  `gamma_h = 1 - 2 ** (-initial_value - heads_range * h / num_heads)`: heads decay at
  different speeds, the first the fastest.

  Args:
    num_heads: number of heads.
    initial_value: the official `init_values[stage]`.
    heads_range: the official `heads_ranges[stage]`.

  Returns:
    float32 array (num_heads,) of negative numbers.
  """
  exponent = -initial_value - heads_range * np.arange(num_heads) / num_heads
  return np.log(1.0 - 2.0 ** exponent).astype(np.float32)


@functools.lru_cache(maxsize=64)
def rotary_tables(height: int, width: int, key_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """sin and cos of the theta shift for every position of an height x width map.

  Positions are numbered in raster order over the whole map (`index = row * width + col`), as in
  the official code; the table is not a 2-d (row, col) rotary embedding.

  Args:
    height: rows of the feature map.
    width: columns of the feature map.
    key_dim: channels per head.

  Returns:
    (sin, cos), each float32 (height, width, key_dim).
  """
  index = np.arange(height * width, dtype=np.float32)
  phase = index[:, None] * rotary_angles(key_dim)[None, :]
  sin = np.sin(phase).reshape(height, width, key_dim)
  cos = np.cos(phase).reshape(height, width, key_dim)
  return sin.astype(np.float32), cos.astype(np.float32)


@functools.lru_cache(maxsize=64)
def axial_decay(length: int, num_heads: int, initial_value: float,
                heads_range: float) -> np.ndarray:
  """1-d decay `|i - j| * log(gamma_h)` along one axis, for the axial (W then H) retention.

  Args:
    length: the axis' size.
    num_heads: number of heads.
    initial_value: the official `init_values[stage]`.
    heads_range: the official `heads_ranges[stage]`.

  Returns:
    float32 (num_heads, length, length), added to the logits before the softmax.
  """
  index = np.arange(length, dtype=np.float32)
  distance = np.abs(index[:, None] - index[None, :])
  gamma = log_gamma(num_heads, initial_value, heads_range)
  return (distance[None] * gamma[:, None, None]).astype(np.float32)


@functools.lru_cache(maxsize=64)
def manhattan_decay(height: int, width: int, num_heads: int, initial_value: float,
                    heads_range: float) -> np.ndarray:
  """2-d decay `(|y_i - y_j| + |x_i - x_j|) * log(gamma_h)` over all pairs of positions.

  Args:
    height: rows of the feature map.
    width: columns of the feature map.
    num_heads: number of heads.
    initial_value: the official `init_values[stage]`.
    heads_range: the official `heads_ranges[stage]`.

  Returns:
    float32 (num_heads, height * width, height * width), raster order, added to the logits of
    the whole-image retention before the softmax.
  """
  rows, cols = np.meshgrid(np.arange(height, dtype=np.float32),
                           np.arange(width, dtype=np.float32), indexing='ij')
  grid = np.stack([rows, cols], axis=-1).reshape(height * width, 2)
  distance = np.abs(grid[:, None, :] - grid[None, :, :]).sum(-1)
  gamma = log_gamma(num_heads, initial_value, heads_range)
  return (distance[None] * gamma[:, None, None]).astype(np.float32)

