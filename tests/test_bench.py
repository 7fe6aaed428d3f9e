"""The benchmark command runs on the tiny variant and reports sane numbers (no timing asserts)."""

import json
import math
import subprocess
import sys

import jax
import pytest

from rmt_jax import bench

# A fraction of the ceiling above this means the FLOP count or the timing is wrong; a real
# computation of either kind cannot run several times faster than a large matmul.
MAX_FRACTION = 5.0


def test_bench_command_prints_table_and_sane_json(tmp_path, capsys):
  path = tmp_path / 'bench.json'
  assert bench.main(['--variant', 'rmt_tiny', '--batch', '2', '--resolution', '64',
                     '--repeats', '1', '--warmup', '0', '--ceiling_size', '512',
                     '--residual_dtype', 'bfloat16', '--kernels', 'xla', '--json', str(path)]) == 0
  table = capsys.readouterr().out
  assert 'eval' in table and 'train' in table and 'ceiling' in table
  assert '(bfloat16 stream)' in table
  result = json.loads(path.read_text())
  assert result['variant'] == 'rmt_tiny' and result['batch'] == 2
  assert result['residual_dtype'] == 'bfloat16'
  assert result['kernels'] == 'xla'  # not the CPU forms 'auto' would take here
  assert result['ceiling']['flops_per_s'] > 0 and math.isfinite(result['ceiling']['flops_per_s'])
  assert result['host_peak_bytes'] > 0
  for mode in ('eval', 'train'):
    r = result[mode]
    for key in ('images_per_s', 'seconds', 'compile_s', 'model_flops', 'xla_flops',
                'model_flops_per_s', 'xla_flops_per_s'):
      assert r[key] > 0 and math.isfinite(r[key]), (mode, key, r[key])
    for key in ('model_fraction_of_ceiling', 'xla_fraction_of_ceiling'):
      assert 0 < r[key] <= MAX_FRACTION, (mode, key, r[key])
    assert math.isclose(r['images_per_s'] * r['seconds'], 2, rel_tol=1e-9)
    assert r['cpu_user_s'] >= 0 and r['cpu_kernel_s'] >= 0 and r['page_faults'] >= 0
    assert f'{mode} per call, whole process:' in table
  # A training step costs more than the forward pass it contains.
  assert result['train']['xla_flops'] > 2 * result['eval']['xla_flops']
  assert result['train']['model_flops'] == 3 * result['eval']['model_flops']
  assert result['host_allocator'] in ('libc', 'tcmalloc', 'jemalloc', 'mimalloc')


def _result_with_kernel_time(allocator, kernel_s, user_s=1.0):
  row = {'images_per_s': 1.0, 'seconds': 1.0, 'model_flops_per_s': 1e9,
         'model_fraction_of_ceiling': 0.5, 'xla_flops_per_s': 1e9, 'xla_fraction_of_ceiling': 0.5,
         'compile_s': 1.0, 'compiled_bytes': None, 'cpu_user_s': user_s,
         'cpu_kernel_s': kernel_s, 'page_faults': 7e5}
  return {'variant': 'rmt_t', 'batch': 16, 'resolution': 224, 'dtype': 'float32', 'remat': False,
          'device': 'cpu: cpu', 'cpus': 2, 'jax': '0', 'repeats': 1, 'load_average': None,
          'host_allocator': allocator, 'host_peak_bytes': 1, 'device_peak_bytes': None,
          'forward_model_flops_per_image': 1e9,
          'ceiling': {'size': 2048, 'flops_per_s': 2e11, 'seconds': 0.1, 'all_seconds': [0.1],
                      'median_flops_per_s': 2e11},
          'train': row}


def test_allocator_hint_only_for_libc_runs_that_fault():
  assert 'tcmalloc' in bench.format_table(_result_with_kernel_time('libc', kernel_s=1.4))
  assert 'note:' not in bench.format_table(_result_with_kernel_time('tcmalloc', kernel_s=1.4))
  assert 'note:' not in bench.format_table(_result_with_kernel_time('libc', kernel_s=0.01))


def test_unknown_variant_is_a_usage_error(capsys):
  assert bench.main(['--variant', 'rmt_xl']) == 2
  assert 'rmt_tiny' in capsys.readouterr().err


def test_bench_splits_the_batch_over_two_cpu_devices(tmp_path):
  # A subprocess: the CPU backend takes its device count once, before it starts.
  path = tmp_path / 'bench.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'rmt_jax.bench', '--variant', 'rmt_tiny', '--batch', '4',
       '--resolution', '64', '--repeats', '1', '--warmup', '0', '--ceiling_size', '256',
       '--devices', '2', '--json', str(path)],
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'x 2 devices' in proc.stdout and 'split over the devices' in proc.stdout
  result = json.loads(path.read_text())
  assert result['num_devices'] == 2
  c = result['ceiling']
  assert c['flops_per_s'] == max(c['one_device_flops_per_s'], c['split_flops_per_s']) > 0
  for mode in ('eval', 'train'):
    r = result[mode]
    assert r['images_per_s'] > 0 and 0 < r['model_fraction_of_ceiling'] <= MAX_FRACTION
  # cost_analysis() counts one device's share; the report counts the whole batch, which the
  # network's own multiply-accumulates bound from below.
  assert 0.9 < result['eval']['xla_flops'] / result['eval']['model_flops'] < 1.5


def test_bench_device_errors_are_one_line(capsys):
  local = len(jax.local_devices())
  with pytest.raises(ValueError, match='local devices'):
    bench.check_devices(local + 1, 16)
  # This process's backend has started: its CPU device count can no longer change.
  assert bench.main(['--variant', 'rmt_tiny', '--devices', str(local + 1)]) == 2
  assert capsys.readouterr().err.startswith('error: --devices')
  proc = subprocess.run(
      [sys.executable, '-m', 'rmt_jax.bench', '--variant', 'rmt_tiny', '--batch', '3',
       '--devices', '2'], capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == 'error: batch 3 does not split over 2 devices'
