"""The on-device kernel check (rmt_jax.kernels.check, rmt_jax.train.kernel_check), with Pallas's
interpreter standing in for the chip: a correct kernel is kept, a wrong one and one that fails
to lower are dropped with one warning line, and the network then runs its plain forms."""

import json
import subprocess
import sys

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, relative_error
from rmt_jax.kernels import check
from rmt_jax.kernels.tpu import block_tail
from rmt_jax.kernels.tpu import lepe
from rmt_jax.kernels.tpu import operations
from rmt_jax.models import create_model
from rmt_jax.train import kernel_check

# Two stages (axial, whole), 2 images of 16 x 16: every kind of kernel call, small.
_TINY = dict(embed_dims=(8, 16), depths=(1, 1), num_heads=(2, 2), init_values=(2, 2),
             heads_ranges=(4, 4), mlp_ratios=(2, 2), axial=(True, False),
             layerscales=(False, True), remat=(False, False), projection=16, num_classes=3)


@pytest.fixture(scope='module')
def model():
  return create_model('rmt_tiny', **_TINY)


@pytest.fixture(scope='module')
def calls(model):
  return kernel_check.record_calls(model, 2, 16)


def _of(calls, operation):
  return [c for c in calls if c.key.operation == operation]


def test_recording_finds_every_kernel_of_the_train_step(calls):
  assert sorted(str(c.key) for c in calls) == sorted([
      'first_half 4x4x8 float32', 'axial attention 4x4x8 float32', 'lepe 4x4x8 float32',
      'second_half 4x4x8 float32', 'first_half 2x2x16 float32',
      'whole attention 2x2x16 float32', 'lepe 2x2x16 float32', 'second_half 2x2x16 float32'])


@pytest.mark.slow  # The interpreter times both forms of a kernel: ~25 s on two CPU cores.
def test_a_correct_kernel_is_kept(calls):
  lines = []
  [result] = check.check(_of(calls, 'axial attention'), repeats=1, say=lines.append)
  assert result.failure is None and result.kernel_error < 1e-5, result
  assert result.chosen in ('kernel', 'plain')  # by time; the interpreter's says nothing
  assert lines == [f'checked axial attention 4x4x8 float32: kernel {result.kernel_ms:.3f}, '
                   f'plain {result.plain_ms:.3f} ms, {result.chosen} chosen']


def test_a_wrong_kernel_is_dropped_and_the_network_runs_the_plain_form(model, calls,
                                                                       monkeypatch, caplog):
  right = lepe.lepe_add
  monkeypatch.setattr(lepe, 'lepe_add', lambda *a, **k: right(*a, **k) * 1.01)
  lines = []
  results = check.check(_of(calls, 'lepe'), repeats=1, say=lines.append)
  assert [r.chosen for r in results] == ['plain', 'plain']
  assert all(r.failure.startswith('wrong: error ') for r in results)
  assert lines == [f'warning: the TPU kernel of {r.key} is dropped: {r.failure}; the plain '
                   'form runs' for r in results]
  # Declined, the wrong kernel is not called: the network equals its plain form, and says so.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  want = model.clone(kernels='xla').apply(variables, x)
  with operations.declined(check.declined(results)):
    got = jax.jit(lambda v, x: model.clone(kernels='tpu').apply(v, x))(variables, x)
  assert relative_error(got, want) < 1e-5
  assert any('lepe' in r.message and 'declined' in r.message for r in caplog.records)


def test_a_kernel_that_fails_to_lower_is_dropped(calls, monkeypatch):
  def fails(*args, **kwargs):
    raise NotImplementedError('Mosaic cannot lower this\nsecond line')

  monkeypatch.setattr(block_tail, 'block_second_half', fails)
  [result] = check.check(_of(calls, 'second_half')[:1], repeats=1, say=lambda line: None)
  assert result.chosen == 'plain' and result.kernel_ms is None
  assert result.failure == 'NotImplementedError: Mosaic cannot lower this'


def test_results_are_cached_for_one_device_software_and_shapes(calls, tmp_path):
  result = check.Result(calls[0].key, 1.0, 2.0, 1e-7, 0.0, None, 'kernel')
  fingerprint = check.fingerprint(calls)
  path = epath.Path(tmp_path) / kernel_check.KERNEL_CHECK_FILE
  check.save(path, fingerprint, [result])
  assert check.load(path, fingerprint) == [result]
  assert check.load(path, {**fingerprint, 'jax': '0.0.1'}) is None
  assert check.load(path, {**fingerprint, 'keys': fingerprint['keys'][:1]}) is None
  assert check.load(epath.Path(tmp_path) / 'absent.json', fingerprint) is None
  assert 'first_half' in check.table([result]) and 'kernel' in check.table([result])


def test_the_command_prints_the_table():
  result = subprocess.run(
      [sys.executable, '-m', 'rmt_jax.kernel_check', '--config', 'configs/tiny_test.py',
       '--batch_per_chip', '1'], cwd=REPO, capture_output=True, text=True, timeout=900,
      env={'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  assert result.returncode == 0, result.stderr[-2000:]
  table = result.stdout[result.stdout.index('operation'):].splitlines()
  assert table[0].split()[:3] == ['operation', 'shape', 'dtype']
  assert len(table) == 9 and all(row.split()[-1] in ('kernel', 'plain') for row in table[1:])


def test_a_training_run_on_tpus_checks_its_kernels_and_goes_on_without_a_failing_one(
    tmp_path, monkeypatch, caplog):
  # This CPU host stands in for a TPU host: 'auto' resolves to the TPU forms (Pallas's
  # interpreter), so the trainer checks them before it traces its steps.
  from configs import tiny_test  # pylint: disable=g-import-not-at-top
  from rmt_jax.kernels import selection  # pylint: disable=g-import-not-at-top
  from rmt_jax.train import loop  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(selection, 'for_devices', lambda devices: 'tpu')

  def fails(*args, **kwargs):
    raise NotImplementedError('Mosaic cannot lower this')

  monkeypatch.setattr(lepe, 'lepe_add', fails)
  config = tiny_test.get_config()
  config.data.digits_dir = str(tmp_path / 'digits')
  config.total_steps = 2
  config.global_batch_size = 2
  caplog.set_level('INFO')
  result = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 2 and np.isfinite(result['train_loss'])
  cached = json.loads((tmp_path / 'run' / kernel_check.KERNEL_CHECK_FILE).read_text())
  assert cached['fingerprint']['device_kind'] == jax.devices()[0].device_kind
  saved = [check.Result.from_json(r) for r in cached['results']]
  assert {r.key.operation: r.chosen for r in saved}['lepe'] == 'plain'
  assert all(r.failure is None for r in saved if r.key.operation != 'lepe')
  messages = [r.getMessage() for r in caplog.records]
  assert sum('warning: the TPU kernel of lepe' in m and 'NotImplementedError' in m
             for m in messages) == 2
  assert any(m.startswith('Kernel check (rmt_jax.kernels.check):\noperation') for m in messages)
