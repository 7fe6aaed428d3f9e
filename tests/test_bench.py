"""The benchmark command runs on the tiny variant and reports sane numbers (no timing asserts)."""

import json
import math

from rmt_jax import bench

# A fraction of the ceiling above this means the FLOP count or the timing is wrong; a real
# computation of either kind cannot run several times faster than a large matmul.
MAX_FRACTION = 5.0


def test_bench_command_prints_table_and_sane_json(tmp_path, capsys):
  path = tmp_path / 'bench.json'
  assert bench.main(['--variant', 'rmt_tiny', '--batch', '2', '--resolution', '64',
                     '--repeats', '1', '--warmup', '0', '--ceiling_size', '512',
                     '--json', str(path)]) == 0
  table = capsys.readouterr().out
  assert 'eval' in table and 'train' in table and 'ceiling' in table
  result = json.loads(path.read_text())
  assert result['variant'] == 'rmt_tiny' and result['batch'] == 2
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
  # A training step costs more than the forward pass it contains.
  assert result['train']['xla_flops'] > 2 * result['eval']['xla_flops']
  assert result['train']['model_flops'] == 3 * result['eval']['model_flops']


def test_unknown_variant_is_a_usage_error(capsys):
  assert bench.main(['--variant', 'rmt_xl']) == 2
  assert 'rmt_tiny' in capsys.readouterr().err
