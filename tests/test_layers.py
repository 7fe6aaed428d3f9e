"""The fast forms in rmt_jax.models.layers against their plain definitions, values and gradients.

The network's parity with the official outputs is tested in test_model.py; these tests cover
what that cannot: the hand-written backward passes (the shifted depthwise conv, the dense 3x3
conv's kernel gradient, the joint q/k/v projection) and the deferred-normalisation attention under
differentiation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from rmt_jax.models import conv3x3, decay, layers


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
  got, got_vjp = jax.vjp(layers.shifted_depthwise_conv, x, kernel)
  want, want_vjp = jax.vjp(_grouped_conv, x, kernel)
  assert relative_error(got, want) < 1e-6
  for g, w in zip(got_vjp(cotangent), want_vjp(cotangent)):
    assert g.shape == w.shape
    assert relative_error(g, w) < 1e-6


def test_decayed_attention_and_its_gradients_equal_softmax_attention():
  rng = np.random.default_rng(0)
  heads, length, dim = 3, 10, 4
  q, k, v = (jnp.asarray(rng.normal(size=(2, heads, length, dim)) * 2, jnp.float32)
             for _ in range(3))
  bias = decay.axial_decay(length, heads, 2.0, 4.0)

  def plain(q, k, v):
    weights = jax.nn.softmax(jnp.einsum('bnid,bnjd->bnij', q, k) + bias, axis=-1)
    return jnp.einsum('bnij,bnjd->bnid', weights, v)

  def fast(q, k, v):
    return layers._decayed_attention(q, k, v, bias, jnp.float32)  # pylint: disable=protected-access

  assert relative_error(fast(q, k, v), plain(q, k, v)) < 1e-6
  loss = lambda f: lambda *a: jnp.sum(f(*a) * v)  # a cotangent that is not all ones
  for g, w in zip(jax.grad(loss(fast), (0, 1, 2))(q, k, v),
                  jax.grad(loss(plain), (0, 1, 2))(q, k, v)):
    assert relative_error(g, w) < 1e-5


def test_gelu_is_the_exact_gelu():
  x = jnp.linspace(-8.0, 8.0, 10001, dtype=jnp.float32)
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)


def test_project_and_its_gradients_equal_separate_linear_layers():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 6)), jnp.float32)
  kernels = tuple(jnp.asarray(rng.normal(size=(6, n)), jnp.float32) for n in (4, 6, 2))
  biases = tuple(jnp.asarray(rng.normal(size=(n,)), jnp.float32) for n in (4, 6, 2))
  cotangents = tuple(jnp.asarray(rng.normal(size=(2, 3, 5, n)), jnp.float32) for n in (4, 6, 2))

  def separate(x, kernels, biases):
    return tuple(jnp.einsum('bhwi,io->bhwo', x, w) + b for w, b in zip(kernels, biases))

  got, got_vjp = jax.vjp(layers.project, x, kernels, biases)
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
  got, got_vjp = jax.vjp(lambda x, w: conv3x3.conv3x3(x, w, stride), x, kernel)
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


def test_conv3x3_layer_declares_the_parameters_of_nn_conv():
  x = jnp.ones((1, 8, 8, 3))
  layer = layers.conv3x3(4, 3, 2, jnp.float32, jnp.float32, 'proj_0')
  plain = layer.clone(conv_general_dilated=None)
  params = layer.init(jax.random.key(0), x)
  plain_params = plain.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, plain_params)
  np.testing.assert_array_equal(layer.apply(params, x), plain.apply(params, x))


@pytest.mark.parametrize('kwargs', [dict(kernel=(5, 5)), dict(padding=((0, 0), (0, 0))),
                                    dict(window_strides=(1, 2)), dict(rhs_dilation=(2, 2)),
                                    dict(precision='highest')])
def test_conv3x3_refuses_convs_it_does_not_compute(kwargs):
  x = jnp.ones((1, 8, 8, 2))
  kwargs = dict(kwargs)  # pytest's parameter, not ours to change
  kernel = jnp.ones(kwargs.pop('kernel', (3, 3)) + (2, 2))
  args = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  args.update(kwargs)
  with pytest.raises(ValueError, match='3x3 NHWC/HWIO convs with padding 1'):
    conv3x3.conv_general_dilated(x, kernel, **args)


def test_theta_shift_is_the_official_rotation():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 4, 2, 8)).astype(np.float32)
  sin, cos = (t[:, :, None, :] for t in decay.rotary_tables(3, 4, 8))
  # The official `rotate_every_two`: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...).
  rotated = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
  want = x * cos + rotated * sin
  # Jitted, XLA may fuse each product and sum into one rounding: float32 agreement, not bits.
  assert relative_error(jax.jit(layers.theta_shift)(x, sin, cos), want) < 1e-6
