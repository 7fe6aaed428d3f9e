"""Tests of rmt_jax.train.sharding: the placement rule, the mesh, and that a sharded train step
computes what one device computes (data parallel and data x fsdp), on 8 simulated CPU devices."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rmt_jax.train import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_partition_spec_splits_largest_divisible_dimension():
  assert sharding.partition_spec((64, 128), 2, 0) == P(None, 'fsdp')
  assert sharding.partition_spec((3, 3, 1, 48), 4, 0) == P(None, None, None, 'fsdp')
  assert sharding.partition_spec((96, 10), 4, 0) == P('fsdp', None)  # 10 % 4 != 0
  assert sharding.partition_spec((7, 5), 2, 0) == P()  # Nothing divides.
  assert sharding.partition_spec((), 2, 0) == P()  # Scalars (step, counts).
  assert sharding.partition_spec((64, 128), 2, 2**14) == P()  # Too small to be worth it.
  assert sharding.partition_spec((64, 128), 1, 0) == P()  # No fsdp axis.


def test_mesh_shape_fills_the_minus_one_axis():
  cfg = ml_collections.ConfigDict({'data': -1, 'fsdp': 2})
  assert sharding.mesh_shape(cfg, 8) == (4, 2)
  assert sharding.mesh_shape(ml_collections.ConfigDict({'data': 1, 'fsdp': -1}), 8) == (1, 8)
  with pytest.raises(ValueError, match='does not fit'):
    sharding.mesh_shape(ml_collections.ConfigDict({'data': 3, 'fsdp': 1}), 8)
  with pytest.raises(ValueError, match='At most one'):
    sharding.mesh_shape(ml_collections.ConfigDict({'data': -1, 'fsdp': -1}), 8)


def test_state_shardings_place_moments_like_their_parameters():
  mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1}))
  tree = {'kernel': jax.ShapeDtypeStruct((64, 128), np.float32),
          'mu': {'kernel': jax.ShapeDtypeStruct((64, 128), np.float32)}}
  shardings = sharding.state_shardings(tree, mesh, fsdp_min_size=0)
  assert shardings['kernel'].spec == shardings['mu']['kernel'].spec


# XLA:CPU compiles the train step ~3x faster without LLVM's optimisations; the comparison is
# between programs compiled alike, so it is as strict.
_FAST_COMPILE = '--xla_backend_optimization_level=0'

# Runs in a fresh interpreter: the device count is fixed when JAX starts.
_PARITY = textwrap.dedent('''
    import json, os, sys
    os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
    import jax
    jax.config.update('jax_default_prng_impl', 'rbg')
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from configs import tiny_test
    from rmt_jax.train import optim
    from rmt_jax.train import sharding
    from rmt_jax.train import steps as train_steps

    config = tiny_test.get_config()
    config.global_batch_size = 16
    model = train_steps.build_model(config)
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=2, total_steps=10)
    tx = optim.create_optimizer(config, schedule)
    rng = np.random.default_rng(0)
    steps = 3
    images = rng.normal(size=(steps, 16, 16, 16, 3)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, size=(steps, 16))]

    def run(data, fsdp):
      mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': data, 'fsdp': fsdp}),
                                  devices=jax.devices()[:data * fsdp])
      init = lambda: train_steps.init_state(jax.random.PRNGKey(0), model, tx, 16)
      state_sh = sharding.state_shardings(jax.eval_shape(init), mesh, fsdp_min_size=0)
      batch_sh = sharding.batch_sharding(mesh)
      step_fn = jax.jit(
          lambda s, b: train_steps.train_step(s, b, model=model, tx=tx, ema=0.9),
          in_shardings=(state_sh, {'image': batch_sh, 'label': batch_sh}),
          out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
      state = jax.jit(init, out_shardings=state_sh)()
      n_sharded = sum(1 for x in jax.tree.leaves(state.params)
                      if not x.sharding.is_fully_replicated)
      losses = []
      for i in range(steps):
        batch = {'image': jax.device_put(images[i], batch_sh),
                 'label': jax.device_put(labels[i], batch_sh)}
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics['loss']))
      return losses, jax.device_get(state), n_sharded

    ref_losses, ref_state, _ = run(1, 1)
    # Parameters whose gradient vanishes identically (a bias right before a BatchNorm, which
    # subtracts it again) are moved by Adam's normalised update of float32 rounding noise:
    # +-lr per step whatever the placement. Compare the ones training determines: elements
    # whose gradient RMS (Adam's second moment) is clearly above that noise.
    nu = [s.nu for s in jax.tree.leaves(ref_state.opt_state,
                                        is_leaf=lambda x: hasattr(x, 'nu'))
          if hasattr(s, 'nu')][0]
    rms = jax.tree.map(lambda v: np.sqrt(v / (1 - 0.999**steps)), nu)  # Bias-corrected.
    determined = jax.tree.map(lambda r: r > 1e-7, rms)

    def flat(tree, mask=None):
      leaves = jax.tree.leaves(tree)
      if mask is not None:
        leaves = [x[m] for x, m in zip(leaves, jax.tree.leaves(mask))]
      return np.concatenate([np.ravel(x) for x in leaves]).astype(np.float64)

    def rel(a, b, mask=None):
      a, b = flat(a, mask), flat(b, mask)
      return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    out = {'reference_losses': ref_losses,
           'determined_fraction': float(flat(determined).mean())}
    for data, fsdp in ((8, 1), (4, 2)):
      losses, state, n_sharded = run(data, fsdp)
      out[f'{data}x{fsdp}'] = {
          'loss': max(abs(l - r) / abs(r) for l, r in zip(losses, ref_losses)),
          'params': rel(state.params, ref_state.params, determined),
          'params_all': rel(state.params, ref_state.params),
          'batch_stats': rel(state.batch_stats, ref_state.batch_stats),
          'ema': rel(state.ema_params, ref_state.ema_params, determined),
          'n_sharded': n_sharded, 'losses': losses}
    print('RESULT ' + json.dumps(out))
''')


def test_sharded_train_step_matches_one_device():
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=_FAST_COMPILE)
  proc = subprocess.run([sys.executable, '-c', _PARITY], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  result = json.loads(line[len('RESULT '):])
  print(json.dumps(result, indent=1))
  for mesh in ('8x1', '4x2'):
    for key in ('loss', 'params', 'batch_stats', 'ema'):
      assert result[mesh][key] < 1e-5, (mesh, key, result[mesh][key])
  # Most elements are compared (88% here); the rest have gradients at rounding level.
  assert result['determined_fraction'] > 0.8
  # The fsdp run really split parameters; the pure data-parallel one replicated them all.
  assert result['4x2']['n_sharded'] > 0
  assert result['8x1']['n_sharded'] == 0
  # And training moved: the loss is not a constant that any placement would reproduce.
  assert result['reference_losses'][0] != result['reference_losses'][-1]
