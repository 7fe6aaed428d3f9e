"""The building blocks of RMT: depthwise convs, Manhattan self-attention (MaSA), FFN, block, stem,
patch merging.

All modules work on NHWC arrays. Parameter names follow the attribute paths of the official
PyTorch code (`q_proj`, `lepe`, `ffn/fc1`, `retention_layer_norm`, `gamma_1`, ...), so that
`rmt_jax.weights.pytorch` is a rename plus a transpose. `dtype` is the compute dtype, `param_dtype` the
storage dtype; attention softmax and the norms always run in float32. Every operation here is in
its plain form; `kernels` ('auto', 'xla', 'cpu', 'tpu') selects the XLA CPU forms
(`rmt_jax.kernels.cpu_forms`) or the TPU forms (`rmt_jax.kernels.tpu.operations`, which decide
for themselves where their Pallas kernels run) where an operation has one (see
`rmt_jax.kernels.selection`).
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax.kernels import cpu_forms
from rmt_jax.kernels import selection as kernels_lib
from rmt_jax.kernels.tpu import operations as tpu_operations
from rmt_jax.models import attention_maps
from rmt_jax.models import decay
from rmt_jax.models import initializers
from rmt_jax.models.batch_norm import BatchNorm

Dtype = Any

# The official model re-initialises every Linear with trunc_normal(std=0.02) and zero bias
# (`VisRetNet._init_weights`, applied after the retention's own xavier init).
dense_kernel_init = initializers.TruncatedNormal(stddev=0.02)
# PyTorch's default Conv2d init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
conv_kernel_init = initializers.FanInUniform()


def _conv_bias_init(fan_in: int) -> initializers.Uniform:
  """PyTorch's default Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return initializers.Uniform(1.0 / np.sqrt(fan_in))


def conv3x3(features: int, in_features: int, stride: int, dtype: Dtype, param_dtype: Dtype,
            name: str, kernels: str = 'auto') -> nn.Conv:
  """A 3x3 conv with bias and PyTorch's symmetric padding 1 (XLA's 'SAME' pads asymmetrically).

  Declared, named and initialised as `nn.Conv` declares it; the convolution is
  `conv3x3_general_dilated` (on XLA CPU with a written kernel gradient).
  """
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 dtype=dtype, param_dtype=param_dtype, kernel_init=conv_kernel_init,
                 bias_init=_conv_bias_init(9 * in_features),
                 conv_general_dilated=functools.partial(conv3x3_general_dilated,
                                                        kernels=kernels),
                 name=name)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv3x3_general_dilated(x: jax.Array, kernel: jax.Array, window_strides: Sequence[int],
                            padding: Any, lhs_dilation: Any = None, rhs_dilation: Any = None,
                            dimension_numbers: Any = None, feature_group_count: int = 1,
                            precision: Any = None, *, kernels: str = 'auto') -> jax.Array:
  """`lax.conv_general_dilated`'s signature, for `nn.Conv`, restricted to RMT's 3x3 convs.

  `nn.Conv` calls this with the module's settings; anything but a 3x3, padding-1, undilated,
  ungrouped NHWC conv with equal strides and default precision is an error rather than a silent
  fallback. `kernels` selects XLA's convolution or `cpu_forms.conv3x3`.
  """
  undilated = all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
  nhwc = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, _NHWC)
  if (kernel.shape[:2] != (3, 3) or tuple(map(tuple, padding)) != ((1, 1), (1, 1))
      or not undilated or feature_group_count != 1 or len(set(window_strides)) != 1
      or precision is not None
      or jax.lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers) != nhwc):
    raise ValueError('conv3x3_general_dilated takes 3x3 NHWC/HWIO convs with padding 1, '
                     'equal strides, no dilation, no groups and the default precision; got '
                     f'kernel {kernel.shape}, strides {window_strides}, padding {padding}')
  stride = int(window_strides[0])

  def plain(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=_NHWC)

  return kernels_lib.select(kernels, x, kernel, xla=plain,
                            cpu=lambda x, kernel: cpu_forms.conv3x3(x, kernel, stride))


def batch_norm(name: str, param_dtype: Dtype) -> BatchNorm:
  """PyTorch BatchNorm2d over the last axis: eps 1e-5, momentum 0.1, unbiased running variance."""
  return BatchNorm(momentum=0.1, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
                   name=name)


_LAYER_NORM_EPS = 1e-6


def layer_norm(name: str | None, param_dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=jnp.float32, param_dtype=param_dtype,
                      scale_init=initializers.ONES, bias_init=initializers.ZEROS, name=name)


class LayerNormParams(nn.Module):
  """A `layer_norm`'s parameters as it declares them: scale (C,) of ones, bias (C,) of zeros.

  For a caller that applies the norm inside a larger function (`ManhattanSelfAttention`, whose
  TPU form normalises inside its projection kernel); the call returns (scale, bias).
  """
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
    return (self.param('scale', initializers.ONES, (features,), self.param_dtype),
            self.param('bias', initializers.ZEROS, (features,), self.param_dtype))


def apply_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """`layer_norm` with the given parameters (float32 result): the same operations."""
  # Unbound (`parent=None`): callers may be methods of a module that are not `nn.compact`.
  norm = nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=jnp.float32, param_dtype=scale.dtype,
                      parent=None)
  return norm.apply({'params': {'scale': scale, 'bias': bias}}, x)


def dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=dense_kernel_init,
                  bias_init=initializers.ZEROS, name=name)


class LinearParams(nn.Module):
  """A Linear layer's parameters, declared (names, shapes, init) as `nn.Dense` declares them.

  For a caller that applies several layers in one function (`project`); the call returns
  (kernel (in, out), bias (out,)).
  """
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int, out_features: int) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', dense_kernel_init, (in_features, out_features),
                        self.param_dtype)
    bias = self.param('bias', initializers.ZEROS, (out_features,), self.param_dtype)
    return kernel, bias


def project(x: jax.Array, kernels: tuple[jax.Array, ...], biases: tuple[jax.Array, ...],
            kernel_forms: str) -> tuple[jax.Array, ...]:
  """Several Linear layers on the same input: x @ kernel + bias for each (kernel, bias).

  Args:
    x: (..., in).
    kernels: (in, out_i) each.
    biases: (out_i,) each.
    kernel_forms: the model's `kernels` field (`cpu_forms.project` on XLA CPU).

  Returns:
    (..., out_i) for each layer.
  """
  plain = lambda x, kernels, biases: tuple(jnp.dot(x, w) + b for w, b in zip(kernels, biases))
  return kernels_lib.select(kernel_forms, x, kernels, biases, xla=plain, cpu=cpu_forms.project)


class DepthwiseConvParams(nn.Module):
  """A depthwise k x k conv's parameters, as `DepthwiseConv` declares them: kernel (k, k, 1, C)
  (the layout of `nn.Conv(..., feature_group_count=C)`), bias (C,), PyTorch's default init.

  For a caller that applies the conv inside a larger function (`FeedForward`); the call returns
  (kernel, bias).
  """
  kernel_size: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, channels: int) -> tuple[jax.Array, jax.Array]:
    return _declare_depthwise(self, self.kernel_size, channels, self.param_dtype)


def _declare_depthwise(module: nn.Module, k: int, channels: int,
                       param_dtype: Dtype) -> tuple[jax.Array, jax.Array]:
  """Declares a depthwise conv's 'kernel' (k, k, 1, C) and 'bias' (C,) in `module`."""
  kernel = module.param('kernel', conv_kernel_init, (k, k, 1, channels), param_dtype)
  bias = module.param('bias', _conv_bias_init(k * k), (channels,), param_dtype)
  return kernel, bias


def depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                   kernel_forms: str) -> jax.Array:
  """Depthwise k x k conv, stride 1, symmetric zero padding k // 2, plus bias.

  Args:
    x: (b, h, w, C).
    kernel: (k, k, 1, C), k odd.
    bias: (C,).
    kernel_forms: the model's `kernels` field: XLA's grouped convolution, or
      `cpu_forms.shifted_depthwise_conv` on XLA CPU. TPUs take XLA's here; the block's `pos`
      conv runs inside the kernel of its first half (docs/kernels.md says why).
  """
  pad = kernel.shape[0] // 2

  def plain(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        dimension_numbers=_NHWC, feature_group_count=x.shape[-1])

  y = kernels_lib.select(kernel_forms, x, kernel, xla=plain,
                         cpu=lambda x, kernel: cpu_forms.shifted_depthwise_conv(
                             x, kernel[:, :, 0, :]))
  return y + bias


class DepthwiseConv(nn.Module):
  """Depthwise k x k conv, stride 1, symmetric zero padding k // 2, with bias.

  Parameters as `DepthwiseConvParams` declares them, applied by `depthwise_conv`.

  Attributes:
    kernel_size: k (odd).
    kernels: 'auto', 'xla', 'cpu' or 'tpu' (see `rmt_jax.kernels.selection`).
  """
  kernel_size: int
  kernels: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, bias = _declare_depthwise(self, self.kernel_size, x.shape[-1], self.param_dtype)
    return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype),
                          bias.astype(self.dtype), self.kernels)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in PyTorch's form, x/2 (1 + erf(x / sqrt 2)).

  `jax.nn.gelu(approximate=False)` goes through erfc, which XLA CPU expands into several
  passes over the array; erf is one polynomial. Same function to float32 rounding.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


def _reverse_pairs(x: jax.Array) -> jax.Array:
  """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...): a reversal of a size-2 axis."""
  return x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)


def theta_shift(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotary position shift on interleaved channel pairs: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s).

  The pairs are swapped by reversing a size-2 axis and the sign goes into the sin table (exact:
  the same products, negated), which XLA fuses into the transposes that read the result
  rather than writing a rotated copy (docs/kernels.md); the TPU kernels apply the shift
  themselves.

  Args:
    x: (..., d) with d even.
    sin: broadcastable to x.
    cos: broadcastable to x.
  """
  signed_sin = (sin.reshape(*sin.shape[:-1], -1, 2) * np.array([-1, 1], sin.dtype)
                ).reshape(sin.shape)
  return x * cos + _reverse_pairs(x) * signed_sin


def _decayed_attention(q: jax.Array, k: jax.Array, v: jax.Array, decay_bias: np.ndarray,
                       dtype: Dtype) -> jax.Array:
  """softmax(q k^T + decay) v over the last two axes, batched over the leading ones.

  The decay (log(gamma) * distance) is a log-space bias added to the logits. The softmax is
  taken in float32 and normalised after the product with v (dividing (.., i, d) rather than
  (.., i, j)): the same function, without materialising the bias broadcast to the logits' full
  shape.

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


def _axial_attention(q: jax.Array, k: jax.Array, v: jax.Array, rates: tuple[int, float, float],
                     dtype: Dtype) -> jax.Array:
  """Attention along each row (1-d decay), then along each column on the result: plain form.

  Args:
    q, k, v: (b, h, w, heads, d), q and k rotated, k scaled.
    rates: (num_heads, initial_value, heads_range) of `decay.axial_decay`.
    dtype: compute dtype.

  Returns:
    (b, h, w, heads, d) in `dtype`.
  """
  height, width = q.shape[1:3]
  # Heads and the untouched spatial axis go next to the batch axis before each contraction:
  # the einsums become plain batched matmuls rather than permuting internally.
  q_w, k_w, v_w = (t.transpose(0, 1, 3, 2, 4) for t in (q, k, v))  # (b, h, n, w, d)
  out = _decayed_attention(q_w, k_w, v_w, decay.axial_decay(width, *rates),
                           dtype)  # (b, h, n, w, d)

  q_h, k_h = (t.transpose(0, 2, 3, 1, 4) for t in (q, k))  # (b, w, n, h, d)
  v_h = out.transpose(0, 3, 2, 1, 4)  # (b, w, n, h, d)
  out = _decayed_attention(q_h, k_h, v_h, decay.axial_decay(height, *rates),
                           dtype)  # (b, w, n, h, d)
  return out.transpose(0, 3, 1, 2, 4)  # (b, h, w, n, d)


def _whole_attention(q: jax.Array, k: jax.Array, v: jax.Array, rates: tuple[int, float, float],
                     dtype: Dtype) -> jax.Array:
  """Attention over all positions with the 2-d Manhattan decay: plain form.

  Args and Returns as `_axial_attention`.
  """
  batch, height, width, heads, key_dim = q.shape
  length = height * width
  q_l, k_l, v_l = (t.reshape(batch, length, heads, key_dim).transpose(0, 2, 1, 3)
                   for t in (q, k, v))  # (b, n, l, d)
  out = _decayed_attention(q_l, k_l, v_l, decay.manhattan_decay(height, width, *rates),
                           dtype)  # (b, n, l, d)
  return out.transpose(0, 2, 1, 3).reshape(q.shape)


def _scaled_projections(x: jax.Array, norm: tuple[jax.Array, jax.Array] | None,
                        projections: Sequence[tuple[jax.Array, jax.Array]],
                        scales: Sequence[float], dtype: Dtype,
                        forms: str) -> tuple[jax.Array, ...]:
  """(LN(x) @ kernel_i + bias_i) * scales[i] for each projection, in the plain form (`forms`
  'xla' or 'cpu' for `project`); without the norm where `norm` is None."""
  if norm is not None:
    x = apply_layer_norm(x, *norm)
  kernels, biases = zip(*projections)
  out = project(x.astype(dtype), tuple(w.astype(dtype) for w in kernels),
                tuple(b.astype(dtype) for b in biases), forms)
  return tuple(t if s == 1.0 else t * s for t, s in zip(out, scales))


def _pos_residual(x: jax.Array, pos: tuple[jax.Array, jax.Array], dtype: Dtype,
                  forms: str) -> jax.Array:
  """x1 = x + pos(x), the block's 3 x 3 depthwise conv, in the plain form."""
  # Named as the block's own module, for `rmt_jax.analysis.tpu_traffic`'s accounting.
  with jax.named_scope('pos'):
    return x + depthwise_conv(x.astype(dtype), *(p.astype(dtype) for p in pos), forms)


def _lepe_residual(out: jax.Array, v: jax.Array, lepe: tuple[jax.Array, jax.Array], dtype: Dtype,
                   forms: str) -> jax.Array:
  """attention + LePE(v), LePE a 5 x 5 depthwise conv, in the plain form."""
  # Named as the official module, for `rmt_jax.analysis.tpu_traffic`'s accounting.
  with jax.named_scope('lepe'):
    kernel, bias = (p.astype(dtype) for p in lepe)
    return out.astype(dtype) + depthwise_conv(v.astype(dtype), kernel, bias, forms)


class ManhattanSelfAttention(nn.Module):
  """MaSA: softmax attention whose logits carry the Manhattan decay, with rotary q/k and LePE.

  `axial=True` is the decomposed form (the official `VisionRetentionChunk`, selected by its
  `chunkwise_recurrents` flag; there is no recurrence): attention along each row (W) with the
  1-d decay, then along each column (H) on the result, O(HW(H+W)). `axial=False` attends over
  all H*W positions with the 2-d Manhattan decay (the official `VisionRetentionAll`), O((HW)^2).

  Calling the module computes MaSA(x), as the official module does. `RetBlock` calls its steps
  apart (`first_half`, `attend`, `output_projection`), so that a block's pos conv, layer norm
  and projections, and its out_proj, residuals and FFN, can each run as one TPU kernel.

  Attributes:
    num_heads: heads; channels per head = dim // num_heads for q, k and v.
    initial_value: the stage's `init_values` (slowest decay exponent).
    heads_range: the stage's `heads_ranges` (spread of decay rates over heads).
    axial: decomposed (True) or whole-image (False) attention.
    kernels: 'auto', 'xla', 'cpu' or 'tpu' (see `rmt_jax.kernels.selection`).
    capture_attention: also compute the softmax weights and sow them into 'intermediates'
      (see `rmt_jax.models.attention_maps`); when False nothing of it is traced.
  """
  num_heads: int
  initial_value: float
  heads_range: float
  axial: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = 'auto'
  capture_attention: bool = False

  def setup(self):
    self.q_proj = LinearParams(self.param_dtype)
    self.k_proj = LinearParams(self.param_dtype)
    self.v_proj = LinearParams(self.param_dtype)
    self.lepe = DepthwiseConvParams(5, self.param_dtype)
    self.out_proj = LinearParams(self.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """MaSA(x): q, k, v projections of x, the decayed attention, LePE, out_proj.

    Args:
      x: (b, h, w, C).

    Returns:
      (b, h, w, C) in `dtype`.
    """
    dim = x.shape[-1]
    plain = lambda x, projections, forms='xla': _scaled_projections(
        x, None, projections, self._scales(dim), self.dtype, forms)
    q, k, v = kernels_lib.select(self.kernels, x, self._projections(dim), xla=plain,
                                 cpu=functools.partial(plain, forms='cpu'))
    kernel, bias = self.output_projection(dim)
    return jnp.dot(self.attend((q,), (k,), (v,)), kernel) + bias

  def first_half(self, x: jax.Array, pos: tuple[jax.Array, jax.Array],
                 norm: tuple[jax.Array, jax.Array]) -> tuple[Any, ...]:
    """The block's first half up to the attention: x1 = x + pos(x), then q, k, v of LN(x1).

    Args:
      x: (b, h, w, C), the block's input.
      pos: the (kernel (3, 3, 1, C), bias (C,)) of the block's `pos` conv.
      norm: the (scale, bias) of the block's `retention_layer_norm`.

    Returns:
      (x1, q_uses, k_uses, v_uses): each projection once per consumer (q and k for the row
      and the column pass where axial, v for the attention and LePE), the same array; a TPU
      kernel's backward sums their cotangents itself.
    """
    dim = x.shape[-1]
    scales, projections = self._scales(dim), self._projections(dim)
    uses = (2, 2, 2) if self.axial else (1, 1, 2)

    def plain(x, pos, norm, projections, forms='xla'):
      x1 = _pos_residual(x, pos, self.dtype, forms)
      outs = _scaled_projections(x1, norm, projections, scales, self.dtype, forms)
      return (x1, *((out,) * n for out, n in zip(outs, uses)))

    def tpu(x, pos, norm, projections):
      return tpu_operations.first_half(
          x, pos, norm, projections, scales, uses=uses, eps=_LAYER_NORM_EPS, dtype=self.dtype,
          plain_pos=lambda x, pos: _pos_residual(x, pos, self.dtype, 'xla'),
          plain_projections=lambda x, norm, projections: _scaled_projections(
              x, norm, projections, scales, self.dtype, 'xla'))

    return kernels_lib.select(self.kernels, x, pos, norm, projections, xla=plain,
                              cpu=functools.partial(plain, forms='cpu'), tpu=tpu)

  def attend(self, q_uses: Sequence[jax.Array], k_uses: Sequence[jax.Array],
             v_uses: Sequence[jax.Array]) -> jax.Array:
    """The decayed attention plus LePE(v), before out_proj.

    Args:
      q_uses, k_uses, v_uses: each projection's output (b, h, w, C), k scaled, once per use
        (the first feeds the attention, the last the column pass (q, k) and LePE (v)).

    Returns:
      (b, h, w, C) in `dtype`.
    """
    q, k, v = q_uses[0], k_uses[0], v_uses[0]
    batch, height, width, dim = q.shape
    heads, key_dim = self.num_heads, dim // self.num_heads
    rates = (self.num_heads, self.initial_value, self.heads_range)
    lepe = self.lepe(dim)

    def shifted(t):  # (b, h, w, heads, d) with the rotary shift
      # Constants on XLA CPU (see decay.rotary_constants), computed in the program elsewhere.
      tables = kernels_lib.select(
          self.kernels, xla=lambda: decay.rotary_tables(height, width, key_dim),
          cpu=lambda: tuple(map(jnp.asarray, decay.rotary_constants(height, width, key_dim))))
      sin, cos = (s.astype(self.dtype)[:, :, None, :] for s in tables)
      return theta_shift(t.reshape(batch, height, width, heads, key_dim), sin, cos)

    if self.capture_attention:
      # Apart from the attention itself, which may run as a kernel that never forms the weights.
      attention_maps.sow(self, shifted(q), shifted(k), self.axial, rates)

    def plain(q, k, v, *_):
      v = v.reshape(batch, height, width, heads, key_dim)
      attend = _axial_attention if self.axial else _whole_attention
      return attend(shifted(q), shifted(k), v, rates, self.dtype).reshape(q.shape)

    def tpu(q, k, v, column_q, column_k):
      # Heads stay on the lane axis with their channels; the kernels rotate q and k.
      tables = lambda: tuple(jnp.tile(t.astype(self.dtype), heads)
                             for t in decay.rotary_tables(height, width, key_dim))
      return tpu_operations.attention(q, k, v, column_q, column_k, heads=heads,
                                      axial=self.axial, log_gamma=decay.log_gamma(*rates),
                                      rotary=tables, plain=plain)

    out = kernels_lib.select(self.kernels, q, k, v, q_uses[-1], k_uses[-1], xla=plain,
                             cpu=plain, tpu=tpu)
    plain_lepe = lambda out, v, lepe, forms='xla': _lepe_residual(out, v, lepe, self.dtype,
                                                                  forms)
    return kernels_lib.select(
        self.kernels, out, v_uses[-1], lepe, xla=plain_lepe,
        cpu=functools.partial(plain_lepe, forms='cpu'),
        tpu=lambda out, v, lepe: tpu_operations.lepe_add(out, v.astype(self.dtype), lepe,
                                                         plain=plain_lepe))

  def output_projection(self, dim: int) -> tuple[jax.Array, jax.Array]:
    """out_proj's (kernel (C, C), bias (C,)) in the compute dtype."""
    return tuple(p.astype(self.dtype) for p in self.out_proj(dim, dim))

  def _projections(self, dim: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
    return tuple(p(dim, dim) for p in (self.q_proj, self.k_proj, self.v_proj))

  def _scales(self, dim: int) -> tuple[float, float, float]:
    return (1.0, (dim // self.num_heads) ** -0.5, 1.0)  # k is scaled after its projection


class FeedForward(nn.Module):
  """fc1 -> exact GELU -> (+ depthwise 3x3 conv of itself) -> fc2 (the official `FeedForwardNetwork`).

  With `kernels='tpu'` the whole FFN is one Pallas kernel, whose hidden activations never pass
  through HBM, where its weights fit VMEM (`rmt_jax.kernels.tpu.operations.feed_forward`).
  """
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  def setup(self):
    self.fc1 = LinearParams(self.param_dtype)
    self.dwconv = DepthwiseConvParams(3, self.param_dtype)
    self.fc2 = LinearParams(self.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """FFN(x) for x (b, h, w, C), in `dtype`."""
    return kernels_lib.select(self.kernels, x.astype(self.dtype), *self.weights(x.shape[-1]),
                              **feed_forward_forms())

  def weights(self, dim: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """(fc1, dwconv, fc2) as (kernel, bias) pairs in the compute dtype, for a caller that
    applies the FFN inside a larger function (`RetBlock`'s second half)."""
    cast = lambda params: tuple(p.astype(self.dtype) for p in params)
    hidden = self.hidden_dim
    return cast(self.fc1(dim, hidden)), cast(self.dwconv(hidden)), cast(self.fc2(hidden, dim))


def feed_forward(x: jax.Array, fc1: tuple[jax.Array, jax.Array],
                 dwconv: tuple[jax.Array, jax.Array], fc2: tuple[jax.Array, jax.Array],
                 conv_forms: str = 'xla') -> jax.Array:
  """`FeedForward`'s plain form: fc2(u + dwconv(u)), u = GELU(fc1(x)); (kernel, bias) pairs."""
  u = gelu(jnp.dot(x, fc1[0]) + fc1[1])
  u = u + depthwise_conv(u, *dwconv, conv_forms)
  return jnp.dot(u, fc2[0]) + fc2[1]


def feed_forward_forms() -> dict[str, Callable[..., jax.Array]]:
  """The FFN's forms for `kernels_lib.select` (xla, cpu, tpu), each (x, fc1, dwconv, fc2) -> y."""
  return dict(xla=feed_forward, cpu=functools.partial(feed_forward, conv_forms='cpu'),
              tpu=functools.partial(tpu_operations.feed_forward, plain=feed_forward))


def block_second_half(x1: jax.Array, o: jax.Array, out_proj: tuple[jax.Array, jax.Array],
                      norm: tuple[jax.Array, jax.Array], ffn: Any,
                      gammas: tuple[jax.Array, jax.Array] | None,
                      drop_scales: jax.Array | None, *,
                      ffn_form: Callable[..., jax.Array] = feed_forward) -> jax.Array:
  """`RetBlock`'s second half in plain form: x2 + s2 gamma2 FFN(LN(x2)), x2 = x1 + s1 gamma1
  out_proj(o) (`rmt_jax.kernels.tpu.block_tail.block_second_half` is its TPU form).

  Args:
    x1: (b, h, w, C), the residual stream after `pos`.
    o: MaSA's output before out_proj, in the compute dtype.
    out_proj, norm: (kernel, bias) and (scale, bias).
    ffn: (fc1, dwconv, fc2) in the compute dtype, applied by `ffn_form`.
    gammas: layerscale's (gamma_1, gamma_2) in the compute dtype, or None.
    drop_scales: drop path's per-image scales (2, b) float32 (0 or 1 / keep probability:
      `nn.Dropout`'s scaling of a kept input), or None.
  """
  dt = o.dtype

  def branch(y, i):
    if gammas is not None:
      y = y * gammas[i]
    if drop_scales is not None:  # in float32: 1 / keep probability is not a bfloat16 number
      y = (y.astype(jnp.float32) * drop_scales[i][:, None, None, None]).astype(dt)
    return y

  # Named as the official modules, for `rmt_jax.analysis.tpu_traffic`'s accounting.
  with jax.named_scope('out_proj'):
    x2 = x1 + branch(jnp.dot(o, out_proj[0].astype(dt)) + out_proj[1].astype(dt), 0)
  with jax.named_scope('final_layer_norm'):
    xn = apply_layer_norm(x2, *norm).astype(dt)
  with jax.named_scope('ffn'):
    y = ffn_form(xn, *ffn)
  return x2 + branch(y, 1)


class RetBlock(nn.Module):
  """x += DWConv3x3(x); x += DropPath(gamma_1 * MaSA(LN(x))); x += DropPath(gamma_2 * FFN(LN(x))).

  The first half (pos, the norm, the q/k/v projections) is MaSA's `first_half`; the second
  (from MaSA's out_proj on) is `block_second_half`, one function of MaSA's unprojected output,
  so that on TPUs each half runs as one kernel pair.

  Attributes:
    drop_path: stochastic depth rate of this block (drawn from the 'dropout' rng stream).
    layerscale: learn per-channel gammas (initialised to `layer_init_values`).
    capture_attention: sow the attention weights (see `ManhattanSelfAttention`).
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
  kernels: str = 'auto'
  capture_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)
    # The conv's and the norm's parameters are the block's (the official attribute paths).
    pos = DepthwiseConvParams(3, self.param_dtype, name='pos')(dim)
    norm = LayerNormParams(self.param_dtype, name='retention_layer_norm')(dim)
    masa = ManhattanSelfAttention(self.num_heads, self.initial_value, self.heads_range,
                                  self.axial, name='retention',
                                  capture_attention=self.capture_attention, **common)
    x, *uses = masa.first_half(x, pos, norm)
    o = masa.attend(*uses)
    out_proj = masa.output_projection(dim)
    # Parameter names and the dropout rng's use are those of the official block's
    # `x + drop_path(gamma * f(x))`.
    final_norm = LayerNormParams(self.param_dtype, name='final_layer_norm')(dim)
    ffn = FeedForward(int(self.mlp_ratio * dim), name='ffn', **common).weights(dim)
    gammas = ((self._gamma('gamma_1', dim), self._gamma('gamma_2', dim))
              if self.layerscale else None)
    drop_scales = None
    if train and self.drop_path > 0:
      ones = jnp.ones((x.shape[0], 1, 1, 1), jnp.float32)
      drop_scales = jnp.stack([drop(ones), drop(ones)]).reshape(2, -1)
    forms = {form: functools.partial(block_second_half, ffn_form=ffn_form)
             for form, ffn_form in feed_forward_forms().items()}
    forms['tpu'] = functools.partial(tpu_operations.second_half, eps=_LAYER_NORM_EPS,
                                     plain=forms['tpu'])
    with jax.named_scope('second_half'):
      return kernels_lib.select(self.kernels, x, o.astype(self.dtype), out_proj, final_norm,
                                ffn, gammas, drop_scales, **forms)

  def _gamma(self, name: str, dim: int) -> jax.Array:
    init = initializers.Constant(self.layer_init_values)
    return self.param(name, init, (dim,), self.param_dtype).astype(self.dtype)


class Stem(nn.Module):
  """The official `PatchEmbed`: four 3x3 convs (strides 2, 1, 2, 1) with BatchNorm and GELU, /4.

  Submodule names are the indices of the official `nn.Sequential` (`proj_0` ... `proj_10`).
  """
  embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    half = self.embed_dim // 2
    plan = [(half, 2), (half, 1), (self.embed_dim, 2), (self.embed_dim, 1)]
    for i, (features, stride) in enumerate(plan):
      x = conv3x3(features, x.shape[-1], stride, self.dtype, self.param_dtype, f'proj_{3 * i}',
                  self.kernels)(x)
      x = batch_norm(f'proj_{3 * i + 1}', self.param_dtype)(x, use_running_average=not train)
      if i < len(plan) - 1:
        x = gelu(x)
    return x


class PatchMerging(nn.Module):
  """3x3 stride-2 conv (padding 1) + BatchNorm between stages."""
  out_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = conv3x3(self.out_dim, x.shape[-1], 2, self.dtype, self.param_dtype, 'reduction',
                self.kernels)(x)
    return batch_norm('norm', self.param_dtype)(x, use_running_average=not train)
