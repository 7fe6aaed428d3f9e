"""Weights between the official PyTorch RMT (`state_dict` keys of qhfan/RMT) and Flax variables:
the mapping, and the `.pth` files that hold it.

    state_dict, source = pytorch.read_torch_checkpoint('RMT-S.pth')
    variables = pytorch.torch_to_flax(state_dict, rmt_jax.create_model('rmt_s'))
    pytorch.write_torch_checkpoint('rmt_s.pth', pytorch.flax_to_torch(variables, model))

`python -m rmt_jax.convert` is the command line over this module (and `pytorch_backbone`, which
takes the detection / segmentation backbone's keys out of mmdetection / mmsegmentation files).

The mapping is a rename plus a transpose, derived from the Flax variable tree itself, so that
it serves the classifier (`RMT`) and the backbone (`RMTBackbone`, whose variables carry the
official names too) alike:

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

`.pth` files: `read_torch_checkpoint` takes a bare state_dict or a training checkpoint (`model` /
`state_dict`, or the EMA weights `model_ema` / `state_dict_ema`; a DDP `module.` prefix is
removed; optimizer, args, epoch ... are ignored) with `torch.load(weights_only=True)`, unpickling
fully only when asked to; `write_torch_checkpoint` writes `{entry: state_dict}` atomically. Both
take local paths or object-store URLs (gs://...). torch is imported only by these two: the
mapping, and `import rmt_jax.weights.pytorch`, run without it.
"""

import argparse
import functools
import io
import os
import re
from typing import Any, Mapping
import warnings
import zipfile

from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax.models import RMT, RMTBackbone, VARIANTS
from rmt_jax.models import decay
from rmt_jax.weights import checkpoint

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


def abstract_variables(model: RMT | RMTBackbone) -> dict[str, Any]:
  """Shapes and dtypes of `model`'s params and batch_stats, without allocating them."""
  return jax.tree.map(lambda x: x, _traced_variables(model))  # a copy of the cached tree


@functools.lru_cache(maxsize=8)
def _traced_variables(model: RMT | RMTBackbone) -> dict[str, Any]:
  # Tracing the full-size variants takes seconds; every conversion needs the tree two or three
  # times (flax modules are hashable dataclasses, so the module itself is the cache key).
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)


def official_buffers(model: RMT | RMTBackbone) -> dict[str, np.ndarray]:
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


def torch_to_flax(state_dict: Mapping[str, Any], model: RMT | RMTBackbone) -> dict[str, Any]:
  """Official state_dict -> Flax variables for `model`, strictly.

  Args:
    state_dict: official keys -> numpy arrays or torch tensors (without a `module.` prefix).
    model: the network the weights are for (the classifier or the backbone).

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
      wrong_buffers.append(f'{key}: checkpoint {_head(got)}, config gives {_head(want)}')
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


def flax_to_torch(variables: Mapping[str, Any], model: RMT | RMTBackbone
                  ) -> dict[str, np.ndarray]:
  """Flax variables -> the official state_dict (numpy), buffers included.

  Args:
    variables: {'params', 'batch_stats'} and optionally 'official_buffers' (kept from a
      conversion); extra collections are ignored.
    model: the network the variables belong to (the classifier or the backbone).

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


def _head(values: np.ndarray) -> str:
  """'(4,) [-0.2877, -0.1335, ...]': a buffer's shape and first values, for messages."""
  shown = ', '.join(f'{x:.4g}' for x in values.ravel()[:3])
  return f"{values.shape} [{shown}{', ...' if values.size > 3 else ''}]"


def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; torch itself is not imported here
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':  # NumPy has no bfloat16; float32 holds it exactly
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _leaves(tree: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
  flat = traverse_util.flatten_dict(dict(tree)) if tree else {}
  return sorted(flat.items())


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def infer_overrides(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """`num_classes` (rows of head.weight, 0 without a head) and `token_label` (aux_head.* keys)."""
  head = state_dict.get('head.weight')
  return {'num_classes': int(head.shape[0]) if head is not None else 0,
          'token_label': any(k.startswith('aux_head.') for k in state_dict)}


def guess_variants(state_dict: Mapping[str, Any]) -> list[str]:
  """The variants whose widths, depths, MLP ratios and layer scales match the state_dict's."""
  stages: dict[int, set[int]] = {}
  for key in state_dict:
    match = re.match(r'layers\.(\d+)\.blocks\.(\d+)\.', key)
    if match:
      stages.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
  try:
    seen = dict(
        depths=tuple(len(stages[i]) for i in range(len(stages))),
        embed_dims=tuple(state_dict[f'layers.{i}.blocks.0.retention.q_proj.weight'].shape[0]
                         for i in range(len(stages))),
        layerscales=tuple(f'layers.{i}.blocks.0.gamma_1' in state_dict
                          for i in range(len(stages))))
    seen['mlp_ratios'] = tuple(
        state_dict[f'layers.{i}.blocks.0.ffn.fc1.weight'].shape[0] / dim
        for i, dim in enumerate(seen['embed_dims']))
  except KeyError:
    return []
  return [name for name, kw in VARIANTS.items()
          if all(tuple(kw[k]) == tuple(v) for k, v in seen.items())]


# --- .pth files -----------------------------------------------------------------------------

# Entries of a training checkpoint (DeiT-style `main.py` of the official code, timm, plain loops)
# that hold the network's weights, in order of preference; everything else (optimizer, args,
# epoch, lr_scheduler, scaler, max_accuracy, ...) is ignored.
WEIGHT_ENTRIES = ('model', 'state_dict')
EMA_ENTRIES = ('model_ema', 'state_dict_ema')
_DDP_PREFIX = 'module.'
_INSTALL_TORCH = ('pip install torch==2.13.0 (the CPU wheel this project is tested with) or '
                  'pip install -r requirements-test.txt')


class CheckpointFileError(ValueError):
  """The file is not a readable PyTorch checkpoint, or holds no weights of the kind asked for."""


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointFileError(f'reading and writing .pth files needs PyTorch, which is not '
                              f'installed: {_INSTALL_TORCH}') from None
  return torch


def _torch_load(path: epath.Path, allow_pickle: bool) -> tuple[Any, bool]:
  """torch.load, restricted unpickler first; returns (object, whether full unpickling ran)."""
  torch = _import_torch()
  try:
    # argparse.Namespace (the `args` entry of the official training checkpoints) holds only
    # data: allowing it keeps those files on the restricted unpickler.
    with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]), \
        path.open('rb') as f:
      warnings.simplefilter('ignore')
      return torch.load(f, map_location='cpu', weights_only=True), False
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ != 'UnpicklingError' or 'Weights only load failed' not in str(e):
      raise CheckpointFileError(_unreadable(path, e)) from None
    reason = _weights_only_reason(e)
    with path.open('rb') as f:
      is_zip = zipfile.is_zipfile(f)
    if not allow_pickle and not (is_zip or 'global' in reason.lower()):
      # Random bytes read as pickle opcodes fail here too: not a file that needs unpickling.
      raise CheckpointFileError(f'{path} is not a PyTorch checkpoint (torch.load(weights_only='
                                f'True): {reason})') from None
    if not allow_pickle:
      raise CheckpointFileError(
          f'{path} cannot be read with torch.load(weights_only=True) ({reason}); reading it '
          'needs full unpickling, which can run arbitrary code from the file. If you trust its '
          'source, rerun with --allow_pickle') from None
  try:
    with warnings.catch_warnings(), path.open('rb') as f:
      warnings.simplefilter('ignore')
      return torch.load(f, map_location='cpu', weights_only=False), True
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointFileError(_unreadable(path, e)) from None


def _weights_only_reason(error: Exception) -> str:
  text = str(error).split('WeightsUnpickler error:', 1)[-1]
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return (lines[0].split('. Please use')[0] if lines else 'restricted unpickler refused it')


def _unreadable(path: epath.Path, error: Exception) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  if isinstance(error, EOFError) or (isinstance(error, RuntimeError) and 'zip archive' in text):
    return (f'{path} is truncated or corrupt ({path.stat().length} bytes; torch.load: '
            f'{text.split(". This is")[0] or "unexpected end of file"}); copy it again')
  return (f'{path} is not a PyTorch checkpoint (torch.load failed: {type(error).__name__}: '
          f'{text[:200]})')


def read_torch_checkpoint(path: str | os.PathLike, ema: bool = False,
                          allow_pickle: bool = False
                          ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The official state_dict in a `.pth` file, as NumPy arrays.

  Args:
    path: a bare state_dict, or a training checkpoint dict holding it under 'model' or
      'state_dict' (EMA weights under 'model_ema' or 'state_dict_ema'); a `module.` prefix
      (DistributedDataParallel) on every key is removed. Local or gs://...
    ema: take the EMA weights of a training checkpoint.
    allow_pickle: if the restricted unpickler (`weights_only=True`) refuses the file, unpickle
      it fully. Only for files from a trusted source: unpickling can run any code.

  Returns:
    (state_dict, source) where source = {'entry': the entry used ('model_ema', ...; None for a
    bare state_dict), 'prefix_removed': whether keys had `module.`, 'unpickled': whether full
    unpickling ran}.

  Raises:
    CheckpointFileError: torch is missing; the file is truncated, corrupt or not a checkpoint;
      it needs full unpickling and allow_pickle is False; the asked-for entry is absent.
  """
  path = checkpoint.resolve_path(path)
  if not path.exists() or path.is_dir():
    raise CheckpointFileError(f'{path} does not exist' if not path.exists() else
                              f'{path} is not a file (torch2flax reads a .pth file; '
                              'flax2torch reads a variables directory)')
  obj, unpickled = _torch_load(path, allow_pickle)
  if not isinstance(obj, Mapping):
    raise CheckpointFileError(f'{path} holds a {type(obj).__module__}.{type(obj).__qualname__}, '
                              'not a state_dict or a training checkpoint dict')
  present = [k for k in (*WEIGHT_ENTRIES, *EMA_ENTRIES) if k in obj]
  if present:
    wanted = EMA_ENTRIES if ema else WEIGHT_ENTRIES
    entry = next((k for k in wanted if k in obj), None)
    if entry is None:
      hint = 'drop --ema to take ' if ema else 'pass --ema to take '
      raise CheckpointFileError(
          f"{path} has no {'EMA ' if ema else ''}weights entry ({' or '.join(wanted)}); its "
          f"entries: {', '.join(map(str, obj))}; {hint}{' or '.join(present)}")
  elif ema:
    raise CheckpointFileError(f'{path} is a bare state_dict, without EMA weights; drop --ema')
  else:
    entry = None
  state_dict = obj if entry is None else obj[entry]
  source = {'entry': entry, 'prefix_removed': False, 'unpickled': unpickled}
  where = describe_source(source)
  if not isinstance(state_dict, Mapping) or not state_dict:
    raise CheckpointFileError(f'{where} of {path} is not a non-empty state_dict '
                              f'(it holds a {type(state_dict).__name__})')
  not_tensors = [f'{k} ({type(v).__name__})' for k, v in state_dict.items()
                 if not hasattr(v, 'detach') and not isinstance(v, np.ndarray)]
  if not_tensors:
    raise CheckpointFileError(
        f'{path} is neither a state_dict nor a training checkpoint with one of the entries '
        f"{', '.join(WEIGHT_ENTRIES + EMA_ENTRIES)}: {where} holds non-tensors: "
        f"{', '.join(not_tensors[:5])}")
  keys = [str(k) for k in state_dict]
  if all(k.startswith(_DDP_PREFIX) for k in keys):
    source['prefix_removed'] = True
    keys = [k[len(_DDP_PREFIX):] for k in keys]
  return {k: _as_numpy(v) for k, v in zip(keys, state_dict.values())}, source


def describe_source(source: Mapping[str, Any]) -> str:
  """E.g. "entry 'model_ema' (prefix 'module.' removed)", for messages and summaries."""
  text = 'the bare state_dict' if source['entry'] is None else f"entry {source['entry']!r}"
  if source['prefix_removed']:
    text += f' (prefix {_DDP_PREFIX!r} removed)'
  if source['unpickled']:
    text += ' (fully unpickled: --allow_pickle)'
  return text


def write_torch_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
                           entry: str = 'model') -> None:
  """Writes `{entry: state_dict}` as torch tensors to a new file, atomically.

  `entry` is 'model' for the official classification code, 'state_dict' for mmdetection /
  mmsegmentation (`pytorch_backbone.write_mmdet_checkpoint`).

  Floating arrays are written as float32 and `num_batches_tracked` as int64, the official
  dtypes. The file appears whole or not at all (`checkpoint.write_atomically`); `path` may
  be local or on an object store (gs://...).

  Raises:
    FileExistsError: `path` exists.
    CheckpointFileError: torch is missing.
  """
  torch = _import_torch()
  path = checkpoint.resolve_path(path)
  if path.exists():
    raise FileExistsError(f'{path} exists; choose a new file or remove it first')
  tensors = {}
  for key, value in state_dict.items():
    dtype = np.int64 if key.endswith('num_batches_tracked') else np.float32
    # np.array, not np.ascontiguousarray: that one turns the 0-d num_batches_tracked into (1,).
    tensors[key] = torch.from_numpy(np.array(value, dtype=dtype, order='C'))
  data = io.BytesIO()
  torch.save({entry: tensors}, data)
  checkpoint.write_atomically(path, data.getvalue())
