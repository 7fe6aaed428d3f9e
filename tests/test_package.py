"""The package as users install it: the model without the training stack, the package data,
and `pyproject.toml`'s promise that `pip install .` needs only jax, flax and numpy."""

import os
import pathlib
import subprocess
import sys
import textwrap
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs with the training and conversion stack made unimportable, as in an install without the
# [train] and [convert] extras (flax itself depends on optax and orbax, so pip alone cannot
# make them absent: a finder that refuses them stands in).
_MODEL_ONLY = textwrap.dedent('''
    import importlib.abc, sys
    # (absl stays: flax itself imports it.)
    BLOCKED = ('tensorflow', 'tensorflow_datasets', 'optax', 'orbax', 'torch', 'ml_collections',
               'sklearn', 'tensorboard')

    class Refuse(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
          raise ImportError(f'{name} is blocked: not part of the model-only install')
        return None

    sys.meta_path.insert(0, Refuse())
    import jax, jax.numpy as jnp
    jax.config.update('jax_default_prng_impl', 'rbg')
    import rmt_jax
    from rmt_jax.data import class_names
    model = rmt_jax.create_model('rmt_tiny', num_classes=3)
    x = jnp.ones((2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (2, 3), logits.shape

    def loss(params):
      return model.apply({**variables, 'params': params}, x).sum()

    grads = jax.jit(jax.grad(loss))(variables['params'])
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    assert class_names.imagenet_class_names()[0] == 'tench'
    loaded = [m for m in sys.modules if m.split('.')[0] in BLOCKED]
    assert not loaded, loaded
    print('model-only OK')
''')


def test_model_builds_runs_and_differentiates_without_the_training_stack():
  # ~3x faster XLA:CPU compiles; the test is of imports, not of speed.
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_backend_optimization_level=0')
  result = subprocess.run([sys.executable, '-c', _MODEL_ONLY], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'model-only OK' in result.stdout


def test_pyproject_keeps_the_training_stack_in_extras():
  project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
  base = {_name(r) for r in project['dependencies']}
  assert base == {'jax', 'flax', 'numpy'}
  extras = {k: {_name(r) for r in v} for k, v in project['optional-dependencies'].items()}
  assert {'optax', 'orbax-checkpoint', 'ml_collections', 'absl-py', 'tensorflow-cpu',
          'tensorflow-datasets', 'importlib_resources', 'tensorboard',
          'scikit-learn'} <= extras['train']
  assert extras['convert'] == {'torch'}
  assert extras['tpu-compile'] == {'libtpu'}


def test_imagenet_names_ship_as_package_data():
  package_data = tomllib.loads((REPO / 'pyproject.toml').read_text())['tool']['setuptools'][
      'package-data']['rmt_jax']
  assert 'imagenet2012_classes.tsv' in package_data
  from rmt_jax.data import class_names  # pylint: disable=g-import-not-at-top
  names, synsets = class_names.imagenet_class_names(), class_names.imagenet_synsets()
  assert len(names) == len(set(synsets)) == 1000
  assert (names[0], synsets[0]) == ('tench', 'n01440764')
  assert (names[1], names[999]) == ('goldfish', 'toilet tissue')
  assert synsets == sorted(synsets)  # Label order is the sorted WordNet ids.


def _name(requirement: str) -> str:
  for separator in ('[', '=', '<', '>', '~', '!', ';', ' '):
    requirement = requirement.split(separator)[0]
  return requirement.strip()
