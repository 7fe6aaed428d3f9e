"""RMT's explicit spatial prior: the Manhattan decay and the rotary ("theta shift") tables.

Everything here is a function of static shapes and the stage's hyper-parameters, computed once
per shape in NumPy float32 and embedded in the compiled computation as a constant. Nothing here
is a parameter. The official code stores two of these tables as buffers (`Relpos.angle`,
`Relpos.decay`); `rmt_jax.convert` regenerates them from these functions.

Every step runs in float32, as in the official code: `log(1 - 2 ** -x)` loses bits to the
subtraction, and the rotary phases `position * frequency` reach thousands of radians, so float32
rounding is part of the function. The official `linspace` rounds its last bit differently by
device (PyTorch's CPU kernel differs under AVX2 and AVX-512, CUDA differently again), and
`10000 ** x` multiplies that bit by ln(10000): no recipe reproduces every official checkpoint bit
for bit. These tables agree with them within 1.1e-6 relative (frequencies) and 2 units in the last
place (decay rates), see tests/test_decay.py, far inside float32 parity of the network's outputs.
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
  exponent = np.linspace(0.0, 1.0, key_dim // 2, dtype=np.float32)
  angle = np.float32(1.0) / np.float32(10000.0) ** exponent
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
  heads = np.arange(num_heads, dtype=np.float32)
  exponent = np.float32(-initial_value) - np.float32(heads_range) * heads / np.float32(num_heads)
  return np.log(np.float32(1.0) - np.float32(2.0) ** exponent).astype(np.float32)


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

