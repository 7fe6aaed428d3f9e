"""README.md and docs/ say only what the tree holds: the README stays short enough to read, its
Python examples and those of docs/ compile and name `rmt_jax` objects that exist, the repository
paths the README mentions exist, and every `python -m` command of the README and docs/ names a
module that exists.

Nothing here runs an example or a command: the examples are compiled, their `rmt_jax` names
imported and looked up, and command modules found with `importlib.util.find_spec` (which imports
their parent package, not the module).
"""

import ast
import glob
import importlib
import importlib.util
import itertools
import pathlib
import re
import sys
import types

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
DOCS = sorted((REPO / 'docs').glob('*.md'))
MAX_README_LINES = 450

# First path segments that make a token a repository path (other paths in the README are a
# user's: `weights/rmt_s`, `workdir/demo`, `gs://...`); top-level files are matched by suffix.
_ROOTS = ('rmt_jax', 'configs', 'docs', 'tests', 'benchmarks', '.ci')
_TOP_LEVEL_FILE = re.compile(r'^[\w.-]+\.(py|md|txt|toml)$')
_FENCE = re.compile(r'^```(\w*)\n(.*?)^```', re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r'`([^`\n]+)`')
_LINK = re.compile(r'\]\(([^)\s]+)\)')
_MODULE_COMMAND = re.compile(r'python3? -m ((?:rmt_jax|benchmarks)(?:\.\w+)+)')
_RMT_JAX_NAME = re.compile(r'\brmt_jax(?:\.\w+)+')

if str(REPO) not in sys.path:  # `benchmarks` is found from the repository root.
  sys.path.append(str(REPO))


def fenced_blocks(text: str, language: str) -> list[tuple[int, str]]:
  """The fenced code blocks of `text` in `language`, as (line of the opening fence, source)."""
  return [(text.count('\n', 0, m.start()) + 1, m.group(2))
          for m in _FENCE.finditer(text) if m.group(1) == language]


def rmt_jax_names(source: str) -> list[str]:
  """The dotted `rmt_jax` names a Python source uses: what it imports from `rmt_jax`, and the
  attribute chains it reads off those imported names (`rmt_jax.load`, `nnx_bridge.to_nnx`).

  Args:
    source: Python source text.

  Returns:
    Fully qualified dotted names, e.g. 'rmt_jax.weights.nnx_bridge.to_nnx', without repeats.
  """
  tree = ast.parse(source)
  bound = {}  # A name the source binds -> the rmt_jax name it stands for.
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split('.')[0] == 'rmt_jax':
          names.append(alias.name)
          if alias.asname:
            bound[alias.asname] = alias.name
          else:
            bound['rmt_jax'] = 'rmt_jax'
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      if node.module.split('.')[0] == 'rmt_jax':
        for alias in node.names:
          names.append(f'{node.module}.{alias.name}')
          bound[alias.asname or alias.name] = f'{node.module}.{alias.name}'
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute):
      chain = []
      base = node
      while isinstance(base, ast.Attribute):
        chain.append(base.attr)
        base = base.value
      if isinstance(base, ast.Name) and base.id in bound:
        names.append('.'.join([bound[base.id], *reversed(chain)]))
  return list(dict.fromkeys(names))


def resolve(dotted: str) -> object:
  """What a dotted `rmt_jax` name stands for: modules imported, attributes looked up.

  A name that ends at a module not imported yet (a command such as `rmt_jax.bench`) is found
  but not imported: its spec stands for it.

  Raises:
    LookupError: a part of the name is neither an attribute nor a submodule.
  """
  parts = dotted.split('.')
  obj = importlib.import_module(parts[0])
  for i, part in enumerate(parts[1:], start=1):
    qualified = '.'.join(parts[:i + 1])
    if hasattr(obj, part):
      obj = getattr(obj, part)
    elif (isinstance(obj, types.ModuleType) and hasattr(obj, '__path__')
          and (spec := importlib.util.find_spec(qualified)) is not None):
      obj = spec if i == len(parts) - 1 else importlib.import_module(qualified)
    else:
      raise LookupError(f'{qualified}: no such attribute or module')
  return obj


def _expand_braces(token: str) -> list[str]:
  """`configs/rmt_{t,s}.py` -> ['configs/rmt_t.py', 'configs/rmt_s.py'] (shell brace lists)."""
  pieces = re.split(r'\{([^{}]*,[^{}]*)\}', token)
  options = [p.split(',') if i % 2 else [p] for i, p in enumerate(pieces)]
  return [''.join(choice) for choice in itertools.product(*options)]


def repository_paths(text: str) -> list[str]:
  """The repository paths a Markdown text mentions in inline code, code blocks and links.

  A token counts as a repository path when its first segment is one of the repository's folders
  (`_ROOTS`) or it is a top-level file name (`main.py`, `requirements.txt`); brace lists are
  expanded, `<placeholder>` segments and `#anchors` end the path.
  """
  spans = [m.group(2) for m in _FENCE.finditer(text)]
  prose = _FENCE.sub('', text)
  spans += _INLINE_CODE.findall(prose)
  spans += _LINK.findall(prose)
  paths = []
  for span in spans:
    for token in span.split():
      token = token.split('=')[-1].split('#')[0].strip('"\'(),;:[]')
      token = token.split('<')[0]
      if not token or '://' in token:
        continue
      first = token.split('/')[0]
      if first in _ROOTS and (token != first or token.endswith('/')) or (
          '/' not in token and _TOP_LEVEL_FILE.match(token)):
        paths.extend(_expand_braces(token))
  return list(dict.fromkeys(paths))


def path_exists(path: str) -> bool:
  """Whether `path` (relative to the repository; `*` a wildcard) names something in it."""
  if '*' in path:
    return bool(glob.glob(str(REPO / path)))
  return (REPO / path).exists()


def test_readme_is_short():
  lines = README.read_text().count('\n')
  assert lines <= MAX_README_LINES, (
      f'README.md has {lines} lines, more than {MAX_README_LINES}: move details to docs/')


@pytest.mark.parametrize('document', [README, *DOCS], ids=lambda p: p.name)
def test_python_examples_compile_and_name_existing_objects(document):
  text = document.read_text()
  problems = []
  for line, source in fenced_blocks(text, 'python'):
    where = f'{document.name}:{line}'
    try:
      compile(source, where, 'exec')
    except SyntaxError as e:
      problems.append(f'{where}: does not compile: {e}')
      continue
    for name in rmt_jax_names(source):
      try:
        resolve(name)
      except (ImportError, LookupError) as e:
        problems.append(f'{where}: {name} does not resolve: {e}')
  assert not problems, '\n'.join(problems)


def test_readme_prose_names_existing_objects():
  """The `rmt_jax.*` names in the README's inline code (`rmt_jax.models.RMT`, ...) exist."""
  prose = _FENCE.sub('', README.read_text())
  names = dict.fromkeys(name for span in _INLINE_CODE.findall(prose)
                        for name in _RMT_JAX_NAME.findall(span))
  problems = []
  for name in names:
    try:
      resolve(name)
    except (ImportError, LookupError) as e:
      problems.append(f'{name}: {e}')
  assert not problems, '\n'.join(problems)


def test_readme_paths_exist():
  paths = repository_paths(README.read_text())
  assert 'docs/kernels.md' in paths and 'configs/rmt_s.py' in paths, paths  # The scan works.
  missing = [p for p in paths if not path_exists(p)]
  assert not missing, f'README.md mentions paths that do not exist: {missing}'


def test_module_commands_exist():
  problems = []
  for document in [README, *DOCS]:
    for module in dict.fromkeys(_MODULE_COMMAND.findall(document.read_text())):
      if importlib.util.find_spec(module) is None:
        problems.append(f'{document.name}: python -m {module}: no such module')
  assert not problems, '\n'.join(problems)


def test_the_scanners_see_what_they_must():
  """The helpers find what the tests rely on them to find (a scanner that finds nothing would
  pass every test above)."""
  source = ('import rmt_jax\nfrom rmt_jax.weights import nnx_bridge as nb\n'
            'x = rmt_jax.models.RMT\ny = nb.to_nnx(m)\nz = other.rmt_jax.thing\n')
  assert sorted(rmt_jax_names(source)) == sorted([
      'rmt_jax', 'rmt_jax.weights.nnx_bridge', 'rmt_jax.models', 'rmt_jax.models.RMT',
      'rmt_jax.weights.nnx_bridge.to_nnx'])
  with pytest.raises(LookupError):
    resolve('rmt_jax.models.no_such_thing')
  text = ('See `configs/rmt_{t,s}.py`, [k](docs/kernels.md#x), `workdir/demo`, `main.py`.\n'
          '```bash\npython main.py --config=configs/demo.py --out=docs/x.png gs://b/docs/y\n```\n')
  assert sorted(repository_paths(text)) == sorted([
      'configs/demo.py', 'docs/x.png', 'main.py', 'configs/rmt_t.py', 'configs/rmt_s.py',
      'docs/kernels.md'])
  assert not path_exists('docs/x.png') and path_exists('rmt_jax/*.py')
