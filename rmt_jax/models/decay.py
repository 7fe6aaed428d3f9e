"""RMT's explicit spatial prior: the Manhattan decay and the rotary ("theta shift") tables.

Everything here is a function of static shapes and the stage's hyper-parameters; nothing is a
parameter. The per-head rates and per-channel frequencies are small NumPy float32 vectors (the
official code stores them as the buffers `Relpos.decay` and `Relpos.angle`, and
`rmt_jax.weights.pytorch` regenerates them from `log_gamma` and `rotary_angles`). The tables that grow
with the map (the rotary sin/cos, H*W*d; the decays, heads*L^2 and heads*(H*W)^2) are computed
inside the traced computation from iotas, so a program never embeds a constant of size (H*W)^2
(70 MB for RMT-S's last stage at 1344x800) and XLA fuses the decay into the attention logits
instead of reading a table from memory. Distances are small integers, exact in float32, and each
decay entry is one float32 product, bit-equal to the NumPy one; sin and cos are XLA's, within one
float32 ulp of NumPy's on the phases used here. (XLA CPU takes the rotary tables as NumPy
constants instead, `rotary_constants`.)

Every step runs in float32, as in the official code: `log(1 - 2 ** -x)` loses bits to the
subtraction, and the rotary phases `position * frequency` reach thousands of radians, so float32
rounding is part of the function. The official `linspace` rounds its last bit differently by
device (PyTorch's CPU kernel differs under AVX2 and AVX-512, CUDA differently again), and
`10000 ** x` multiplies that bit by ln(10000): no recipe reproduces every official checkpoint bit
for bit. These tables agree with them within 1.1e-6 relative (frequencies) and 2 units in the last
place (decay rates), see tests/test_decay.py, far inside float32 parity of the network's outputs.
"""

import functools

import jax
import jax.numpy as jnp
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


def rotary_tables(height: int, width: int, key_dim: int) -> tuple[jax.Array, jax.Array]:
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
  index = jax.lax.broadcasted_iota(jnp.float32, (height * width, key_dim), 0)
  phase = (index * rotary_angles(key_dim)).reshape(height, width, key_dim)
  return jnp.sin(phase), jnp.cos(phase)


@functools.lru_cache(maxsize=64)
def rotary_constants(height: int, width: int, key_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """`rotary_tables` as NumPy float32 constants (sin and cos of the float32 phases).

  For XLA CPU (`kernels='cpu'`), where tables embedded in the program as constants let XLA
  fuse the rotary shift around the attention's transposes better than tables computed in it
  from iotas (docs/kernels.md gives the figures).
  """
  index = np.arange(height * width, dtype=np.float32)
  phase = index[:, None] * rotary_angles(key_dim)[None, :]
  return (np.sin(phase).reshape(height, width, key_dim).astype(np.float32),
          np.cos(phase).reshape(height, width, key_dim).astype(np.float32))



def _distance(length: int) -> jax.Array:
  """|i - j| for i, j < length, float32 (length, length)."""
  index = jax.lax.broadcasted_iota(jnp.int32, (length, length), 0)
  return jnp.abs(index - index.T).astype(jnp.float32)


def axial_decay(length: int, num_heads: int, initial_value: float,
                heads_range: float) -> jax.Array:
  """1-d decay `|i - j| * log(gamma_h)` along one axis, for the axial (W then H) retention.

  Args:
    length: the axis' size.
    num_heads: number of heads.
    initial_value: the official `init_values[stage]`.
    heads_range: the official `heads_ranges[stage]`.

  Returns:
    float32 (num_heads, length, length), added to the logits before the softmax.
  """
  gamma = log_gamma(num_heads, initial_value, heads_range)
  return _distance(length)[None] * gamma[:, None, None]


def manhattan_decay(height: int, width: int, num_heads: int, initial_value: float,
                    heads_range: float) -> jax.Array:
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
  rows, cols = _distance(height), _distance(width)
  distance = (rows[:, None, :, None] + cols[None, :, None, :]).reshape(height * width,
                                                                      height * width)
  gamma = log_gamma(num_heads, initial_value, heads_range)
  return distance[None] * gamma[:, None, None]
