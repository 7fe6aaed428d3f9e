"""Tests of the training half of rmt_jax.checkpoint: the manager's round trip (state + data
position), the resume order, and `load_variables` on a training workdir."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmt_jax import checkpoint
from rmt_jax import train


def _state(value: float) -> train.TrainState:
  params = {'fc': {'kernel': jnp.full((3, 4), value), 'bias': jnp.zeros(4)}}
  stats = {'norm': {'mean': jnp.full(4, value), 'var': jnp.ones(4)}}
  return train.TrainState(
      step=jnp.asarray(int(value), jnp.int32), params=params, batch_stats=stats,
      opt_state={'mu': jax.tree.map(jnp.zeros_like, params)},
      ema_params=jax.tree.map(lambda x: x + 0.5, params), ema_batch_stats=stats,
      rng=jax.random.PRNGKey(0))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def test_round_trip_keeps_state_and_data_position(tmp_path):
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path), max_to_keep=2)
  data = {'epoch': 3, 'step_in_epoch': 7, 'steps_per_epoch': 10, 'seed': 0}
  for step in (1, 2, 3):
    ckpt.save(step, _state(float(step)), {**data, 'epoch': step}, {'model': 'rmt_tiny'})
  ckpt.wait_until_finished()
  assert ckpt.latest_step() == 3
  state, data_state = ckpt.restore(3, _abstract(_state(0.0)))
  ckpt.close()
  assert data_state == {**data, 'epoch': 3}
  np.testing.assert_array_equal(state.params['fc']['kernel'], 3.0)
  assert int(state.step) == 3
  # max_to_keep=2: step 1 is gone.
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2', '3']


def test_relative_workdir(tmp_path, monkeypatch):
  # `main.py --workdir runs/demo` is what users type; orbax itself wants absolute paths.
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint.TrainCheckpointer('runs/demo', async_save=False)
  ckpt.save(1, _state(1.0), {'epoch': 0}, {'model': 'rmt_tiny'})
  ckpt.close()
  assert (tmp_path / 'runs' / 'demo' / 'checkpoints' / '1').is_dir()


def test_resume_order(tmp_path):
  fresh = _state(0.0)
  calls = []

  def initialize():
    calls.append('init')
    return fresh

  def load_weights(state, variables, metadata):
    calls.append(metadata['model'])
    return state.replace(params=jax.tree.map(jnp.asarray, variables['params']))

  # Scratch: nothing in the workdir, no init_from.
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path / 'run'))
  state, data, source = checkpoint.restore_or_initialize(
      ckpt, _abstract(fresh), initialize=initialize)
  assert (source, data, calls) == ('scratch', None, ['init'])
  # init_from: converted weights.
  weights = tmp_path / 'converted'
  checkpoint.save_variables(weights, {'params': {'fc': {'kernel': np.full((3, 4), 7.0),
                                                        'bias': np.zeros(4)}}},
                            {'model': 'rmt_tiny'})
  state, data, source = checkpoint.restore_or_initialize(
      ckpt, _abstract(fresh), initialize=initialize, init_from=str(weights),
      load_weights=load_weights)
  assert source.startswith('init_from') and data is None
  np.testing.assert_array_equal(state.params['fc']['kernel'], 7.0)
  # The workdir's own checkpoint wins over init_from.
  ckpt.save(5, _state(5.0), {'epoch': 1, 'step_in_epoch': 0}, {'model': 'rmt_tiny'})
  ckpt.wait_until_finished()
  state, data, source = checkpoint.restore_or_initialize(
      ckpt, _abstract(fresh), initialize=initialize, init_from=str(weights),
      load_weights=load_weights)
  ckpt.close()
  assert source == 'checkpoint 5' and data == {'epoch': 1, 'step_in_epoch': 0}
  np.testing.assert_array_equal(state.params['fc']['kernel'], 5.0)


def test_load_variables_reads_a_training_workdir(tmp_path):
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path))
  preprocessing = {'image_size': 32, 'crop_pct': 1.0, 'interpolation': 'bilinear',
                   'mean': [0.5] * 3, 'std': [0.25] * 3}
  meta = {'model': 'rmt_tiny', 'model_overrides': {'num_classes': 10},
          'class_names': [str(i) for i in range(10)], 'eval_preprocessing': preprocessing}
  ckpt.save(4, _state(4.0), {'epoch': 0, 'step_in_epoch': 4}, meta)
  ckpt.save(6, _state(6.0), {'epoch': 0, 'step_in_epoch': 6}, meta)
  ckpt.close()
  for path in (tmp_path, tmp_path / 'checkpoints'):
    variables, metadata = checkpoint.load_variables(path)
    assert metadata['model'] == 'rmt_tiny' and metadata['step'] == 6
    assert metadata['weights'] == 'ema' and metadata['model_overrides'] == {'num_classes': 10}
    # What the run stored with its weights reaches their readers (predict, eval-only).
    assert metadata['class_names'] == meta['class_names']
    assert metadata['eval_preprocessing'] == preprocessing
    assert isinstance(variables['params']['fc']['kernel'], np.ndarray)
    np.testing.assert_array_equal(variables['params']['fc']['kernel'], 6.5)  # EMA = +0.5.
    np.testing.assert_array_equal(variables['batch_stats']['norm']['mean'], 6.0)


def test_load_variables_on_an_empty_directory_says_what_it_wanted(tmp_path):
  with pytest.raises(checkpoint.CheckpointNotFoundError, match='rmt_jax.json'):
    checkpoint.load_variables(tmp_path)
