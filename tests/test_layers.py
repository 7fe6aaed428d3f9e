"""Pieces of rmt_jax.models.layers against their definitions: the deferred-normalisation
attention under differentiation, GELU, the conv3x3 layer's declaration and refusals, the rotary
shift. The network's parity with the official outputs is tested in test_model.py, the XLA CPU
forms in test_cpu_forms.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from rmt_jax.models import decay, layers


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
    layers.conv3x3_general_dilated(x, kernel, **args)


def test_theta_shift_is_the_official_rotation():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 4, 2, 8)).astype(np.float32)
  sin, cos = (t[:, :, None, :] for t in decay.rotary_tables(3, 4, 8))
  # The official `rotate_every_two`: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...).
  rotated = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
  want = x * cos + rotated * sin
  # Jitted, XLA may fuse each product and sum into one rounding: float32 agreement, not bits.
  assert relative_error(jax.jit(layers.theta_shift)(x, sin, cos), want) < 1e-6
