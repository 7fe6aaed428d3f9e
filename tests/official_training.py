"""The official training fixture (`fixtures/official_tiny_train.npz`) run through rmt_jax.

`run` takes the fixture's initial weights, images, soft targets and learning rates through the
project's jitted `steps.train_step` for its 4 steps, on one device or on a mesh, and returns the
gradients, losses, weights and EMA under the official state_dict keys; `errors` and `summary`
measure them against the official float64 run. tests/test_official_training.py runs it in a
subprocess (the device count and XLA's flags are fixed when JAX starts), so it imports neither
pytest nor conftest.
"""

import functools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rmt_jax.models import from_official_kwargs
from rmt_jax.train import optim
from rmt_jax.train import sharding
from rmt_jax.train import steps as train_steps
from rmt_jax.weights import pytorch

# Parameters whose true gradient is exactly zero: a bias feeding a BatchNorm (directly, or
# through a linear map, a depthwise conv's constant shift, or a residual sum, as the last
# stage's `fc2`/`dwconv` biases reach the head's BatchNorm via `proj`), which subtracts it again.
# The official float64 run sees gradients of ~1e-17 and Adam (eps 1e-8) leaves those biases
# where they are; float32 rounding leaves gradients of ~1e-9 to 1e-7, which Adam normalises into
# steps of up to the learning rate. Their gradients and final values say nothing about the
# optimizer, so the comparison leaves them out (tests/test_official_training.py checks that
# these are exactly the tensors whose official gradient vanishes).
ZERO_GRADIENT = (
    'patch_embed.proj.0.bias', 'patch_embed.proj.3.bias', 'patch_embed.proj.6.bias',
    'patch_embed.proj.9.bias', 'layers.0.downsample.reduction.bias',
    'layers.1.downsample.reduction.bias', 'layers.2.downsample.reduction.bias',
    'layers.3.blocks.0.ffn.fc2.bias', 'layers.3.blocks.0.ffn.dwconv.conv.bias', 'proj.bias')


def load(fixtures: pathlib.Path) -> dict[str, Any]:
  """The fixture's arrays and the official constructor arguments of its network."""
  with np.load(fixtures / 'official_tiny_train.npz') as f:
    arrays = {k: f[k] for k in f.files}
  arrays['kwargs'] = json.loads(
      (fixtures / 'official_tiny_configs.json').read_text())['official_tiny_train']
  return arrays


def _prefixed(fixture: dict[str, Any], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in fixture.items() if k.startswith(prefix)}


def optimizer_config(fixture: dict[str, Any]) -> ml_collections.ConfigDict:
  """The optimizer fields of the project's config, with the fixture's settings (and the
  recipe's defaults: timm's decay of the layer-scale gammas, no clipping)."""
  b1, b2 = (float(b) for b in fixture['betas'])
  return ml_collections.ConfigDict(dict(
      b1=b1, b2=b2, eps=float(fixture['eps']), weight_decay=float(fixture['weight_decay']),
      decay_layer_scale=True, grad_clip_norm=0.0))


def setup(fixture: dict[str, Any], exact_zero_gradients: bool = True):
  """(model, optimizer, initial TrainState) from the fixture's initial state_dict.

  With `exact_zero_gradients` the optimizer first sets the `ZERO_GRADIENT` tensors' gradients
  to zero (see below); otherwise it is the project's AdamW alone.
  """
  model = from_official_kwargs(**fixture['kwargs'])
  variables = pytorch.torch_to_flax(_prefixed(fixture, 'init.'), model)
  lrs = jnp.asarray(fixture['lr'], jnp.float32)
  # optax counts updates from 0: update i uses the official step i's learning rate.
  tx = optim.create_optimizer(optimizer_config(fixture), lambda count: lrs[count])
  # The ZERO_GRADIENT biases get their true gradient, exactly zero, as in the float64 run:
  # otherwise Adam moves them by rounding noise, and the BatchNorm running means, which
  # include them, follow (by up to 2e-3 relative). Nothing else sees them in training mode.
  if exact_zero_gradients:
    zero = jax.tree_util.tree_map_with_path(
        lambda path, _: pytorch.torch_key('params', tuple(k.key for k in path)) in ZERO_GRADIENT,
        variables['params'])
    tx = optax.chain(optax.masked(optax.set_to_zero(), zero), tx)
  params, batch_stats = (jax.tree.map(jnp.asarray, variables[c])
                         for c in ('params', 'batch_stats'))
  state = train_steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  batch_stats=batch_stats, opt_state=tx.init(params),
                                  ema_params=params, ema_batch_stats=batch_stats,
                                  rng=jax.random.PRNGKey(0))  # Drop path 0: no randomness.
  return model, tx, state


def batches(fixture: dict[str, Any]) -> list[dict[str, np.ndarray]]:
  return [{'image': fixture[f'input.{i}'].transpose(0, 2, 3, 1).astype(np.float32),
           'label': fixture[f'target.{i}'].astype(np.float32)}
          for i in range(len(fixture['loss']))]


def _first_moment(opt_state: Any) -> Any:
  """AdamW's first moment (`mu`, shaped like the parameters) inside the optimizer state."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
            if hasattr(s, 'mu')]
  assert len(states) == 1, states
  return states[0].mu


def run(fixture: dict[str, Any], mesh_shape: tuple[int, int] | None = None,
        image_spec: PartitionSpec | None = None,
        exact_zero_gradients: bool = True) -> dict[str, Any]:
  """The fixture's 4 steps through the project's jitted `steps.train_step`.

  The first step's gradient is read off AdamW's first moment after that step: from zero,
  mu = (1 - b1) * gradient, so it is the gradient that the step itself used.

  Args:
    fixture: from `load`.
    mesh_shape: (data, fsdp) for a mesh over the first data x fsdp devices, every parameter
      split over 'fsdp' where a dimension divides (`fsdp_min_size` 0); None: one device.
    image_spec: how the images are split over the mesh (default: the training loop's batch
      sharding); the targets are split as the images' first dimension.
    exact_zero_gradients: see `setup`.

  Returns:
    {'loss': [4 floats], 'grad0': {key: array}, 'final': state_dict, 'ema': state_dict,
     'n_sharded': parameters not replicated}, under the official keys.
  """
  model, tx, state = setup(fixture, exact_zero_gradients)
  step = functools.partial(train_steps.train_step, model=model, tx=tx,
                           ema=float(fixture['ema_decay']))
  data = batches(fixture)
  if mesh_shape is None:
    step_fn = jax.jit(step)
  else:
    mesh = sharding.create_mesh(
        ml_collections.ConfigDict({'data': mesh_shape[0], 'fsdp': mesh_shape[1]}),
        devices=jax.devices()[:mesh_shape[0] * mesh_shape[1]])
    state_sh = sharding.state_shardings(jax.eval_shape(lambda: state), mesh, fsdp_min_size=0)
    if image_spec is None:
      image_sh = label_sh = sharding.batch_sharding(mesh)
    else:
      image_sh = NamedSharding(mesh, image_spec)
      label_sh = NamedSharding(mesh, PartitionSpec(image_spec[0]) if image_spec
                               else PartitionSpec())
    batch_sh = {'image': image_sh, 'label': label_sh}
    state = jax.device_put(state, state_sh)
    data = [jax.device_put(b, batch_sh) for b in data]
    step_fn = jax.jit(step, in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, sharding.replicated(mesh)))
  out = {'n_sharded': sum(not x.sharding.is_fully_replicated
                          for x in jax.tree.leaves(state.params)), 'loss': []}
  for i, batch in enumerate(data):
    state, metrics = step_fn(state, batch)
    out['loss'].append(float(metrics['loss']))
    if i == 0:
      b1 = float(fixture['betas'][0])
      grads = jax.tree.map(lambda m: np.asarray(m, np.float64) / (1 - b1),
                           jax.device_get(_first_moment(state.opt_state)))
      out['grad0'] = pytorch.flax_to_torch(
          {'params': grads, 'batch_stats': jax.device_get(state.batch_stats)}, model)
  state = jax.device_get(state)
  out['final'] = pytorch.flax_to_torch({'params': state.params,
                                        'batch_stats': state.batch_stats}, model)
  out['ema'] = pytorch.flax_to_torch({'params': state.ema_params,
                                      'batch_stats': state.ema_batch_stats}, model)
  return out


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def errors(result: dict[str, Any], fixture: dict[str, Any]) -> dict[str, dict[str, float]]:
  """Relative errors against the official run, per category and tensor.

  Returns:
    {'loss': {step: err}, 'grad0' / 'weights' / 'running_mean' / 'running_var' /
     'ema_weights' / 'ema_running_mean' / 'ema_running_var': {key: err}}; the
     `ZERO_GRADIENT` tensors are left out of 'grad0', 'weights' and 'ema_weights'.
  """
  out: dict[str, dict[str, float]] = {
      'loss': {str(i): abs(g - w) / abs(w) for i, (g, w) in enumerate(zip(result['loss'],
                                                                           fixture['loss']))}}
  out['grad0'] = {k: relative_error(result['grad0'][k], w)
                  for k, w in _prefixed(fixture, 'grad0.').items() if k not in ZERO_GRADIENT}
  for name, prefix in (('', 'final.'), ('ema_', 'ema.')):
    for key, want in _prefixed(fixture, prefix).items():
      if key.endswith('num_batches_tracked') or '.Relpos.' in key or key in ZERO_GRADIENT:
        continue
      kind = next((k for k in ('running_mean', 'running_var') if key.endswith(k)), 'weights')
      out.setdefault(name + kind, {})[key] = relative_error(result[prefix[:-1]][key], want)
  return out


# Values per channel in each BatchNorm's batch: 4 images times the map it normalises (64x64
# images: the stem's maps are 32x32 and 16x16, then strides 8, 16, 32; the head's at stride 32).
BATCH_NORM_VALUES = {
    'patch_embed.proj.1': 4 * 32 * 32, 'patch_embed.proj.4': 4 * 32 * 32,
    'patch_embed.proj.7': 4 * 16 * 16, 'patch_embed.proj.10': 4 * 16 * 16,
    'layers.0.downsample.norm': 4 * 8 * 8, 'layers.1.downsample.norm': 4 * 4 * 4,
    'layers.2.downsample.norm': 4 * 2 * 2, 'norm': 4 * 2 * 2}


def biased_running_var_error(result: dict[str, Any], fixture: dict[str, Any]) -> float:
  """The largest relative error that flax's biased running-variance update would have had.

  In training mode the running statistics feed nothing, so the batch variances v_t are those of
  our run, whose running variance after 4 updates is m^4 r0 + sum_t (1 - m) m^(3 - t) v_t
  n / (n - 1) (m = 0.9); the biased update lacks the n / (n - 1), whence its value.
  """
  worst = 0.0
  m4 = 0.9 ** len(fixture['loss'])
  for name, n in BATCH_NORM_VALUES.items():
    key = f'{name}.running_var'
    r0 = fixture[f'init.{key}'].astype(np.float64)
    biased = m4 * r0 + (result['final'][key] - m4 * r0) * (n - 1) / n
    worst = max(worst, relative_error(biased, fixture[f'final.{key}']))
  return worst


def summary(result: dict[str, Any], fixture: dict[str, Any]) -> dict[str, Any]:
  """{'worst': the largest per-tensor error of each category of `errors`, 'whole': the error
  of all of a category's tensors together (gradients, weights, EMA weights), 'biased_running_var':
  see `biased_running_var_error`, 'n_sharded'}; plain floats (JSON)."""
  errs = errors(result, fixture)
  whole = {}
  for category, prefix, source in (('grad0', 'grad0.', 'grad0'), ('weights', 'final.', 'final'),
                                   ('ema_weights', 'ema.', 'ema')):
    keys = sorted(errs[category])
    whole[category] = relative_error(
        np.concatenate([np.ravel(result[source][k]) for k in keys]).astype(np.float64),
        np.concatenate([np.ravel(fixture[prefix + k]) for k in keys]))
  return {'worst': {c: max(v.values()) for c, v in errs.items()}, 'whole': whole,
          'biased_running_var': biased_running_var_error(result, fixture),
          'n_sharded': int(result['n_sharded'])}
