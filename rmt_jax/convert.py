"""Weights between the official PyTorch RMT (`state_dict` keys of qhfan/RMT) and Flax variables.

The mapping is a rename plus a transpose, derived from the Flax variable tree itself:

| Flax (collection / path)                 | official key                         | layout            |
| ---------------------------------------- | ------------------------------------ | ----------------- |
| params/.../layers_0/blocks_1/...         | layers.0.blocks.1....                | list index        |
| params/.../<Dense>/kernel (in, out)      | ....weight (out, in)                 | transpose         |
| params/.../<Conv>/kernel (kh, kw, in, out) | ....weight (out, in, kh, kw)       | transpose         |
| params/.../{pos,lepe,dwconv}/kernel      | ....{pos,lepe,dwconv}.conv.weight    | (C, 1, kh, kw)    |
| params/.../scale (LayerNorm, BatchNorm)  | ....weight                           |                   |
| batch_stats/.../mean, var                | ....running_mean, running_var        |                   |
| params/.../gamma_1 (C,)                  | ....gamma_1 (1, 1, 1, C)             | reshape           |

Buffers of the official model that are not Flax variables: `layers.N.Relpos.angle` and
`layers.N.Relpos.decay` (functions of the config, see `rmt_jax.models.decay`) and BatchNorm's
`num_batches_tracked`. Reading, they are checked (the decay tables encode the variant) and kept,
unchanged, in the extra collection `official_buffers`, which the model ignores; writing, they are
taken from there when present and regenerated otherwise (`num_batches_tracked` = 0), so that
official -> Flax -> official is bit-exact and a Flax-trained model still loads with `strict=True`.
"""

import re
from typing import Any, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax.models import RMT
from rmt_jax.models import decay

BUFFERS = 'official_buffers'
_DEPTHWISE = ('pos', 'lepe', 'dwconv')
_INDEXED = re.compile(r'^(.*)_(\d+)$')


class ConversionError(ValueError):
  """The checkpoint does not fit the model: the message lists the offending keys."""


def torch_key(collection: str, path: tuple[str, ...]) -> str:
  """The official state_dict key of one Flax leaf, e.g. ('params', (..., 'q_proj', 'kernel'))."""
  *modules, leaf = path
  parts = []
  for name in modules:
    match = _INDEXED.match(name)
    parts.extend([match.group(1), match.group(2)] if match else [name])
  if modules and modules[-1] in _DEPTHWISE:
    parts.append('conv')
  if collection == 'batch_stats':
    parts.append({'mean': 'running_mean', 'var': 'running_var'}[leaf])
  else:
    parts.append({'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf))
  return '.'.join(parts)


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 2:
    return value.T
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if leaf.startswith('gamma_'):
    return value.reshape(1, 1, 1, -1)
  return value


def _to_flax_layout(leaf: str, value: np.ndarray, ndim: int) -> np.ndarray:
  if leaf == 'kernel' and ndim == 2:
    return value.T
  if leaf == 'kernel' and ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf.startswith('gamma_'):
    return value.reshape(-1)
  return value


def abstract_variables(model: RMT) -> dict[str, Any]:
  """Shapes and dtypes of `model`'s params and batch_stats, without allocating them."""
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)


def official_buffers(model: RMT) -> dict[str, np.ndarray]:
  """The official model's non-parameter buffers, regenerated from the config."""
  buffers = {}
  for i, (dim, heads) in enumerate(zip(model.embed_dims, model.num_heads)):
    buffers[f'layers.{i}.Relpos.angle'] = decay.rotary_angles(dim // heads)
    buffers[f'layers.{i}.Relpos.decay'] = decay.log_gamma(heads, model.init_values[i],
                                                          model.heads_ranges[i])
  for path, _ in _leaves(abstract_variables(model)['batch_stats']):
    if path[-1] == 'mean':
      key = torch_key('batch_stats', path).rsplit('.', 1)[0] + '.num_batches_tracked'
      buffers[key] = np.zeros((), np.int64)
  return buffers


def torch_to_flax(state_dict: Mapping[str, Any], model: RMT) -> dict[str, Any]:
  """Official state_dict -> Flax variables for `model`, strictly.

  Args:
    state_dict: official keys -> numpy arrays or torch tensors (without a `module.` prefix).
    model: the RMT module the weights are for.

  Returns:
    {'params': ..., 'batch_stats': ..., 'official_buffers': {key: array}} of numpy arrays.

  Raises:
    ConversionError: keys missing or unexpected, shapes that do not match, or Relpos buffers
      that belong to another configuration.
  """
  arrays = {k: _as_numpy(v) for k, v in state_dict.items()}
  target = abstract_variables(model)
  variables: dict[str, Any] = {}
  missing, mis_shaped, used = [], [], set()
  for collection in ('params', 'batch_stats'):
    for path, spec in _leaves(target[collection]):
      key = torch_key(collection, path)
      if key not in arrays:
        missing.append(f'{key} {tuple(_to_torch_layout(path[-1], np.empty(spec.shape)).shape)}')
        continue
      used.add(key)
      value = _to_flax_layout(path[-1], arrays[key], len(spec.shape))
      if value.shape != spec.shape:
        mis_shaped.append(f'{key}: checkpoint {arrays[key].shape}, model expects '
                          f'{_to_torch_layout(path[-1], np.empty(spec.shape)).shape}')
        continue
      _set(variables, (collection, *path), value.astype(spec.dtype))
  expected_buffers = official_buffers(model)
  buffers, wrong_buffers = {}, []
  for key, want in expected_buffers.items():
    if key not in arrays:
      missing.append(f'{key} {want.shape}')
      continue
    used.add(key)
    got = arrays[key]
    if got.shape != want.shape or (want.dtype.kind == 'f' and
                                   not np.allclose(got, want, rtol=1e-5, atol=0)):
      wrong_buffers.append(f'{key}: checkpoint {got.ravel()[:4]}..., config gives '
                           f'{want.ravel()[:4]}...')
    buffers[key] = got
  unexpected = [f'{k} {arrays[k].shape}' for k in arrays if k not in used]
  problems = []
  for title, items in (('missing', missing), ('unexpected', unexpected),
                       ('mis-shaped', mis_shaped), ('decay/rotary buffers of another config',
                                                   wrong_buffers)):
    if items:
      shown = '; '.join(items[:5]) + (f'; ... ({len(items) - 5} more)' if len(items) > 5 else '')
      problems.append(f'{len(items)} {title}: {shown}')
  if problems:
    raise ConversionError('checkpoint does not fit the model: ' + ' | '.join(problems))
  variables[BUFFERS] = buffers
  return variables


def flax_to_torch(variables: Mapping[str, Any], model: RMT) -> dict[str, np.ndarray]:
  """Flax variables -> the official state_dict (numpy), buffers included.

  Args:
    variables: {'params', 'batch_stats'} and optionally 'official_buffers' (kept from a
      conversion); extra collections are ignored.
    model: the RMT module the variables belong to.

  Returns:
    Every key of the official `state_dict()`, in its layout; `torch.from_numpy` each value and
    `load_state_dict(..., strict=True)` into the official model.

  Raises:
    ConversionError: the variables do not match `model`'s variable tree.
  """
  target = abstract_variables(model)
  state_dict: dict[str, np.ndarray] = {}
  problems = []
  for collection in ('params', 'batch_stats'):
    have = dict(_leaves(variables.get(collection, {})))
    want = dict(_leaves(target[collection]))
    for path in sorted(set(have) - set(want)):
      problems.append(f"unexpected {collection}/{'/'.join(path)}")
    for path, spec in want.items():
      if path not in have:
        problems.append(f"missing {collection}/{'/'.join(path)} {spec.shape}")
        continue
      value = np.asarray(jax.device_get(have[path]))
      if value.shape != spec.shape:
        problems.append(f"mis-shaped {collection}/{'/'.join(path)}: {value.shape}, "
                        f'model expects {spec.shape}')
        continue
      state_dict[torch_key(collection, path)] = _to_torch_layout(path[-1], value)
  if problems:
    raise ConversionError(f'variables do not fit the model ({len(problems)} problems): '
                          + '; '.join(problems[:5]))
  kept = variables.get(BUFFERS, {})
  for key, value in official_buffers(model).items():
    state_dict[key] = np.asarray(kept.get(key, value))
  return state_dict


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; torch itself is not imported here
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _leaves(tree: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
  flat = traverse_util.flatten_dict(dict(tree)) if tree else {}
  return sorted(flat.items())


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value
