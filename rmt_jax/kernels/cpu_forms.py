"""Forms of RMT's operations written for XLA's CPU backend (`kernels='cpu'`).

Each computes the same function as the plain form in `rmt_jax/models/layers.py` (tested against
it, values and gradients, in tests/test_kernels.py); they differ in how XLA CPU runs them:

- `shifted_depthwise_conv`: the depthwise k x k conv as a sum of k*k shifted slices with a
  written backward (XLA CPU runs a grouped convolution with one group per channel slowly).
- `project`: the q/k/v Linear layers with one backward product for the input gradient and one
  for all kernel gradients (XLA CPU transposes x for each kernel-gradient product).
- `conv3x3`: the stem's and patch merging's dense 3x3 conv with the kernel gradient as three
  matrix products, one per kernel row (XLA writes that gradient as a convolution whose window
  is the whole feature map, which XLA CPU runs slowly).

docs/kernels.md gives the measurements. cuDNN and the TPU compiler have native depthwise convs
and good convolution gradients, and fuse the separate projections; there the plain forms run
(`selection` chooses).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np



# Linear layers sharing an input.


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


# Depthwise convs.


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
  with the kernel flipped; the kernel gradient is one variadic reduction (`_depthwise_kernel_grad`).

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
  grad_kernel = _depthwise_kernel_grad(_pad_spatial(x, pad), grad, k)
  return grad_x.astype(x.dtype), grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


def _depthwise_kernel_grad(xp: jax.Array, grad: jax.Array, k: int) -> jax.Array:
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


# Dense 3x3 convs (stem, patch merging).

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                      dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """3x3 conv, zero padding 1 on every side (PyTorch's `padding=1`), NHWC / HWIO, no bias.

  Args:
    x: (batch, height, width, in_channels).
    kernel: (3, 3, in_channels, out_channels).
    stride: 1 or 2 (the same along both axes).

  Returns:
    (batch, ceil(height / stride), ceil(width / stride), out_channels).
  """
  return _conv(x, kernel, stride)


def _conv3x3_fwd(x, kernel, stride):
  return _conv(x, kernel, stride), (x, kernel)


def _conv3x3_bwd(stride, residuals, grad):
  x, kernel = residuals
  # The conv is linear in x: its transpose is the input gradient, without re-tracing the
  # forward product as `jax.vjp` would.
  (grad_x,) = jax.linear_transpose(lambda x: _conv(x, kernel, stride), x)(grad)
  return grad_x, _conv3x3_kernel_grad(x, grad, stride).astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _conv3x3_kernel_grad(x: jax.Array, grad: jax.Array, stride: int) -> jax.Array:
  """(3, 3, in, out): sum over (b, y, x) of xpad[b, s y + i, s x + j, :] (outer) grad[b, y, x, :].

  The three column taps j are concatenated along channels once (a (b, h + 2, w', 3 in) array);
  each kernel row i is then one matrix product contracting all b h' w' output positions,
  (3 in, b h' w') @ (b h' w', out). Measured alone at batch 16 (kernel gradient only, XLA's
  form vs this one, ms): 224x224x3->32 stride 2: 14.3 vs 9.5; 112x112x32->32: 112 vs 71;
  112x112x32->64 stride 2: 63 vs 27; 56x56x64->64: 105 vs 54; 56x56x64->128 stride 2: 33 vs
  20; 28x28x128->256 stride 2: 19 vs 13; 14x14x256->512 stride 2: 9.9 vs 8.0.
  """
  out_channels, in_channels = grad.shape[-1], x.shape[-1]
  height, width = grad.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  span_h, span_w = stride * (height - 1) + 1, stride * (width - 1) + 1
  columns = jnp.concatenate([padded[:, :, j:j + span_w:stride] for j in range(3)], axis=-1)
  grad = grad.reshape(-1, out_channels)
  rows = []
  for i in range(3):
    taps = columns[:, i:i + span_h:stride].reshape(-1, 3 * in_channels)
    rows.append(jax.lax.dot_general(taps, grad, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32))  # (3 in, out)
  return jnp.stack(rows).reshape(3, 3, in_channels, out_channels)
