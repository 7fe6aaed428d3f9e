"""The building blocks of RMT: depthwise convs, Manhattan self-attention (MaSA), FFN, block, stem,
patch merging.

All modules work on NHWC arrays. Parameter names follow the attribute paths of the official
PyTorch code (`q_proj`, `lepe`, `ffn/fc1`, `retention_layer_norm`, `gamma_1`, ...), so that
`rmt_jax.convert` is a rename plus a transpose. `dtype` is the compute dtype, `param_dtype` the
storage dtype; attention softmax and the norms always run in float32.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax.models import conv3x3 as conv3x3_op
from rmt_jax.models import decay

Dtype = Any

# The official model re-initialises every Linear with trunc_normal(std=0.02) and zero bias
# (`VisRetNet._init_weights`, applied after the retention's own xavier init).
dense_kernel_init = nn.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _conv_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv3x3(features: int, in_features: int, stride: int, dtype: Dtype, param_dtype: Dtype,
            name: str) -> nn.Conv:
  """A 3x3 conv with bias and PyTorch's symmetric padding 1 (XLA's 'SAME' pads asymmetrically).

  The convolution itself is `rmt_jax.models.conv3x3` (its kernel gradient is written out for
  XLA CPU).
  """
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 dtype=dtype, param_dtype=param_dtype, kernel_init=conv_kernel_init,
                 bias_init=_conv_bias_init(9 * in_features),
                 conv_general_dilated=conv3x3_op.conv_general_dilated, name=name)


def batch_norm(name: str, param_dtype: Dtype) -> nn.BatchNorm:
  """PyTorch BatchNorm2d over the last axis: eps 1e-5, momentum 0.1 (flax counts 1 - 0.1)."""
  return nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
                      name=name)


def layer_norm(name: str, param_dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=param_dtype, name=name)


def dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=dense_kernel_init,
                  name=name)


class LinearParams(nn.Module):
  """A Linear layer's parameters, declared (names, shapes, init) as `nn.Dense` declares them.

  For a caller that applies several layers in one function (`project`); the call returns
  (kernel (in, out), bias (out,)).
  """
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', dense_kernel_init, (in_features, self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    return kernel, bias


@jax.custom_vjp
def project(x: jax.Array, kernels: tuple[jax.Array, ...], biases: tuple[jax.Array, ...]
            ) -> tuple[jax.Array, ...]:
  """Several Linear layers on the same input: x @ kernel + bias for each (kernel, bias).

  The forward pass keeps one product per layer; the backward pass concatenates the layers and
  takes one product for the input gradient and one for all kernel gradients (XLA CPU transposes
  x for each kernel-gradient product). Measured on XLA CPU, RMT-T at batch 16: separate
  backward products made the train step 10% slower (3.3 vs 3.0 s), and one concatenated
  forward product made eval 4% slower.

  Args:
    x: (..., in).
    kernels: (in, out_i) each.
    biases: (out_i,) each.

  Returns:
    (..., out_i) for each layer.
  """
  return tuple(jnp.dot(x, w) + b for w, b in zip(kernels, biases))


def _project_fwd(x, kernels, biases):
  return project(x, kernels, biases), (x, kernels, biases)


def _project_bwd(residuals, grads):
  x, kernels, biases = residuals
  grad = jnp.concatenate(grads, axis=-1)
  sizes = np.cumsum([w.shape[1] for w in kernels])[:-1]
  grad_x = jnp.dot(grad, jnp.concatenate(kernels, axis=1).T)
  flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
  grad_kernels = jnp.split(jnp.dot(flat_x.T, flat_grad), sizes, axis=1)
  grad_biases = jnp.split(flat_grad.sum(axis=0), sizes)
  return (grad_x.astype(x.dtype),
          tuple(g.astype(w.dtype) for g, w in zip(grad_kernels, kernels)),
          tuple(g.astype(b.dtype) for g, b in zip(grad_biases, biases)))


project.defvjp(_project_fwd, _project_bwd)


def default_depthwise_impl() -> str:
  """'shifted' on CPU, 'conv' elsewhere.

  XLA's CPU backend runs grouped convolutions with one group per channel 20-70x slower than the
  same conv written as a sum of shifted slices (measured with jax 0.10 on AVX-512: 56x56x64, 3x3,
  83 ms vs 1.9 ms at batch 16); cuDNN and the TPU compiler have native depthwise kernels.
  """
  return 'shifted' if jax.default_backend() == 'cpu' else 'conv'


class DepthwiseConv(nn.Module):
  """Depthwise k x k conv, stride 1, symmetric zero padding k // 2, with bias.

  The kernel is stored as (k, k, 1, C), the layout of `nn.Conv(..., feature_group_count=C)`.

  Attributes:
    kernel_size: k (odd).
    impl: 'shifted' (sum of k*k shifted slices times per-channel weights), 'conv'
      (`lax.conv_general_dilated` with one group per channel) or 'auto'
      (see `default_depthwise_impl`). Both compute the same function.
  """
  kernel_size: int
  impl: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, channels = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', conv_kernel_init, (k, k, 1, channels), self.param_dtype)
    bias = self.param('bias', _conv_bias_init(k * k), (channels,), self.param_dtype)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    impl = default_depthwise_impl() if self.impl == 'auto' else self.impl
    pad = k // 2
    if impl == 'conv':
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)
    elif impl == 'shifted':
      y = shifted_depthwise_conv(x, kernel[:, :, 0, :])
    else:
      raise ValueError(f"DepthwiseConv.impl must be 'auto', 'shifted' or 'conv', got {impl!r}")
    return y + bias


def _shifted_sum(padded: jax.Array, kernel: jax.Array, height: int, width: int) -> jax.Array:
  k = kernel.shape[0]
  return sum(padded[:, i:i + height, j:j + width, :] * kernel[i, j]
             for i in range(k) for j in range(k))


def _pad_spatial(x: jax.Array, pad: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


@jax.custom_vjp
def shifted_depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise k x k conv, stride 1, zero padding k // 2, as a sum of k*k shifted slices.

  The backward pass is written out: autodiff of the slices pads the output gradient once per
  tap and sums k*k full-size arrays, which took more than half of RMT-T's training step on XLA
  CPU (jax 0.10). The input gradient is the same shifted sum over the padded output gradient
  with the kernel flipped; the kernel gradient is one variadic reduction (`_kernel_grad`).

  Args:
    x: (batch, height, width, channels).
    kernel: (k, k, channels), k odd.

  Returns:
    (batch, height, width, channels).
  """
  pad = kernel.shape[0] // 2
  return _shifted_sum(_pad_spatial(x, pad), kernel, *x.shape[1:3])


def _shifted_depthwise_fwd(x, kernel):
  return shifted_depthwise_conv(x, kernel), (x, kernel)


def _shifted_depthwise_bwd(residuals, grad):
  x, kernel = residuals
  k, (height, width) = kernel.shape[0], x.shape[1:3]
  pad = k // 2
  grad_x = _shifted_sum(_pad_spatial(grad, pad), kernel[::-1, ::-1], height, width)
  grad_kernel = _kernel_grad(_pad_spatial(x, pad), grad, k)
  return grad_x.astype(x.dtype), grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


def _kernel_grad(xp: jax.Array, grad: jax.Array, k: int) -> jax.Array:
  """(k*k, c): sum over (b, h, w) of xp[b, h + i, w + j, c] * grad[b, h, w, c], tap t = i*k + j.

  All k*k taps in one variadic reduction along the width axis, which reads each input once and
  keeps per-(b, h, c) partial sums (k*k / w of the map's size); a second, small reduction sums
  them. Channels stay the minor axis, so the first reduction runs along a non-minor axis,
  element-wise over channels. Measured in isolation at batch 16 (jax 0.10, 2 cores), it matched
  or beat a loop over taps (one multiply-reduce each, which copies its window out first) and a
  loop over chunks of images (all taps per chunk, reduced over (image, row)) at every stage's
  size but 14x14 (8.9 vs 7.2 ms for the tap loop); in RMT-T's and RMT-S's train step on 2 CPU
  devices it was 8-9% faster than the best mix of the two loops, and equal on one.
  """
  height, width = grad.shape[1:3]
  grad = grad.astype(jnp.float32)
  products = tuple(xp[:, i:i + height, j:j + width, :] * grad for i in range(k) for j in range(k))
  zeros = tuple(jnp.zeros((), jnp.float32) for _ in products)
  partial_sums = jax.lax.reduce(products, zeros,
                                lambda a, b: tuple(u + v for u, v in zip(a, b)), (2,))
  return jnp.stack(partial_sums).sum(axis=(1, 2))


shifted_depthwise_conv.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in PyTorch's form, x/2 (1 + erf(x / sqrt 2)).

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA CPU expands into several
  passes over the array; erf is one polynomial. Same function to float32 rounding.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


def theta_shift(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotary position shift on interleaved channel pairs: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s).

  The pairs are swapped by reversing a size-2 axis and the sign goes into the sin table (exact:
  the same products, negated). Stacking (-x1, x0) instead made XLA CPU write the rotated copy
  out once per block (it feeds two transposes); a reversal is fused into each of them. Measured
  in turns on a 2-core VM (jax 0.10.2, batch 16): RMT-T eval 5% and train 6% faster, RMT-S
  train 2% faster.

  Args:
    x: (..., d) with d even.
    sin: broadcastable to x.
    cos: broadcastable to x.
  """
  swapped = x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
  signed_sin = (sin.reshape(*sin.shape[:-1], -1, 2) * np.array([-1, 1], sin.dtype)
                ).reshape(sin.shape)
  return x * cos + swapped * signed_sin


def _decayed_attention(q: jax.Array, k: jax.Array, v: jax.Array, decay_bias: np.ndarray,
                       dtype: Dtype) -> jax.Array:
  """softmax(q k^T + decay) v over the last two axes, batched over the leading ones.

  The decay (log(gamma) * distance) is a log-space bias added to the logits. The softmax is
  taken in float32 and normalised after the product with v (dividing (.., i, d) rather than
  (.., i, j)): the same function, and 1.5x faster for the axial attention on XLA CPU, where
  the normalised form also materialises the bias broadcast to the logits' full shape.

  Args:
    q: (..., i, d), already scaled.
    k: (..., j, d).
    v: (..., j, d).
    decay_bias: (heads, i, j), broadcast against the logits' trailing axes (..., heads, i, j).
    dtype: compute dtype of the products with v.

  Returns:
    (..., i, d) in `dtype`.
  """
  logits = jnp.einsum('...id,...jd->...ij', q, k, preferred_element_type=jnp.float32)
  logits = logits + decay_bias
  # Any per-row shift leaves the softmax unchanged: no gradient flows through the max.
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  out = jnp.einsum('...ij,...jd->...id', weights.astype(dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / weights.sum(axis=-1, keepdims=True)).astype(dtype)


class ManhattanSelfAttention(nn.Module):
  """MaSA: softmax attention whose logits carry the Manhattan decay, with rotary q/k and LePE.

  `axial=True` is the decomposed form (the official `VisionRetentionChunk`, selected by its
  `chunkwise_recurrents` flag; there is no recurrence): attention along each row (W) with the
  1-d decay, then along each column (H) on the result, O(HW(H+W)). `axial=False` attends over
  all H*W positions with the 2-d Manhattan decay (the official `VisionRetentionAll`), O((HW)^2).

  Attributes:
    num_heads: heads; channels per head = dim // num_heads for q, k and v.
    initial_value: the stage's `init_values` (slowest decay exponent).
    heads_range: the stage's `heads_ranges` (spread of decay rates over heads).
    axial: decomposed (True) or whole-image (False) attention.
  """
  num_heads: int
  initial_value: float
  heads_range: float
  axial: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  depthwise_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, dim = x.shape
    heads, key_dim = self.num_heads, dim // self.num_heads
    kernels, biases = zip(*(LinearParams(dim, self.param_dtype, name=f'{name}_proj')(dim)
                            for name in 'qkv'))
    q, k, v = project(x.astype(self.dtype), tuple(w.astype(self.dtype) for w in kernels),
                      tuple(b.astype(self.dtype) for b in biases))
    lepe = DepthwiseConv(5, self.depthwise_impl, self.dtype, self.param_dtype, name='lepe')(v)
    k = k * key_dim ** -0.5

    sin, cos = (jnp.asarray(t, self.dtype)[:, :, None, :]
                for t in decay.rotary_tables(height, width, key_dim))
    q = theta_shift(q.reshape(batch, height, width, heads, key_dim), sin, cos)
    k = theta_shift(k.reshape(batch, height, width, heads, key_dim), sin, cos)
    v = v.reshape(batch, height, width, heads, key_dim)
    rates = (self.num_heads, self.initial_value, self.heads_range)

    if self.axial:
      # Heads and the untouched spatial axis go next to the batch axis before each contraction:
      # the einsums become plain batched matmuls (2.4x faster on XLA CPU than letting the
      # einsum permute internally).
      q_w, k_w, v_w = (t.transpose(0, 1, 3, 2, 4) for t in (q, k, v))  # (b, h, n, w, d)
      out = _decayed_attention(q_w, k_w, v_w, decay.axial_decay(width, *rates),
                               self.dtype)  # (b, h, n, w, d)

      q_h, k_h = (t.transpose(0, 2, 3, 1, 4) for t in (q, k))  # (b, w, n, h, d)
      v_h = out.transpose(0, 3, 2, 1, 4)  # (b, w, n, h, d)
      out = _decayed_attention(q_h, k_h, v_h, decay.axial_decay(height, *rates),
                               self.dtype)  # (b, w, n, h, d)
      out = out.transpose(0, 3, 1, 2, 4)  # (b, h, w, n, d)
    else:
      length = height * width
      q_l, k_l, v_l = (t.reshape(batch, length, heads, key_dim).transpose(0, 2, 1, 3)
                       for t in (q, k, v))  # (b, n, l, d)
      out = _decayed_attention(q_l, k_l, v_l, decay.manhattan_decay(height, width, *rates),
                               self.dtype)  # (b, n, l, d)
      out = out.transpose(0, 2, 1, 3)  # (b, l, n, d)

    out = out.reshape(batch, height, width, dim).astype(self.dtype) + lepe
    return dense(dim, self.dtype, self.param_dtype, 'out_proj')(out)


class FeedForward(nn.Module):
  """fc1 -> exact GELU -> (+ depthwise 3x3 conv of itself) -> fc2 (the official `FeedForwardNetwork`)."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  depthwise_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = dense(self.hidden_dim, self.dtype, self.param_dtype, 'fc1')(x)
    x = gelu(x)
    x = x + DepthwiseConv(3, self.depthwise_impl, self.dtype, self.param_dtype, name='dwconv')(x)
    return dense(dim, self.dtype, self.param_dtype, 'fc2')(x)


class RetBlock(nn.Module):
  """x += DWConv3x3(x); x += DropPath(gamma_1 * MaSA(LN(x))); x += DropPath(gamma_2 * FFN(LN(x))).

  Attributes:
    drop_path: stochastic depth rate of this block (drawn from the 'dropout' rng stream).
    layerscale: learn per-channel gammas (initialised to `layer_init_values`).
  """
  num_heads: int
  initial_value: float
  heads_range: float
  axial: bool
  mlp_ratio: float
  drop_path: float = 0.0
  layerscale: bool = False
  layer_init_values: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  depthwise_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  depthwise_impl=self.depthwise_impl)
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)
    x = x + DepthwiseConv(3, self.depthwise_impl, self.dtype, self.param_dtype, name='pos')(x)

    y = ManhattanSelfAttention(self.num_heads, self.initial_value, self.heads_range, self.axial,
                               name='retention', **common)(
                                   layer_norm('retention_layer_norm', self.param_dtype)(x))
    if self.layerscale:
      y = y * self._gamma('gamma_1', dim)
    x = x + drop(y)

    y = FeedForward(int(self.mlp_ratio * dim), name='ffn', **common)(
        layer_norm('final_layer_norm', self.param_dtype)(x))
    if self.layerscale:
      y = y * self._gamma('gamma_2', dim)
    return x + drop(y)

  def _gamma(self, name: str, dim: int) -> jax.Array:
    init = nn.initializers.constant(self.layer_init_values)
    return self.param(name, init, (dim,), self.param_dtype).astype(self.dtype)


class Stem(nn.Module):
  """The official `PatchEmbed`: four 3x3 convs (strides 2, 1, 2, 1) with BatchNorm and GELU, /4.

  Submodule names are the indices of the official `nn.Sequential` (`proj_0` ... `proj_10`).
  """
  embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    half = self.embed_dim // 2
    plan = [(half, 2), (half, 1), (self.embed_dim, 2), (self.embed_dim, 1)]
    for i, (features, stride) in enumerate(plan):
      x = conv3x3(features, x.shape[-1], stride, self.dtype, self.param_dtype, f'proj_{3 * i}')(x)
      x = batch_norm(f'proj_{3 * i + 1}', self.param_dtype)(x, use_running_average=not train)
      if i < len(plan) - 1:
        x = gelu(x)
    return x


class PatchMerging(nn.Module):
  """3x3 stride-2 conv (padding 1) + BatchNorm between stages."""
  out_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = conv3x3(self.out_dim, x.shape[-1], 2, self.dtype, self.param_dtype, 'reduction')(x)
    return batch_norm('norm', self.param_dtype)(x, use_running_average=not train)
