"""The recipe inside the train step (`rmt_jax.train.device_augment`): each device augments its
own share with its own key, the step equals the host-format step on the augmented batch (with
gradient accumulation, on a mesh), and a tiny run augmenting on the device trains and resumes
bit for bit."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from rmt_jax.train import device_augment
from rmt_jax.weights import checkpoint
from conftest import programs_built_once_without_evaluation  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_script(script: str, devices: int) -> str:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu',
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0'
                        f' --xla_force_host_platform_device_count={devices}'))
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(script)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_train_batch_spec_follows_augment_on():
  from configs import tiny_test  # pylint: disable=g-import-not-at-top
  config = tiny_test.get_config()
  host = device_augment.train_batch_spec(config, 8)
  assert host['image'].dtype == np.float32 and host['label'].shape == (8, 10)
  config.data.augment_on = 'device'
  device = device_augment.train_batch_spec(config, 8)
  assert device['image'].dtype == np.uint8 and device['image'].shape == (8, 16, 16, 3)
  assert device['label'].dtype == np.int32 and device['label'].shape == (8,)
  config.data.augment_on = 'tpu'
  with pytest.raises(ValueError, match="'host' or 'device'"):
    device_augment.on_device(config)


# Each of 4 devices (a 2 x 2 mesh) gets the same two crops: their outputs differ only by the
# key, which must be the step's key folded with the device's index along the batch axes.
_SHARDS = '''
    import jax, numpy as np, ml_collections
    jax.config.update('jax_default_prng_impl', 'rbg')
    from rmt_jax.data import batch_augment, policies
    from rmt_jax.train import device_augment, sharding
    mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': 2, 'fsdp': 2}))
    # Without RandAugment: it compiles in seconds, and the shard_map is what is tested.
    recipe = batch_augment.BatchRecipe(randaugment=None, reprob=1.0,
                                       mixup=policies.MixupConfig(num_classes=10))
    augment = device_augment.DeviceAugment(recipe, 'gather', mesh)
    rng = np.random.default_rng(0)
    crops = np.tile(rng.integers(0, 256, (2, 8, 8, 3), np.uint8), (4, 1, 1, 1))
    labels = np.tile(np.asarray([3, 7], np.int32), 4)
    key = device_augment.step_key(jax.random.PRNGKey(1), 5)
    batch_sh = sharding.batch_sharding(mesh)
    out = jax.jit(augment)({'image': jax.device_put(crops, batch_sh),
                            'label': jax.device_put(labels, batch_sh)}, key)
    assert out['image'].sharding.spec == batch_sh.spec
    want = jax.jit(lambda x, y, k: [augment.shard(x, y, k, i) for i in range(4)])(
        crops[:2], labels[:2], key)
    images, targets = np.asarray(out['image']), np.asarray(out['label'])
    for i, (image, target) in enumerate(want):
      np.testing.assert_array_equal(images[2 * i:2 * i + 2], image)
      np.testing.assert_array_equal(targets[2 * i:2 * i + 2], target)
    for i in range(4):
      for j in range(i):
        assert not np.array_equal(images[2 * i:2 * i + 2], images[2 * j:2 * j + 2]), (i, j)
    print('ok')
'''


def test_each_device_augments_its_own_share_with_its_own_key():
  assert _run_script(_SHARDS, devices=4).strip().endswith('ok')


# On 4 devices with 2 micro-batches: the step that augments equals the host-format step fed
# the same augmentation, done outside; the loss is finite.
_STEP = '''
    import jax, numpy as np, ml_collections
    jax.config.update('jax_default_prng_impl', 'rbg')
    from configs import tiny_test
    from rmt_jax.train import device_augment, sharding, steps
    config = tiny_test.get_config()
    config.global_batch_size = 16
    config.grad_accum_steps = 2
    config.data.update(augment_on='device', hflip=0.5, randaugment='rand-m9-mstd0.5-inc1',
                       reprob=0.25, mixup=0.8, cutmix=1.0)
    mesh = sharding.create_mesh(config.mesh)
    programs = steps.build_programs(config, mesh, steps_per_epoch=10, total_steps=10)
    host = config.copy_and_resolve_references()
    host.data.augment_on = 'host'
    host_programs = steps.build_programs(host, mesh, steps_per_epoch=10, total_steps=10)
    augment = device_augment.DeviceAugment.for_run(config, mesh)
    assert augment.mesh is mesh and augment.form == 'gather'
    rng = np.random.default_rng(0)
    batch_sh = programs.batch_sharding
    state = jax.jit(programs.init_fn, out_shardings=programs.state_shardings)()
    state_host = jax.jit(programs.init_fn, out_shardings=programs.state_shardings)()
    losses = []
    for step in range(2):
      crops = {'image': jax.device_put(rng.integers(0, 256, (16, 16, 16, 3), np.uint8), batch_sh),
               'label': jax.device_put(rng.integers(0, 10, 16).astype(np.int32), batch_sh)}
      augmented = jax.jit(augment)(crops, device_augment.step_key(state_host.rng, step))
      state, metrics = programs.train_step(state, crops)
      state_host, metrics_host = host_programs.train_step(state_host, augmented)
      loss, loss_host = float(metrics['loss']), float(metrics_host['loss'])
      assert np.isfinite(loss) and abs(loss - loss_host) <= 1e-5 * abs(loss_host), (loss, loss_host)
      losses.append(loss)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state_host.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    print('ok', losses)
'''


@pytest.mark.slow
def test_the_step_augments_on_a_mesh_with_accumulation_as_the_host_format_step():
  assert _run_script(_STEP, devices=4).strip().startswith('ok')


@pytest.fixture(name='device_run', scope='module')
def _device_run(tmp_path_factory):
  """A finished 4-step run of configs/tiny_test.py with the whole recipe on the device
  (checkpoints 2 and 4), its programs kept for the resumed run below."""
  from configs import tiny_test  # pylint: disable=g-import-not-at-top
  from rmt_jax.train import loop  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('device_run')
  config = tiny_test.get_config()
  config.data.digits_dir = str(root / 'digits')
  config.data.update(augment_on='device', hflip=0.5, randaugment='rand-m9-mstd0.5-inc1',
                     reprob=0.25, mixup=0.8, cutmix=1.0)
  config.async_checkpoints = False
  with programs_built_once_without_evaluation():
    workdir = root / 'run'
    result = loop.train_and_evaluate(config, str(workdir))
    yield config, workdir, result, loop


@pytest.mark.slow
def test_a_tiny_run_augmenting_on_the_device_trains_and_resumes_bit_for_bit(device_run,
                                                                            tmp_path):
  config, finished, result, loop = device_run
  assert result['step'] == 4 and np.isfinite(result['train_loss'])
  want, _ = checkpoint.load_train_state(finished, 4)
  start, _ = checkpoint.load_train_state(finished, 2)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(want['params']), jax.tree.leaves(start['params'])))
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  shutil.rmtree(workdir / 'checkpoints' / '4')
  loop.train_and_evaluate(config, str(workdir))  # Resumes at step 2.
  got, meta = checkpoint.load_train_state(workdir)
  assert meta['step'] == 4
  for name in ('params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats', 'rng'):
    for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=name)  # Bit for bit.
