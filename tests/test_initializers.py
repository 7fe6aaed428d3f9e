"""`init` in one draw (`rmt_jax.models.initializers`) and the compiled first `apply`
(`rmt_jax.models.network`): the initialisers' distributions, every variable of the networks
declared, the same values eagerly and under `jax.jit`, and user modules still served."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmt_jax
from rmt_jax.models import initializers, network

_KEY = jax.random.PRNGKey(0)


def _flax_init(module):
  """flax's own `init` of a `Network` (what `Network.init` wraps)."""
  return functools.partial(nn.Module.init, module)


@pytest.mark.parametrize('build', [
    lambda: rmt_jax.create_model('rmt_tiny', num_classes=5),
    lambda: rmt_jax.create_model('rmt_tiny', token_label=True, layerscales=(True,) * 4),
    lambda: rmt_jax.create_backbone('rmt_tiny'),
    lambda: rmt_jax.create_model('rmt_s'),
], ids=['rmt_tiny', 'token_label_layerscale', 'backbone', 'rmt_s'])
def test_every_variable_of_the_networks_is_declared(build):
  # What keeps `init` to one generator program: no variable left to flax's initialisers.
  model = build()
  assert initializers.undeclared_variables(_flax_init(model), _KEY,
                                           jnp.zeros((1, 64, 64, 3))) == []


def test_rmt_s_parameters_follow_the_official_distributions():
  model = rmt_jax.create_model('rmt_s')
  variables = model.init(_KEY, jnp.zeros((1, 64, 64, 3)))
  kinds = {'dense': [], 'conv': [], 'bias': [], 'zeros': [], 'ones': []}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params']):
    name, leaf = jax.tree_util.keystr(path), np.asarray(leaf, np.float64)
    if name.endswith("['kernel']") and leaf.ndim == 2:
      kinds['dense'].append(leaf.ravel())
    elif name.endswith("['kernel']"):
      # PyTorch's default conv init: U(-b, b), b = 1/sqrt(fan_in); scaled to U(-1, 1).
      kinds['conv'].append(leaf.ravel() * np.sqrt(np.prod(leaf.shape[:-1])))
    elif np.all(leaf == 0):
      kinds['zeros'].append(leaf.ravel())
    elif np.all(leaf == 1):
      kinds['ones'].append(leaf.ravel())
    else:  # conv biases: U(-b, b) with the conv's b; only their range is known here
      kinds['bias'].append(leaf.ravel())
  dense, conv = np.concatenate(kinds['dense']), np.concatenate(kinds['conv'])
  # trunc_normal(std 0.02) cut at 2 std: std 0.02 * 0.87962566, within (-0.04, 0.04).
  assert dense.size > 20_000_000 and np.abs(dense).max() < 0.04
  assert abs(dense.std() / (0.02 * 0.87962566) - 1) < 1e-3 and abs(dense.mean()) < 1e-5
  assert conv.size > 1_000_000 and np.abs(conv).max() <= 1.0 + 1e-6  # float32 rounding
  assert abs(conv.std() * np.sqrt(3) - 1) < 3e-3 and abs(conv.mean()) < 3e-3
  assert kinds['bias'] and max(np.abs(b).max() for b in kinds['bias']) < 1.0
  assert kinds['zeros'] and kinds['ones']
  # Distinct tensors draw distinct numbers (no slice of the draw handed out twice).
  firsts = [leaf[:8] for leaf in kinds['dense'] + kinds['conv']]
  assert len({f.tobytes() for f in firsts}) == len(firsts)


def test_eager_and_jitted_init_give_the_same_variables():
  model = _micro()
  images = jnp.zeros((2, 32, 32, 3))
  eager = model.init(_KEY, images)
  jitted = jax.jit(model.init)(_KEY, images)
  shapes = model.init(_KEY, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  for a, b, c in zip(*map(jax.tree.leaves, (eager, jitted, shapes))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(a, c)
  other = model.init(jax.random.PRNGKey(1), images)
  assert not np.allclose(eager['params']['head']['kernel'], other['params']['head']['kernel'])


class _WithUserLayer(network.Network):
  """A network of a user's: RMT's stem, then a flax Dense with flax's own initialiser."""

  @nn.compact
  def __call__(self, x):
    x = rmt_jax.models.layers.Stem(8)(x)
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_a_user_layer_with_flax_initialisers_is_initialised_as_flax_does():
  model, images = _WithUserLayer(), jnp.zeros((1, 32, 32, 3))
  assert initializers.undeclared_variables(_flax_init(model), _KEY, images) == [
      "['params']['Dense_0']['bias']", "['params']['Dense_0']['kernel']"]
  got, want = model.init(_KEY, images), _flax_init(model)(_KEY, images)
  np.testing.assert_array_equal(got['params']['Dense_0']['kernel'],
                                want['params']['Dense_0']['kernel'])
  assert float(jnp.abs(got['params']['Stem_0']['proj_0']['kernel']).max()) > 0


def test_remat_stages_initialise_the_same_parameters():
  images = jnp.zeros((1, 32, 32, 3))
  plain = rmt_jax.create_model('rmt_tiny').init(_KEY, images)
  remat = rmt_jax.create_model('rmt_tiny', remat=(True,) * 4).init(_KEY, images)
  jax.tree.map(np.testing.assert_array_equal, plain, remat)


def _micro(**kw):
  """Two stages, one axial and one whole, of 8 and 16 channels: cheap to compile."""
  return rmt_jax.create_model(
      'rmt_tiny', num_classes=3, embed_dims=(8, 16), depths=(1, 1), num_heads=(2, 2),
      init_values=(2, 2), heads_ranges=(4, 4), mlp_ratios=(2, 2), axial=(True, False),
      layerscales=(False, True), projection=16, remat=(False, False), **kw)


def test_eager_apply_is_the_compiled_flax_apply():
  model = _micro(drop_path_rate=0.5)
  images = jax.random.normal(_KEY, (2, 32, 32, 3))
  variables = model.init(_KEY, images)
  # The same program as jax.jit of flax's own apply: the same numbers, bit for bit.
  plain = jax.jit(functools.partial(nn.Module.apply, model),
                  static_argnames=('method', 'mutable', 'train'))
  np.testing.assert_array_equal(model.apply(variables, images), plain(variables, images))
  rngs = {'dropout': jax.random.PRNGKey(3)}
  got = model.apply(variables, images, train=True, mutable=('batch_stats',), rngs=rngs)
  want = plain(variables, images, train=True, mutable=('batch_stats',), rngs=rngs)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # Other methods take the same path (features: a dict of the stages' maps).
  assert set(model.apply(variables, images, method=model.features)) == {
      'stem', 'stage0', 'stage1'}
  # Inside a trace (here jax.jit of jax.grad) flax's own apply runs; gradients flow as before.
  grads = jax.jit(jax.grad(lambda p: model.apply({**variables, 'params': p}, images).sum()))(
      variables['params'])
  assert float(jnp.abs(grads['head']['kernel']).max()) > 0
