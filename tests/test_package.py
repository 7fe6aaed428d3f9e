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


# The import graph (STYLE.md, "the shape of the repo"): what each folder of rmt_jax may import,
# read from the source of every module (imports inside functions count too).
_MAY_IMPORT = {
    'rmt_jax.kernels': ('rmt_jax.kernels',),
    'rmt_jax.models': ('rmt_jax.models', 'rmt_jax.kernels'),
    'rmt_jax.data': ('rmt_jax.data',),
    'rmt_jax.weights': ('rmt_jax.weights', 'rmt_jax.models'),
    'rmt_jax.analysis': ('rmt_jax.analysis', 'rmt_jax.models'),
    'rmt_jax.runtime': ('rmt_jax.runtime',),
    'rmt_jax.train': ('rmt_jax.train', 'rmt_jax.models', 'rmt_jax.kernels',
                      'rmt_jax.data', 'rmt_jax.weights'),
}
# What of `rmt_jax.kernels` the architecture calls: the form selection, the XLA CPU forms and
# the TPU forms' operations, never a Pallas kernel itself.
_MODELS_TAKE_FROM_KERNELS = ('rmt_jax.kernels.selection', 'rmt_jax.kernels.cpu_forms',
                             'rmt_jax.kernels.tpu.operations')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _import_graph() -> dict[str, set[str]]:
  """{module: the modules it imports}, for every module of rmt_jax (third-party ones included,
  by their full dotted name)."""
  import ast  # pylint: disable=g-import-not-at-top
  modules = {_module_name(p): p for p in (REPO / 'rmt_jax').rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        edges.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        assert node.level == 0, f'{name}: relative import'
        for alias in node.names:
          full = f'{node.module}.{alias.name}'
          edges.add(full if full in modules else node.module)
    graph[name] = edges
  return graph


def _ours(graph: dict[str, set[str]], name: str) -> set[str]:
  return {m for m in graph[name] if m in graph}


def test_every_folder_imports_only_what_it_may():
  graph = _import_graph()
  wrong = []
  for name in graph:
    folder = '.'.join(name.split('.')[:2])
    if folder in _MAY_IMPORT:
      allowed = _MAY_IMPORT[folder]
      wrong += [f'{name} -> {m}' for m in _ours(graph, name)
                if not any(m == a or m.startswith(a + '.') for a in allowed)]
  assert not wrong, wrong


def test_no_module_imports_a_command():
  # The commands (modules at the top of rmt_jax/) import anything and are imported by nothing.
  graph = _import_graph()
  commands = {n for n in graph if n.count('.') == 1 and (REPO / 'rmt_jax' / (
      n.split('.')[1] + '.py')).exists()}
  assert {'rmt_jax.convert', 'rmt_jax.predict', 'rmt_jax.train'} - commands == {'rmt_jax.train'}
  wrong = [f'{n} -> {m}' for n in graph for m in _ours(graph, n) & commands]
  assert not wrong, wrong


def test_the_import_graph_has_no_circle():
  graph = _import_graph()
  ours = {n: _ours(graph, n) for n in graph}
  state, circles = {}, []

  def visit(node, path):
    state[node] = 'open'
    for nxt in sorted(ours[node]):
      if state.get(nxt) == 'open':
        circles.append(path[path.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 'done'

  for node in sorted(ours):
    if node not in state:
      visit(node, [node])
  # A package's __init__ importing its own modules, which import siblings by
  # `from package import module`, is not a circle: those edges go to the modules themselves.
  assert not circles, circles


def test_the_architecture_imports_no_pallas_kernel():
  graph = _import_graph()
  for name in (n for n in graph if n.startswith('rmt_jax.models')):
    pallas = {m for m in graph[name] if m.startswith('jax.experimental.pallas')}
    assert not pallas, (name, pallas)
    kernels = {m for m in _ours(graph, name) if m.startswith('rmt_jax.kernels')}
    assert kernels <= set(_MODELS_TAKE_FROM_KERNELS), (name, kernels)
