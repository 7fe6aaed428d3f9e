"""The XLA CPU forms (rmt_jax.kernels.cpu_forms) against their definitions, values and gradients.

What the network's parity tests cannot see: the hand-written backward passes of the shifted
depthwise conv, the joint q/k/v projection and the dense 3x3 conv's kernel gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from rmt_jax.models import decay
from rmt_jax.kernels import cpu_forms


def _grouped_conv(x, kernel):
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :], (1, 1), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])


# Odd and even sizes, k = 3 and 5, maps narrower than the kernel's reach and wider ones.
@pytest.mark.parametrize('k,shape', [(3, (2, 7, 9, 5)), (5, (3, 6, 4, 8)), (3, (4, 48, 40, 3))])
def test_shifted_depthwise_conv_and_its_gradients_equal_grouped_conv(k, shape):
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, shape[-1])), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
  got, got_vjp = jax.vjp(cpu_forms.shifted_depthwise_conv, x, kernel)
  want, want_vjp = jax.vjp(_grouped_conv, x, kernel)
  assert relative_error(got, want) < 1e-6
  for g, w in zip(got_vjp(cotangent), want_vjp(cotangent)):
    assert g.shape == w.shape
    assert relative_error(g, w) < 1e-6


def test_project_and_its_gradients_equal_separate_linear_layers():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 6)), jnp.float32)
  kernels = tuple(jnp.asarray(rng.normal(size=(6, n)), jnp.float32) for n in (4, 6, 2))
  biases = tuple(jnp.asarray(rng.normal(size=(n,)), jnp.float32) for n in (4, 6, 2))
  cotangents = tuple(jnp.asarray(rng.normal(size=(2, 3, 5, n)), jnp.float32) for n in (4, 6, 2))

  def separate(x, kernels, biases):
    return tuple(jnp.einsum('bhwi,io->bhwo', x, w) + b for w, b in zip(kernels, biases))

  got, got_vjp = jax.vjp(cpu_forms.project, x, kernels, biases)
  want, want_vjp = jax.vjp(separate, x, kernels, biases)
  for g, w in zip(got, want):
    assert relative_error(g, w) < 1e-6
  got_grads = jax.tree.leaves(got_vjp(cotangents))
  want_grads = jax.tree.leaves(want_vjp(cotangents))
  assert len(got_grads) == len(want_grads) == 7
  for g, w in zip(got_grads, want_grads):
    assert g.shape == w.shape
    assert relative_error(g, w) < 1e-6


def _conv3x3_float64(x, kernel, stride):
  """The 3x3 conv (padding 1) by definition, in float64 NumPy: out[b, y, x] = sum of taps."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  height, width = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  return sum(padded[:, i:i + stride * (height - 1) + 1:stride,
                    j:j + stride * (width - 1) + 1:stride] @ kernel[i, j]
             for i in range(3) for j in range(3))


# Strides 1 and 2, odd and even maps, a 3-channel input like the stem's first conv.
@pytest.mark.parametrize('stride,shape,out', [(1, (2, 9, 10, 5), 7), (2, (3, 11, 8, 3), 4),
                                              (2, (2, 16, 16, 6), 8)])
def test_conv3x3_and_its_gradients_equal_the_definition(stride, shape, out):
  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, shape[-1], out)), jnp.float32)
  got, got_vjp = jax.vjp(lambda x, w: cpu_forms.conv3x3(x, w, stride), x, kernel)
  cotangent = jnp.asarray(rng.normal(size=got.shape), jnp.float32)
  assert relative_error(got, _conv3x3_float64(x, kernel, stride)) < 1e-6
  # The kernel gradient against its definition in float64, both against XLA's own gradients.
  grad_x, grad_kernel = got_vjp(cotangent)
  want_x, want_kernel = jax.vjp(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision='highest'), x, kernel)[1](cotangent)
  g64 = np.asarray(cotangent, np.float64)
  padded = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = got.shape[1:3]
  kernel64 = np.stack([np.stack([np.einsum(
      'bhwc,bhwo->co', padded[:, i:i + stride * (h - 1) + 1:stride,
                              j:j + stride * (w - 1) + 1:stride], g64)
      for j in range(3)]) for i in range(3)])
  assert grad_kernel.shape == kernel.shape and grad_kernel.dtype == kernel.dtype
  assert relative_error(grad_kernel, kernel64) < 1e-6
  assert relative_error(grad_kernel, want_kernel) < 1e-6
  assert relative_error(grad_x, want_x) < 1e-6


def test_rotary_constants_equal_the_tables_computed_in_the_program():
  for shape in ((3, 4, 8), (56, 56, 16), (14, 14, 32)):
    for constant, computed in zip(decay.rotary_constants(*shape),
                                  jax.jit(decay.rotary_tables, static_argnums=(0, 1, 2))(*shape)):
      assert constant.shape == computed.shape == shape and constant.dtype == np.float32
      # XLA's sin and cos against NumPy's on the same float32 phases: one float32 ulp at most.
      np.testing.assert_allclose(constant, computed, rtol=0, atol=2.4e-7)
