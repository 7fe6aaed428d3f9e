"""RMT from flax.nnx: the wrapped model computes what the Linen model computes (eval, training
mode with BatchNorm updates, gradients), and the variables go in and come back unchanged."""

from flax import nnx
from flax import traverse_util
import jax
import numpy as np
import pytest

import rmt_jax
from rmt_jax.weights import nnx_bridge


@pytest.fixture(scope='module')
def setup():
  # No drop path: training-mode outputs are then a function of the inputs alone.
  model = rmt_jax.create_model('rmt_tiny', num_classes=3, drop_path_rate=0.0)
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(5), images)
  return model, variables, images


def test_eval_output_and_round_trip(setup):
  model, variables, images = setup
  net = nnx_bridge.to_nnx(model, images[:1], variables=variables)
  got = nnx.jit(lambda n, x: n(x))(net, images)
  np.testing.assert_allclose(got, model.apply(variables, images), rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, nnx_bridge.from_nnx(net), dict(variables))


def test_training_mode_and_gradients_match_linen(setup):
  model, variables, images = setup
  net = nnx_bridge.to_nnx(model, images[:1], variables=variables)

  def nnx_loss(n, x):
    return n(x, train=True, mutable=['batch_stats']).sum()

  grads = nnx.jit(nnx.grad(nnx_loss))(net, images)

  def linen_loss(params, x):
    logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                  mutable=['batch_stats'])
    return logits.sum(), updates

  want_grads, updates = jax.jit(jax.grad(linen_loss, has_aux=True))(variables['params'], images)
  got_grads = traverse_util.unflatten_dict(
      {tuple(path): leaf.get_value() for path, leaf in grads.flat_state()})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got_grads, want_grads)
  # As NNX does for every state change inside a transform, the BatchNorm statistics of the
  # training-mode call inside nnx.grad are now the module's.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               nnx_bridge.from_nnx(net)['batch_stats'], updates['batch_stats'])


def test_variables_that_do_not_fit_are_refused(setup):
  model, variables, images = setup
  wrong = rmt_jax.create_model('rmt_tiny', num_classes=5)
  with pytest.raises(ValueError, match=r'params/head/bias: shape \(3,\), the model has shape '
                                       r'\(5,\)'):
    nnx_bridge.to_nnx(wrong, images[:1], variables=variables)
