"""The building blocks of RMT: depthwise convs, Manhattan self-attention (MaSA), FFN, block, stem,
patch merging.

All modules work on NHWC arrays. Parameter names follow the attribute paths of the official
PyTorch code (`q_proj`, `lepe`, `ffn/fc1`, `retention_layer_norm`, `gamma_1`, ...), so that
`rmt_jax.convert` is a rename plus a transpose. `dtype` is the compute dtype, `param_dtype` the
storage dtype; attention softmax and the norms always run in float32. Every operation here is in
its plain form; `kernels` ('auto', 'xla', 'cpu', 'tpu') selects the XLA CPU forms of
`cpu_forms.py` or the Pallas TPU forms of `tpu_forms.py` (attention), `tpu_projections.py`
(MaSA's layer norm and q/k/v projections), `tpu_block_tail.py` (a block's second half) and
`tpu_feed_forward.py` (FFN) where they exist (see `kernels.py`).
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax.models import attention_maps
from rmt_jax.kernels import cpu_forms
from rmt_jax.models import decay
from rmt_jax.models import initializers
from rmt_jax.kernels import selection as kernels_lib
from rmt_jax.kernels.tpu import block_head as tpu_block_head
from rmt_jax.kernels.tpu import block_tail as tpu_block_tail
from rmt_jax.kernels.tpu import feed_forward as tpu_feed_forward
from rmt_jax.kernels.tpu import attention as tpu_forms
from rmt_jax.kernels.tpu import lepe as tpu_lepe
from rmt_jax.kernels.tpu import projections as tpu_projections
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
  return layer_norm(None, scale.dtype).apply({'params': {'scale': scale, 'bias': bias}}, x)


def dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=dense_kernel_init,
                  bias_init=initializers.ZEROS, name=name)


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
    bias = self.param('bias', initializers.ZEROS, (self.features,), self.param_dtype)
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
      `cpu_forms.shifted_depthwise_conv` on XLA CPU. TPUs take XLA's here: a Pallas kernel of
      the conv alone (forward and backward, in the FFN kernel's bands) made XLA's estimate of
      an RMT-S block worse (stage 1: 2.62 -> 2.91 ms, stage 3: 0.72 -> 0.84 ms), the layout
      copies around it and the fusions it breaks costing more than the convolutions; `pos`
      runs inside the kernel of the block's first half instead (`tpu_block_head`, with the
      norm and the q/k/v projections that read its output).
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
  the same products, negated); the TPU kernels, which apply the shift themselves, swap pairs
  by rotating lanes (`tpu_forms._swap_pairs`). Stacking (-x1, x0) instead made XLA CPU write
  the rotated copy out once per block (it feeds two transposes); a reversal is fused into each
  of them. Measured in turns on a 2-core VM (jax 0.10.2, batch 16):
  RMT-T eval 5% and train 6% faster, RMT-S train 2% faster.

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
  # the einsums become plain batched matmuls (2.4x faster on XLA CPU than letting the
  # einsum permute internally).
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


def _tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, axial: bool,
                   rates: tuple[int, float, float], dtype: Dtype,
                   columns: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """`_axial_attention` or `_whole_attention` with `tpu_forms.decayed_attention`.

  The Pallas kernels take q, k, v in the layout the projections give, heads on the lane axis,
  and no pass transposes them: the row pass and the whole attention as (problems, tokens,
  heads * d), the column pass as the (b, h, w, heads * d) map itself (where its blocks fit
  VMEM; else transposed into rows, as the plain form does). The
  kernels apply the rotary shift to q and k themselves (from the tables of
  `decay.rotary_tables`, in `dtype`, per row or column), so rotated copies of q and k are
  never written to memory.

  Args:
    q, k, v: (b, h, w, heads * d), k scaled, neither rotated.
    heads: number of heads.
    axial: row then column attention (True) or whole-map attention (False).
    rates: (num_heads, initial_value, heads_range) of `decay.log_gamma`.
    dtype: compute dtype (of the rotary tables).
    columns: the column pass' q and k, if not q and k themselves: the same values from a
      producer that takes their cotangents apart (`tpu_block_head`'s uses).

  Returns:
    (b, h, w, heads * d) in v's dtype.
  """
  batch, height, width, channels = q.shape
  log_gamma = decay.log_gamma(*rates)
  # (h, w, heads * d): the same tables for every head.
  sin, cos = (jnp.tile(t.astype(dtype), heads)
              for t in decay.rotary_tables(height, width, channels // heads))
  if not axial:
    flat = [t.reshape(batch, height * width, channels) for t in (q, k, v)]
    tables = tuple(t.reshape(1, height * width, channels) for t in (sin, cos))
    return tpu_forms.decayed_attention(*flat, log_gamma, width=width, rotary=tables
                                       ).reshape(q.shape)
  # Row pass: problem b * h + y takes the tables of row y. Column pass: the map as it is, the
  # kernel attending along h in each column (column x takes the tables [:, x]).
  rows = [t.reshape(batch * height, width, channels) for t in (q, k, v)]
  out = tpu_forms.decayed_attention(*rows, log_gamma, rotary=(sin, cos)).reshape(q.shape)
  column_q, column_k = (q, k) if columns is None else columns
  if tpu_forms.columns_fit_vmem(q.shape, heads, q.dtype.itemsize):
    return tpu_forms.decayed_attention(column_q, column_k, out, log_gamma, rotary=(sin, cos))
  # Where the column layout's blocks do not fit VMEM (float32 maps of 28 columns with more
  # than 128 channels), the columns transposed into rows: problem b * w + x, column x's tables.
  transposed = [t.transpose(0, 2, 1, 3).reshape(batch * width, height, channels)
                for t in (column_q, column_k, out)]
  out = tpu_forms.decayed_attention(*transposed, log_gamma,
                                    rotary=tuple(t.transpose(1, 0, 2) for t in (sin, cos)))
  return out.reshape(batch, width, height, channels).transpose(0, 2, 1, 3)


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

  @nn.compact
  def __call__(self, x: jax.Array, norm: tuple[jax.Array, jax.Array] | None = None,
               project_output: bool = True,
               pos: tuple[jax.Array, jax.Array] | None = None) -> Any:
    """MaSA of x, or of LN(x) given the layer norm's parameters.

    Args:
      x: (b, h, w, C).
      norm: None, or (scale, bias) of a `layer_norm` applied to x first (the block's
        `retention_layer_norm`, declared by the block): under `kernels='tpu'` the norm and the
        q/k/v projections are one kernel (`tpu_projections`) where its weights fit VMEM.
      project_output: apply out_proj (True); or return the output before it with out_proj's
        (kernel, bias), for a caller that applies it inside a larger function (`RetBlock`).
      pos: None, or the (kernel (3, 3, 1, C), bias (C,)) of the block's `pos` conv (declared by
        the block), with a norm: MaSA then takes the stream before it, x1 = x + pos(x), as its
        input and returns x1 first. Under `kernels='tpu'` the conv, the norm and the q/k/v
        projections are one kernel (`tpu_block_head`) where it fits VMEM.

    Returns:
      (b, h, w, C) in `dtype`; or that before out_proj and out_proj's parameters; with `pos`,
      preceded by x1.
    """
    batch, height, width, dim = x.shape
    heads, key_dim = self.num_heads, dim // self.num_heads
    projections = tuple(LinearParams(dim, self.param_dtype, name=f'{name}_proj')(dim)
                        for name in 'qkv')
    scales = (1.0, key_dim ** -0.5, 1.0)  # k is scaled after its projection

    def plain_projections(x, norm, projections, forms='xla'):
      if norm is not None:
        x = apply_layer_norm(x, *norm)
      kernels, biases = zip(*projections)
      out = project(x.astype(self.dtype), tuple(w.astype(self.dtype) for w in kernels),
                    tuple(b.astype(self.dtype) for b in biases), forms)
      return tuple(t if s == 1.0 else t * s for t, s in zip(out, scales))

    def tpu_form(x, norm, projections):
      if norm is None or not tpu_projections.fits_vmem(
          x.shape, dim, len(projections), x.dtype.itemsize, jnp.dtype(self.dtype).itemsize):
        return plain_projections(x, norm, projections)
      return tpu_projections.normalized_projections(
          x, norm, projections, scales, eps=_LAYER_NORM_EPS, dtype=self.dtype)

    if pos is None:
      q, k, v = kernels_lib.select(
          self.kernels, x, norm, projections, xla=plain_projections,
          cpu=functools.partial(plain_projections, forms='cpu'), tpu=tpu_form)
      uses = (q,), (k,), (v,)
    else:
      if norm is None:
        raise ValueError('MaSA takes the pos conv together with the layer norm only')

      def plain_pos(x, pos, forms):
        # Named as the block's own module, for `rmt_jax.analysis.tpu_traffic`'s accounting.
        with jax.named_scope('pos'):
          return x + depthwise_conv(x.astype(self.dtype), *(p.astype(self.dtype) for p in pos),
                                    forms)

      # Each form gives x1 and q, k, v once per use: q and k for the row and the column pass
      # (axial), v for the attention and LePE; the TPU kernel's backward sums their cotangents
      # itself.
      counts = (2, 2, 2) if self.axial else (1, 1, 2)
      repeat = lambda outs: tuple((t,) * n for t, n in zip(outs, counts))

      def plain_first_half(x, pos, norm, projections, forms='xla'):
        x1 = plain_pos(x, pos, forms)
        return (x1, *repeat(plain_projections(x1, norm, projections, forms)))

      def tpu_first_half(x, pos, norm, projections):
        # The kernel taking every use's cotangent where that fits VMEM, else one of each (and
        # autodiff adds the others'), else `pos` plainly and the projections' kernel.
        for kernel_uses in (counts, (1,) * len(counts)):
          if tpu_block_head.fits_vmem(x.shape, len(projections), jnp.dtype(self.dtype).itemsize,
                                      x.dtype.itemsize, uses=kernel_uses):
            x1, *outs = tpu_block_head.block_first_half(
                x, pos, norm, projections, scales, eps=_LAYER_NORM_EPS, dtype=self.dtype,
                uses=kernel_uses)
            return (x1, *(out + out[-1:] * (n - len(out)) for out, n in zip(outs, counts)))
        x1 = plain_pos(x, pos, 'xla')
        return (x1, *repeat(tpu_form(x1, norm, projections)))

      x1, *uses = kernels_lib.select(
          self.kernels, x, pos, norm, projections, xla=plain_first_half,
          cpu=functools.partial(plain_first_half, forms='cpu'), tpu=tpu_first_half)
    # Each projection's first use is the attention's (the row pass'); the last, the column
    # pass' (q, k) and LePE's (v).
    q, k, v = (u[0] for u in uses)
    lepe = DepthwiseConvParams(5, self.param_dtype, name='lepe')(dim)

    rates = (self.num_heads, self.initial_value, self.heads_range)

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

    def plain(q, k, v):
      q, k = shifted(q), shifted(k)
      v = v.reshape(batch, height, width, heads, key_dim)
      attend = _axial_attention if self.axial else _whole_attention
      return attend(q, k, v, rates, self.dtype).reshape(batch, height, width, dim)

    def tpu(q, k, v, column_q, column_k):
      # Heads stay on the lane axis with their channels: (b, h, w, heads * d) throughout; the
      # kernels rotate q and k.
      return _tpu_attention(q, k, v, heads, self.axial, rates, self.dtype,
                            columns=(column_q, column_k))

    out = kernels_lib.select(self.kernels, q, k, v, uses[0][-1], uses[1][-1],
                             xla=lambda q, k, v, *_: plain(q, k, v),
                             cpu=lambda q, k, v, *_: plain(q, k, v), tpu=tpu)

    def plain_lepe(out, v, lepe, forms='xla'):
      # Named as the official module, for `rmt_jax.analysis.tpu_traffic`'s accounting.
      with jax.named_scope('lepe'):
        kernel, bias = (p.astype(self.dtype) for p in lepe)
        return out.astype(self.dtype) + depthwise_conv(v.astype(self.dtype), kernel, bias, forms)

    def tpu_lepe_form(out, v, lepe):
      if not tpu_lepe.fits_vmem(v.shape, jnp.dtype(self.dtype).itemsize):
        return plain_lepe(out, v, lepe)
      return tpu_lepe.lepe_add(out.astype(self.dtype), v.astype(self.dtype), *lepe)

    # o = attention + LePE(v); on TPUs one kernel (`tpu_lepe`).
    out = kernels_lib.select(self.kernels, out, uses[2][-1], lepe, xla=plain_lepe,
                             cpu=functools.partial(plain_lepe, forms='cpu'), tpu=tpu_lepe_form)
    if project_output:
      results = (dense(dim, self.dtype, self.param_dtype, 'out_proj')(out),)
    else:  # for a caller that applies out_proj itself (`RetBlock`)
      results = (out, LinearParams(dim, self.param_dtype, name='out_proj')(dim))
    if pos is not None:
      results = (x1, *results)
    return results[0] if len(results) == 1 else results


class FeedForward(nn.Module):
  """fc1 -> exact GELU -> (+ depthwise 3x3 conv of itself) -> fc2 (the official `FeedForwardNetwork`).

  With `kernels='tpu'` the whole FFN is one Pallas kernel (`tpu_feed_forward.feed_forward`),
  whose hidden activations never pass through HBM, where its weights fit VMEM
  (`tpu_feed_forward.fits_vmem`); elsewhere the plain form.
  """
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, weights_only: bool = False) -> Any:
    """FFN(x); or, with `weights_only`, its parameters in the compute dtype (fc1, dwconv, fc2),
    for a caller that applies it inside a larger function (`RetBlock`'s second half)."""
    dim, hidden = x.shape[-1], self.hidden_dim
    cast = lambda params: tuple(p.astype(self.dtype) for p in params)
    fc1 = cast(LinearParams(hidden, self.param_dtype, name='fc1')(dim))
    dwconv = cast(DepthwiseConvParams(3, self.param_dtype, name='dwconv')(hidden))
    fc2 = cast(LinearParams(dim, self.param_dtype, name='fc2')(hidden))
    if weights_only:
      return fc1, dwconv, fc2
    forms = feed_forward_forms(x.shape, hidden, self.dtype)
    return kernels_lib.select(self.kernels, x.astype(self.dtype), fc1, dwconv, fc2, **forms)


def feed_forward(x: jax.Array, fc1: tuple[jax.Array, jax.Array],
                 dwconv: tuple[jax.Array, jax.Array], fc2: tuple[jax.Array, jax.Array],
                 conv_forms: str = 'xla') -> jax.Array:
  """`FeedForward`'s plain form: fc2(u + dwconv(u)), u = GELU(fc1(x)); (kernel, bias) pairs."""
  u = gelu(jnp.dot(x, fc1[0]) + fc1[1])
  u = u + depthwise_conv(u, *dwconv, conv_forms)
  return jnp.dot(u, fc2[0]) + fc2[1]


def feed_forward_forms(x_shape: Sequence[int], hidden: int,
                       dtype: Dtype) -> dict[str, Callable[..., jax.Array]]:
  """The FFN's forms for `kernels_lib.select` (xla, cpu, tpu), each (x, fc1, dwconv, fc2) -> y.

  The TPU kernel keeps the weights in VMEM: where they leave too little of it (the last stage
  of RMT-S, -B and -L, the third of RMT-B and -L), the TPU runs the plain form.
  """
  fits = tpu_feed_forward.fits_vmem(x_shape, hidden, jnp.dtype(dtype).itemsize)
  return dict(xla=feed_forward, cpu=functools.partial(feed_forward, conv_forms='cpu'),
              tpu=tpu_feed_forward.feed_forward if fits else feed_forward)


def block_second_half(x1: jax.Array, o: jax.Array, out_proj: tuple[jax.Array, jax.Array],
                      norm: tuple[jax.Array, jax.Array], ffn: Any,
                      gammas: tuple[jax.Array, jax.Array] | None,
                      drop_scales: jax.Array | None, *,
                      ffn_form: Callable[..., jax.Array] = feed_forward) -> jax.Array:
  """`RetBlock`'s second half in plain form: x2 + s2 gamma2 FFN(LN(x2)), x2 = x1 + s1 gamma1
  out_proj(o) (`tpu_block_tail.block_second_half` is its TPU form).

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

  The second half (from MaSA's out_proj on) is `block_second_half`, one function of MaSA's
  unprojected output, which the TPU runs as one kernel pair (`tpu_block_tail`).

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
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  kernels=self.kernels)
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), deterministic=not train)
    # x1 = x + pos(x); the conv's and the norm's parameters are the block's, MaSA applies them
    # (on TPUs in one kernel with its projections, `tpu_block_head`).
    pos = DepthwiseConvParams(3, self.param_dtype, name='pos')(dim)
    norm = LayerNormParams(self.param_dtype, name='retention_layer_norm')(dim)
    masa = ManhattanSelfAttention(self.num_heads, self.initial_value, self.heads_range,
                                  self.axial, name='retention',
                                  capture_attention=self.capture_attention, **common)
    hidden = int(self.mlp_ratio * dim)
    # The second half is one function of MaSA's unprojected output, the parameters and drop
    # path's per-image scales, so that the TPU runs it as one kernel pair
    # (`tpu_block_tail`). Parameter names and the dropout rng's use are those of the official
    # block's `x + drop_path(gamma * f(x))`.
    x, o, out_proj = masa(x, norm, project_output=False, pos=pos)
    final_norm = LayerNormParams(self.param_dtype, name='final_layer_norm')(dim)
    ffn = FeedForward(hidden, name='ffn', **common)(x, weights_only=True)
    gammas = ((self._gamma('gamma_1', dim), self._gamma('gamma_2', dim))
              if self.layerscale else None)
    drop_scales = None
    if train and self.drop_path > 0:
      ones = jnp.ones((x.shape[0], 1, 1, 1), jnp.float32)
      drop_scales = jnp.stack([drop(ones), drop(ones)]).reshape(2, -1)
    ffn_forms = feed_forward_forms(x.shape, hidden, self.dtype)
    forms = {form: functools.partial(block_second_half, ffn_form=ffn_forms[form])
             for form in ('xla', 'cpu', 'tpu')}
    if tpu_block_tail.fits_vmem(x.shape, hidden, jnp.dtype(self.dtype).itemsize,
                                x.dtype.itemsize):
      forms['tpu'] = tpu_block_tail.block_second_half
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
