"""The fast forms in rmt_jax.models.layers against their plain definitions, values and gradients.

The network's parity with the official outputs is tested in test_model.py; these tests cover
what that cannot: the hand-written backward passes (the shifted depthwise conv, the joint q/k/v
projection) and the deferred-normalisation attention under differentiation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from rmt_jax.models import decay, layers


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
