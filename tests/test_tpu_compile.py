"""`python -m rmt_jax.tpu_compile` on a tiny config, compiled for a TPU v5p slice on this CPU host.

Needs libtpu, which no runtime requirement installs: the README's slow-lane command installs it into
`.venv/libtpu` (requirements-tpu.txt), a folder that ordinary runs never put on their path;
`RMT_LIBTPU_DIR` points elsewhere, and a libtpu importable from the environment is used too.
Without one, the tests that compile are skipped with that reason.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, libtpu_env, needs_libtpu


@needs_libtpu
def test_tiny_config_compiles_for_a_v5p_slice_and_reports_its_cost(tmp_path):
  out = tmp_path / 'tiny.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'rmt_jax.tpu_compile', '--config', 'configs/tiny_test.py',
       '--topology', 'v5p:2x2x1', '--batch_per_chip', '4', '--json', str(out), '--traffic',
       # The bfloat16 stream: the projection kernel reads it (the float32 one is compiled in
       # tests/test_tpu_projections.py).
       '--config.residual_dtype=bfloat16'],
      cwd=REPO, env=libtpu_env(True), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert (result['chip'], result['chips'], result['devices']) == ('v5p', 4, 4)
  assert result['global_batch'] == 16 and result['mesh'] == {'data': 4, 'fsdp': 1}
  # 'auto' kernels resolve to the TPU's forms although this host is a CPU.
  assert result['kernels'] == 'tpu'
  assert result['residual_dtype'] == 'bfloat16' and '(bfloat16 residual stream)' in proc.stdout
  for step, passes in (('train', 6), ('eval', 4)):
    entry = result[step]
    assert entry['fits'] and 0 < entry['memory_per_chip'] < result['hbm_per_chip']
    assert entry['model_flops_per_chip'] == passes * result['macs_per_image'] * 16 / 4
    assert entry['xla_flops_per_chip'] > 0.5 * entry['model_flops_per_chip']
    assert entry['estimated_step_seconds'] > 0
    assert 0 < entry['estimated_utilisation'] < 1
    # The physical estimate: every kernel that compiled is counted, and the step is the
    # kernels' estimate plus XLA's for the rest.
    physical = entry['physical']
    assert physical['pallas_calls'] == physical['custom_calls'] > 0
    assert physical['chip']['name'] == 'v5p' and physical['kernel_seconds'] > 0
    assert entry['physical_step_seconds'] == pytest.approx(
        physical['kernel_seconds'] + max(entry['estimated_step_seconds']
                                         - physical['kernel_xla_seconds'], 0))
    assert 0 < entry['physical_utilisation'] < 1
    # Free vector work bounds what reworking it can reach, from above.
    assert physical['step_seconds_without_vector'] <= entry['physical_step_seconds']
    assert entry['physical_utilisation'] <= entry['physical_utilisation_without_vector'] < 1
  assert "train: with the kernels' vector work free" in proc.stdout
  assert '| train |' in proc.stdout and '| eval |' in proc.stdout
  assert 'estimates, not a measurement' in proc.stdout and 'physical est. step ms' in proc.stdout
  assert 'train: Pallas kernels per device on v5p' in proc.stdout

  # Where the traffic goes: the real program's operations, attributed to the model's layers.
  for step in ('train', 'eval'):
    traffic = result[step]['traffic']
    layers = {row['layer']: row for row in traffic['by_layer']}
    # The Pallas kernels (MaSA's steps, `retention.first_half` and `retention.attend`: the
    # block's first half, attention and LePE; the block's second half) and XLA's own
    # operations; `pos` and LePE only inside the kernels.
    assert {'retention.first_half (Pallas kernel)', 'retention.attend (Pallas kernel)',
            'second_half (Pallas kernel)', 'patch_embed'} <= set(layers)
    assert not {'pos', 'retention/lepe'} & set(layers)
    assert sum(r['forward_bytes'] + r['backward_bytes'] for r in traffic['by_layer']) == (
        traffic['bytes'])
    assert {row['stage'] for row in traffic['by_stage']} == {0, 1, 2}  # two stages
    # The accounting and XLA's own count of the program's bytes agree to within a factor 2.
    xla_bytes = result[step]['bytes_accessed_per_chip']
    assert 0.5 * xla_bytes < traffic['bytes'] < 2 * xla_bytes
  assert sum(r['backward_bytes'] for r in result['train']['traffic']['by_layer']) > 0
  assert sum(r['backward_bytes'] for r in result['eval']['traffic']['by_layer']) == 0
  assert "train: Array traffic of the compiled program" in proc.stdout


@needs_libtpu
def test_a_train_step_that_augments_on_the_device_compiles_with_uint8_crops(tmp_path):
  out = tmp_path / 'tiny.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'rmt_jax.tpu_compile', '--config', 'configs/tiny_test.py',
       '--topology', 'v5p:2x2x1', '--batch_per_chip', '4', '--json', str(out), '--mode', 'train',
       '--config.data.augment_on=device', '--config.data.randaugment=rand-m9-mstd0.5-inc1',
       '--config.data.reprob=0.25', '--config.data.mixup=0.8', '--config.data.cutmix=1.0'],
      cwd=REPO, env=libtpu_env(True), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['augment_on'] == 'device' and 'augmentation on the device' in proc.stdout
  assert result['train']['estimated_step_seconds'] > 0


@needs_libtpu
def test_one_block_compiles_for_one_device_and_reports_its_cost(tmp_path):
  out = tmp_path / 'block.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'rmt_jax.tpu_compile', '--config', 'configs/tiny_test.py',
       '--topology', 'v5p:2x2x1', '--batch_per_chip', '4', '--block', '2', '--traffic',
       '--json', str(out)],
      cwd=REPO, env=libtpu_env(True), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  size = json.loads(subprocess.run(
      [sys.executable, '-c', 'from configs import tiny_test; import json; c = '
       'tiny_test.get_config(); print(json.dumps([c.data.image_size, c.model]))'],
      cwd=REPO, env=libtpu_env(False), capture_output=True, text=True, timeout=120,
      check=True).stdout)
  # Stage 2 of the tiny model: the stem's /4, then /2, of the config's image size.
  assert result['map'][:2] == [-(-size[0] // 8)] * 2 and result['model'] == size[1]
  assert (result['stage'], result['images'], result['kernels']) == (2, 4, 'tpu')
  assert result['estimated_seconds'] > 0 and result['flops'] > 0
  assert result['physical_seconds'] > 0
  assert result['physical']['custom_calls'] == result['physical']['pallas_calls'] > 0
  layers = {row['layer'] for row in result['traffic']['by_layer']}
  # `pos` and LePE run inside MaSA's kernels (`tpu_block_head`, `tpu_lepe`).
  assert {'retention.first_half (Pallas kernel)', 'retention.attend (Pallas kernel)',
          'second_half (Pallas kernel)'} <= layers
  assert not {'pos', 'retention/lepe'} & layers
  assert 'stage-2 block' in proc.stdout and 'not measurements' in proc.stdout
  assert 'physical estimate' in proc.stdout


@needs_libtpu
def test_every_kernel_of_a_block_stays_in_the_compiled_program(tmp_path):
  # Stage 1 of the tiny model is axial (row and column passes). The program returns the block's
  # output beside its cotangents: with the cotangents alone XLA dropped the second half's forward
  # kernel (9 custom calls compiled of the 10 Pallas calls traced).
  out = tmp_path / 'block.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'rmt_jax.tpu_compile', '--config', 'configs/tiny_test.py',
       '--topology', 'v5p:2x2x1', '--batch_per_chip', '4', '--block', '1', '--json', str(out)],
      cwd=REPO, env=libtpu_env(True), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  physical = json.loads(out.read_text())['physical']
  # The first half (block head, the row and the column pass of attention, LePE) and the second
  # half, each forward and backward.
  assert physical['custom_calls'] == physical['pallas_calls'] == 10
  assert 'warning' not in proc.stderr
  kernels = {row['kernel'] for row in physical['by_kernel']}
  assert {'block_tail._forward_kernel', 'block_tail._backward_kernel',
          'attention._column_kernel'} <= kernels



@needs_libtpu
def test_kernels_xla_compiles_no_kernel(tmp_path):
  # `--config.kernels=xla` is obeyed: the plain forms, although the slice is a TPU's.
  out = tmp_path / 'block.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'rmt_jax.tpu_compile', '--config', 'configs/tiny_test.py',
       '--topology', 'v5p:2x2x1', '--batch_per_chip', '4', '--block', '1', '--json', str(out),
       '--config.kernels=xla'],
      cwd=REPO, env=libtpu_env(True), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['kernels'] == 'xla' and result['estimated_seconds'] > 0
  assert result['physical']['custom_calls'] == result['physical']['pallas_calls'] == 0

@needs_libtpu
def test_libtpu_on_the_path_leaves_cpu_runs_alone():
  # libtpu probes for a TPU when jax starts: on a CPU host that must fail fast and fall back.
  code = 'import jax; print(jax.default_backend(), len(jax.devices()))'
  proc = subprocess.run([sys.executable, '-c', code], env=libtpu_env(True), capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[0] == 'cpu'


def test_without_libtpu_the_command_says_how_to_install_it():
  if importlib.util.find_spec('libtpu') is not None:
    pytest.skip('libtpu is importable from this environment')
  proc = subprocess.run(
      [sys.executable, '-m', 'rmt_jax.tpu_compile', '--config', 'configs/tiny_test.py',
       '--topology', 'v5p:2x2x1'], cwd=REPO, env=libtpu_env(False), capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 1
  assert "error: libtpu is not installed: pip install 'libtpu==0.0.42.*'" in proc.stderr
  assert 'Traceback' not in proc.stderr
