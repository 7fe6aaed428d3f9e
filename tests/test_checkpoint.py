"""Tests of the training half of rmt_jax.weights.checkpoint: the manager's round trip (state + data
position), the resume order, `load_variables` on a training workdir, and damaged checkpoints
(skipped, set aside, the run resumed bit for bit from the newest intact one), on local disk and
on a gs:// bucket (a local GCS emulator, `conftest.gcs_emulator`)."""

import asyncio
import gc
import logging
import pathlib
import re
import shutil
import subprocess
import sys

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore

from rmt_jax.weights import checkpoint
from rmt_jax.train import loop
from rmt_jax.train import metrics_writer
from rmt_jax.train import steps as train_steps
from conftest import main_env  # pylint: disable=g-bad-import-order
from conftest import programs_built_once_without_evaluation  # pylint: disable=g-bad-import-order


def _state(value: float) -> train_steps.TrainState:
  params = {'fc': {'kernel': jnp.full((3, 4), value), 'bias': jnp.zeros(4)}}
  stats = {'norm': {'mean': jnp.full(4, value), 'var': jnp.ones(4)}}
  return train_steps.TrainState(
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


# ---------------------------------------------------------------------------------------
# A checkpoint damaged after it was written (truncated data, lost metadata) costs that
# checkpoint, not the run: readers take the newest one that reads back, a resuming run moves the
# damaged ones aside to <step>.damaged-<n> and saves those steps again.


def _truncate_data(step_dir: pathlib.Path | epath.Path) -> None:
  """What a disk error or an interrupted copy leaves: every array data file cut short (on a
  bucket, each object replaced by its first bytes)."""
  state = epath.Path(step_dir) / 'state'
  # The arrays' data files: state/d/* and state/ocdbt.process_<n>/d/*.
  files = [*state.glob('d/*'), *state.glob('*/d/*')]
  assert files, f'no array data files under {step_dir}'
  for f in files:
    f.write_bytes(f.read_bytes()[:16])


def _delete_metadata(step_dir: pathlib.Path | epath.Path) -> None:
  """The state's tree metadata (orbax's _METADATA) gone, the arrays intact."""
  (epath.Path(step_dir) / 'state' / '_METADATA').unlink()


def _saved_run(directory, steps=(2, 4, 6), **kwargs) -> checkpoint.TrainCheckpointer:
  ckpt = checkpoint.TrainCheckpointer(str(directory), async_save=False, **kwargs)
  for step in steps:
    ckpt.save(step, _state(float(step)), {'epoch': 0, 'step_in_epoch': step}, {'model': 'm'})
  return ckpt


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and 'cannot be read' in r.getMessage()]


def test_resume_skips_damaged_checkpoints_and_sets_them_aside(tmp_path, caplog):
  ckpt = _saved_run(tmp_path, max_to_keep=3)
  root = tmp_path / 'checkpoints'
  _truncate_data(root / '6')
  _delete_metadata(root / '4')
  state, data, source = checkpoint.restore_or_initialize(
      ckpt, _abstract(_state(0.0)), initialize=lambda: pytest.fail('started from scratch'))
  assert source == 'checkpoint 2' and data == {'epoch': 0, 'step_in_epoch': 2}
  np.testing.assert_array_equal(state.params['fc']['kernel'], 2.0)
  warnings = _warnings(caplog)
  assert len(warnings) == 2, warnings
  assert re.search(rf'step 6 at {root}/6 cannot be read \(ValueError: .*Requested byte range',
                   warnings[0]), warnings[0]
  assert f'moved it aside to {root}/6.damaged-1' in warnings[0]
  assert f'step 4 at {root}/4 cannot be read' in warnings[1]
  # Kept whole for inspection, out of orbax's steps: 4 and 6 can be saved again.
  assert sorted(p.name for p in root.iterdir()) == ['2', '4.damaged-1', '6.damaged-1']
  assert ckpt.latest_step() == 2
  for step in (4, 6, 8, 10):
    ckpt.save(step, _state(float(step)), {'epoch': 0}, {'model': 'm'})
  ckpt.wait_until_finished()
  # max_to_keep=3 deleted step 2 and 4, never the damaged ones.
  assert sorted(p.name for p in root.iterdir()) == ['10', '4.damaged-1', '6', '6.damaged-1', '8']
  # Damaged again: the next free name, nothing overwritten.
  _truncate_data(root / '10')
  caplog.clear()
  checkpoint.restore_or_initialize(ckpt, _abstract(_state(0.0)), initialize=pytest.fail)
  _truncate_data(root / '8')
  shutil.copytree(root / '6', root / '8.damaged-1')  # A name in use is skipped.
  _, _, source = checkpoint.restore_or_initialize(ckpt, _abstract(_state(0.0)),
                                                  initialize=pytest.fail)
  ckpt.close()
  assert source == 'checkpoint 6'
  assert {'10.damaged-1', '8.damaged-2'} <= {p.name for p in root.iterdir()}


def test_every_checkpoint_damaged_stops_with_one_line_and_moves_nothing(tmp_path):
  ckpt = _saved_run(tmp_path, steps=(2, 4))
  root = tmp_path / 'checkpoints'
  _truncate_data(root / '4')
  _delete_metadata(root / '2')
  with pytest.raises(checkpoint.CheckpointUnreadableError) as e:
    checkpoint.restore_or_initialize(ckpt, _abstract(_state(0.0)), initialize=pytest.fail)
  ckpt.close()
  message = str(e.value)
  assert '\n' not in message and len(message) < 1200, message
  assert re.search(rf'none of the 2 checkpoints in {root} can be read \(step 4 at {root}/4: '
                   rf'ValueError: .*; step 2 at {root}/2: ', message), message
  assert sorted(p.name for p in root.iterdir()) == ['2', '4']
  with pytest.raises(checkpoint.CheckpointUnreadableError):
    checkpoint.load_variables(tmp_path)


def test_shapes_that_no_longer_fit_are_reported_as_unreadable(tmp_path):
  ckpt = _saved_run(tmp_path, steps=(2,))
  wider = _state(0.0).replace(params={'fc': {'kernel': jnp.zeros((3, 5)), 'bias': jnp.zeros(4)}})
  with pytest.raises(checkpoint.CheckpointUnreadableError, match=r'step 2 at .*not compatible '
                     r'with the stored shape: \(3, 4\)'):
    checkpoint.restore_or_initialize(ckpt, _abstract(wider), initialize=pytest.fail)
  ckpt.close()


@pytest.mark.parametrize('damage', [_truncate_data, _delete_metadata])
def test_readers_take_the_newest_readable_checkpoint_and_leave_the_run_alone(
    tmp_path, caplog, damage):
  _saved_run(tmp_path, steps=(4, 6)).close()
  root = tmp_path / 'checkpoints'
  damage(root / '6')
  variables, metadata = checkpoint.load_variables(tmp_path)  # rmt_jax.load, predict, init_from
  assert metadata['step'] == 4 and metadata['source'].endswith('/checkpoints/4')
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], 4.5)
  (warning,) = _warnings(caplog)
  assert warning.startswith(f'Checkpoint step 6 at {root}/6 cannot be read (')
  assert warning.endswith('); reading step 4 instead.')
  assert sorted(p.name for p in root.iterdir()) == ['4', '6']  # A reader moves nothing.
  # An explicit step is read or fails, without falling back.
  with pytest.raises(Exception):
    checkpoint.load_train_state(tmp_path, 6)


def test_on_a_bucket_damaged_checkpoints_are_skipped_set_aside_and_saved_again(
    gcs_workdir, caplog):
  # What a run on a gs:// workdir does with damaged checkpoints, through the clients it uses
  # there (orbax, TensorStore's GCS driver, epath), against a GCS emulator.
  ckpt = _saved_run(gcs_workdir, max_to_keep=3)
  root = gcs_workdir / 'checkpoints'
  _truncate_data(root / '6')
  _delete_metadata(root / '4')
  state, data, source = checkpoint.restore_or_initialize(
      ckpt, _abstract(_state(0.0)), initialize=lambda: pytest.fail('started from scratch'))
  assert source == 'checkpoint 2' and data == {'epoch': 0, 'step_in_epoch': 2}
  np.testing.assert_array_equal(state.params['fc']['kernel'], 2.0)
  warnings = _warnings(caplog)
  assert len(warnings) == 2, warnings
  assert re.search(rf'step 6 at {re.escape(str(root))}/6 cannot be read \(ValueError: '
                   r'.*Requested byte range', warnings[0]), warnings[0]
  assert f'moved it aside to {root}/6.damaged-1' in warnings[0]
  assert f'step 4 at {root}/4 cannot be read' in warnings[1]
  assert sorted(p.name for p in root.iterdir()) == ['2', '4.damaged-1', '6.damaged-1']
  for step in (4, 6, 8, 10):
    ckpt.save(step, _state(float(step)), {'epoch': 0, 'step_in_epoch': step}, {'model': 'm'})
  ckpt.wait_until_finished()
  # max_to_keep=3 deleted steps 2 and 4 from the bucket, never the damaged ones.
  assert sorted(p.name for p in root.iterdir()) == ['10', '4.damaged-1', '6', '6.damaged-1', '8']
  # Readers (rmt_jax.load, predict, init_from) take the newest readable one and move nothing.
  _truncate_data(root / '10')
  caplog.clear()
  variables, metadata = checkpoint.load_variables(gcs_workdir)
  assert metadata['step'] == 8 and len(_warnings(caplog)) == 1
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], 8.5)
  # None readable: one line, and nothing moved.
  _truncate_data(root / '8')
  _truncate_data(root / '6')
  with pytest.raises(checkpoint.CheckpointUnreadableError) as e:
    checkpoint.restore_or_initialize(ckpt, _abstract(_state(0.0)), initialize=pytest.fail)
  ckpt.close()
  message = str(e.value)
  # One line: three reasons of at most ~320 characters and the paths.
  assert '\n' not in message and len(message) < 1500, message
  assert message.startswith(f'none of the 3 checkpoints in {root} can be read (step 10 at '
                            f'{root}/10: ValueError: '), message
  assert sorted(p.name for p in root.iterdir()) == ['10', '4.damaged-1', '6', '6.damaged-1', '8']


def test_reads_finishing_after_their_event_loop_closed_print_nothing(monkeypatch):
  # orbax abandons the other reads of a damaged checkpoint when one fails and closes their
  # event loop; each that finishes later wakes its task through the closed loop, and
  # TensorStore reports the RuntimeError to sys.unraisablehook, whose default prints it.
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  checkpoint._drop_closed_loop_wakeups()  # pylint: disable=protected-access
  hook = sys.unraisablehook
  checkpoint._drop_closed_loop_wakeups()  # pylint: disable=protected-access
  assert sys.unraisablehook is hook  # Installed once.
  promise, read = tensorstore.Promise.new()

  async def abandoned_read():
    return await read

  async def failing_restore():
    asyncio.ensure_future(abandoned_read())
    await asyncio.sleep(0)
    raise ValueError('one read failed')

  event_loop = asyncio.new_event_loop()  # As orbax runs a restore (asyncio_utils.run_sync).
  with pytest.raises(ValueError):
    event_loop.run_until_complete(failing_restore())
  event_loop.close()
  promise.set_result(1)  # The abandoned read finishes: dropped.
  assert not reported
  # Any other unraisable exception still reaches the hook that was there before.

  class Failing:

    def __del__(self):
      raise RuntimeError('Event loop is closed')

  Failing()
  assert [type(r.exc_value) for r in reported] == [RuntimeError], reported
  gc.collect()  # The abandoned read's task, before the hook is put back.


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A finished 6-step run of configs/tiny_test.py (checkpoints 2, 4, 6) and its final state.

  The resumed runs below reuse this run's compiled programs and skip evaluation: what they
  test is which checkpoint the run resumes from, and that it then trains exactly as before.
  """
  from configs import tiny_test  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('tiny_run')
  config = tiny_test.get_config()
  config.data.digits_dir = str(root / 'digits')
  config.total_steps = 6
  config.async_checkpoints = False
  with programs_built_once_without_evaluation():
    workdir = root / 'run'
    loop.train_and_evaluate(config, str(workdir))
    yield config, workdir, checkpoint.load_train_state(workdir, 6)[0]


@pytest.mark.slow
@pytest.mark.parametrize('damage,resumed_from', [
    ({'6': _truncate_data}, 4),
    ({'6': _delete_metadata}, 4),
    ({'6': _truncate_data, '4': _delete_metadata}, 2),
])
def test_a_damaged_run_resumes_from_the_newest_intact_checkpoint_bit_for_bit(
    tiny_run, tmp_path, caplog, damage, resumed_from):
  config, finished, want = tiny_run
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  for step, how in damage.items():
    how(workdir / 'checkpoints' / step)
  caplog.set_level(logging.INFO)
  loop.train_and_evaluate(config, str(workdir))
  assert f'from checkpoint {resumed_from}.' in caplog.text
  assert len(_warnings(caplog)) == len(damage)
  # The damaged checkpoints are kept aside; the steps they held were trained and saved again.
  names = {p.name for p in (workdir / 'checkpoints').iterdir()}
  assert names == {'2', '4', '6'} | {f'{step}.damaged-1' for step in damage}
  got, meta = checkpoint.load_train_state(workdir)
  assert meta['step'] == 6
  for name in ('params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats', 'rng',
               'step'):
    for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=name)  # Bit for bit.


@pytest.mark.slow
def test_a_run_on_a_bucket_resumes_from_its_newest_intact_checkpoint_bit_for_bit(
    tiny_run, gcs_workdir, tmp_path, caplog):
  config, _, want = tiny_run
  root = gcs_workdir / 'checkpoints'
  with pytest.MonkeyPatch.context() as patch:
    # TensorBoard and metrics.jsonl go through TensorFlow's own GCS client, which no local
    # emulator can stand in for (it has no endpoint setting): here they go to local disk. The
    # checkpoints, the subject, go to the bucket as in a user's run.
    local_metrics = metrics_writer.MetricsWriter
    patch.setattr(metrics_writer, 'MetricsWriter',
                  lambda workdir, **kwargs: local_metrics(str(tmp_path / 'metrics'), **kwargs))
    loop.train_and_evaluate(config, str(gcs_workdir))  # The run of `tiny_run`, on the bucket.
    assert sorted(p.name for p in root.iterdir()) == ['2', '4', '6']
    _truncate_data(root / '6')
    _delete_metadata(root / '4')
    caplog.set_level(logging.INFO)
    loop.train_and_evaluate(config, str(gcs_workdir))
    assert 'from checkpoint 2.' in caplog.text
    assert len(_warnings(caplog)) == 2
    assert sorted(p.name for p in root.iterdir()) == ['2', '4', '4.damaged-1', '6', '6.damaged-1']
    got, meta = checkpoint.load_train_state(gcs_workdir)
    assert meta['step'] == 6
    for name in ('params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats', 'rng',
                 'step'):
      for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)  # Bit for bit, as on local disk.
    # None readable: the run stops with the one-line message and moves nothing.
    for step in ('2', '4', '6'):
      _truncate_data(root / step)
    with pytest.raises(checkpoint.CheckpointUnreadableError,
                       match=rf'^none of the 3 checkpoints in {re.escape(str(root))} can be '
                             r'read \(step 6 at [^\n]*to start over$'):
      loop.train_and_evaluate(config, str(gcs_workdir))
    assert sorted(p.name for p in root.iterdir()) == ['2', '4', '4.damaged-1', '6', '6.damaged-1']


@pytest.mark.slow
def test_main_with_every_checkpoint_damaged_says_so_in_one_line(tiny_run, tmp_path):
  config, finished, _ = tiny_run
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  for step in ('2', '4', '6'):
    _truncate_data(workdir / 'checkpoints' / step)
  repo = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run(
      [sys.executable, str(repo / 'main.py'), '--config', str(repo / 'configs/tiny_test.py'),
       '--workdir', str(workdir), f'--config.data.digits_dir={config.data.digits_dir}'],
      cwd=repo, env=main_env(tmp_path / 'jax_cache'), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  # The one error line and, besides it, only log lines: no traceback. (orbax's abandoned reads
  # of the damaged files used to wake their closed event loop, and Python printed an "Event
  # loop is closed" traceback for each, hundreds, interleaved with the error line.)
  assert 'Traceback' not in proc.stdout + proc.stderr, proc.stderr[-6000:]
  others = [line for line in proc.stderr.splitlines()
            if not re.match(r'[IW]\d{4} \d\d:\d\d:\d\d\.\d+ ', line)]
  assert len(others) == 1, '\n'.join(others)[-6000:]
  assert re.fullmatch(r'error: none of the 3 checkpoints in .*/checkpoints can be read \(step 6 at '
                      r'.*/6: ValueError: .*; step 4 at .*; step 2 at .*\); nothing was moved.*'
                      r'to start over', others[0]), others[0]
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4', '6']
