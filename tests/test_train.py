"""Tests of rmt_jax.train.steps and rmt_jax.train.loop: the train step's EMA, gradient
accumulation and loss; eval masking; fine-tuning's head rule; that the steps and the configs
import no TensorFlow; the official recipe in the configs; the loop's stop on a non-finite loss
and its save on preemption (with a fake step: nothing compiled); eval-only's preprocessing (the
one stored with the weights)."""

import math
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rmt_jax.train import metrics_writer
from rmt_jax.train import loop
from rmt_jax.train import optim
from rmt_jax.train import steps

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_soft_target_cross_entropy_hand_value():
  logits = jnp.array([[2.0, 0.0, 0.0]])
  targets = jnp.array([[0.9, 0.05, 0.05]])
  log_z = math.log(math.exp(2) + 2)
  want = -(0.9 * (2 - log_z) + 0.1 * (0 - log_z))
  assert float(steps.soft_target_cross_entropy(logits, targets)[0]) == pytest.approx(want)


class _Toy(nn.Module):
  """Dense -> (BatchNorm) -> Dense: compiles in well under a second."""
  num_classes: int = 3
  use_bn: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4, name='fc')(x.reshape(x.shape[0], -1))
    if self.use_bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='norm')(x)
    return nn.Dense(self.num_classes, name='head')(nn.relu(x))


def _toy_setup(use_bn=True, lr=0.1):
  model = _Toy(use_bn=use_bn)
  tx = optax.adamw(lr, weight_decay=0.05, mask=optim.weight_decay_mask)
  state = steps.init_state(jax.random.PRNGKey(0), model, tx, image_size=2)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(8, 2, 2, 3)), jnp.float32),
           'label': jax.nn.one_hot(rng.integers(0, 3, 8), 3)}
  return model, tx, state, batch


def test_train_step_updates_ema_as_timm():
  model, tx, state, batch = _toy_setup()
  new, metrics = steps.train_step(state, batch, model=model, tx=tx, ema=0.75)
  assert int(new.step) == 1 and np.isfinite(float(metrics['loss']))
  for ema, old, cur in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(state.params),
                           jax.tree.leaves(new.params)):
    np.testing.assert_allclose(ema, 0.75 * old + 0.25 * cur, rtol=1e-6, atol=1e-7)
  for ema, old, cur in zip(jax.tree.leaves(new.ema_batch_stats),
                           jax.tree.leaves(state.batch_stats),
                           jax.tree.leaves(new.batch_stats)):
    np.testing.assert_allclose(ema, 0.75 * old + 0.25 * cur, rtol=1e-6, atol=1e-7)
  # The running statistics did move (BatchNorm ran in train mode).
  assert not np.allclose(new.batch_stats['norm']['mean'], state.batch_stats['norm']['mean'])


def test_gradient_accumulation_matches_the_whole_batch():
  # Without BatchNorm the micro-batches' mean gradient is the whole batch's gradient.
  model, tx, state, batch = _toy_setup(use_bn=False, lr=1e-3)
  whole, m1 = steps.train_step(state, batch, model=model, tx=tx, ema=0.0)
  accum, m2 = steps.train_step(state, batch, model=model, tx=tx, ema=0.0, accum_steps=4)
  assert float(m2['loss']) == pytest.approx(float(m1['loss']), rel=1e-6)
  for a, b in zip(jax.tree.leaves(accum.params), jax.tree.leaves(whole.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_eval_step_ignores_padding():
  model, _, state, batch = _toy_setup()
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
  full = steps.eval_step(model, {'raw': variables},
                          {'image': batch['image'][:5], 'label': labels[:5],
                           'mask': jnp.ones(5)})['raw']
  padded = steps.eval_step(model, {'raw': variables},
                            {'image': batch['image'], 'label': labels,
                             'mask': jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)})['raw']
  for key in ('loss', 'top1', 'top5', 'count'):
    assert float(padded[key]) == pytest.approx(float(full[key]), rel=1e-6)
  assert float(padded['count']) == 5
  assert float(padded['top5']) == 5  # 3 classes: the label is always among the top 5.


def test_merge_weights_reinitialises_a_head_of_another_size():
  fresh = {'fc': {'kernel': np.zeros((3, 4))}, 'head': {'kernel': np.zeros((4, 10))}}
  loaded = {'fc': {'kernel': np.ones((3, 4))}, 'head': {'kernel': np.ones((4, 1000))}}
  merged = steps.merge_weights(fresh, loaded)
  np.testing.assert_array_equal(merged['fc']['kernel'], 1)
  np.testing.assert_array_equal(merged['head']['kernel'], 0)  # Fresh: 10 != 1000 classes.
  same = steps.merge_weights(fresh, {'fc': loaded['fc'], 'head': {'kernel': np.ones((4, 10))}})
  np.testing.assert_array_equal(same['head']['kernel'], 1)
  forced = steps.merge_weights(fresh, {'fc': loaded['fc'],
                                        'head': {'kernel': np.ones((4, 10))}}, reinit_head=True)
  np.testing.assert_array_equal(forced['head']['kernel'], 0)


def test_merge_weights_lists_what_does_not_fit():
  fresh = {'fc': {'kernel': np.zeros((3, 4)), 'bias': np.zeros(4)}, 'head': {}}
  loaded = {'fc': {'kernel': np.ones((3, 5))}, 'extra': {'kernel': np.ones(2)}}
  with pytest.raises(ValueError) as info:
    steps.merge_weights(fresh, loaded)
  message = str(info.value)
  assert 'fc/bias' in message and 'extra/kernel' in message and '(3, 5) != (3, 4)' in message


def _imports_tensorflow(code: str) -> bool:
  """Whether running `code` in a fresh interpreter (in the repository) imports TensorFlow."""
  check = textwrap.dedent(code) + "\nimport sys\nprint('tensorflow' in sys.modules)\n"
  proc = subprocess.run([sys.executable, '-c', check], cwd=REPO, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.strip().splitlines()[-1] == 'True'


def test_the_steps_import_no_tensorflow():
  """Benchmarks, AOT compiles and notebooks take the steps without the input pipeline."""
  assert not _imports_tensorflow('from rmt_jax.train import steps')
  assert _imports_tensorflow('from rmt_jax.train import loop')  # The check can fail.


def test_reading_a_config_imports_no_tensorflow():
  assert not _imports_tensorflow('''
      from configs import rmt_s
      assert rmt_s.get_config().data.image_size == 224
  ''')


def test_configs_hold_the_official_recipe():
  for variant, drop_path in (('rmt_t', 0.1), ('rmt_s', 0.15), ('rmt_b', 0.4), ('rmt_l', 0.5)):
    config = __import__(f'configs.{variant}', fromlist=['get_config']).get_config()
    assert config.model == variant and config.drop_path_rate == drop_path
    assert config.global_batch_size == 2048 and config.num_epochs == 300
    assert (config.base_lr, config.weight_decay, config.warmup_epochs) == (5e-4, 0.05, 5)
    assert (config.warmup_lr, config.min_lr, config.eps) == (1e-6, 1e-5, 1e-8)
    assert config.data.label_smoothing == 0.1 and config.data.mixup == 0.8
    assert config.data.augment_on == 'device'  # The host decodes and crops; the step the rest.
    config.num_classes = 100  # One number for the head and the targets.
    assert config.data.num_classes == 100



class _FakeCheckpointer:
  """Records saves; what the loop needs of a `checkpoint.TrainCheckpointer`."""
  directory = 'fake'

  def __init__(self):
    self.saved = []

  def save(self, step, state, data_state, meta):
    del state, data_state, meta
    self.saved.append(step)

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def wait_until_finished(self):
    pass


class _FakeIterator:
  def __next__(self):
    return {}

  def get_state(self):
    return {}


class _Preempted:
  def __init__(self, at_step):
    self.at_step = at_step

  def reached(self, step):
    return step == self.at_step


def _run_loop(tmp_path, losses, preempt_at=None):
  """`loop._run_loop` with a fake step whose losses are given: no model, nothing compiled."""
  config = ml_collections.ConfigDict(dict(
      log_every_steps=100, global_batch_size=8, eval_every_epochs=100,
      checkpoint_every_steps=2, checkpoint_every_epoch=False))
  fake_step = lambda state, batch: (state + 1, {'loss': jnp.float32(losses[state]),
                                                'grad_norm': jnp.float32(1.0)})
  ckpt = _FakeCheckpointer()
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  try:
    setup = loop.LoopSetup(
        config=config, total_steps=len(losses), steps_per_epoch=100,
        train_batches=_FakeIterator(), train_step=fake_step, evaluate=None,
        learning_rate=lambda step: 0.1, checkpointer=ckpt, checkpoint_metadata={},
        writer=writer, preemption=_Preempted(preempt_at))
    result = loop._run_loop(setup, state=0, step=0)  # pylint: disable=protected-access
  finally:
    writer.close()
  return result, ckpt


def test_non_finite_loss_stops_with_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(loop.NonFiniteLossError, match='at step 3;.*last good checkpoint is step 2'):
    _run_loop(tmp_path, [2.0, 1.5, np.nan, 1.0, 1.0, 1.0])
  with pytest.raises(loop.NonFiniteLossError, match='at step 4;'):
    _run_loop(tmp_path, [2.0, 1.5, 1.2, np.inf, 1.0, 1.0])


def test_loop_saves_and_returns_when_preempted(tmp_path):
  result, ckpt = _run_loop(tmp_path, [2.0] * 10, preempt_at=3)
  assert result['preempted'] and result['step'] == 3
  assert ckpt.saved == [2, 3]


def test_eval_only_preprocesses_as_the_weights_say(tmp_path, monkeypatch):
  """Eval-only feeds the eval split through the preprocessing stored with init_from (24 px at
  crop_pct 0.9, bilinear, where the config says 16 px at 1.0), or config.data's when
  eval_only_preprocessing says 'config'."""
  # pylint: disable=g-import-not-at-top
  from configs import tiny_test
  from rmt_jax.weights import checkpoint
  # pylint: enable=g-import-not-at-top
  from rmt_jax.data import eval_preprocessing
  # pylint: enable=g-import-not-at-top
  from rmt_jax.data import input_pipeline
  # pylint: enable=g-import-not-at-top
  config = tiny_test.get_config()
  model = steps.build_model(config)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  stored = eval_preprocessing.EvalPreprocessing(image_size=24, crop_pct=0.9,
                                                interpolation='bilinear')
  checkpoint.save_variables(tmp_path / 'w', variables, {
      'model': config.model, 'model_overrides': steps.model_overrides(config),
      eval_preprocessing.METADATA_KEY: stored.to_metadata()})
  seen = []

  def eval_iterator(data, global_batch_size, mesh_sharding):
    del mesh_sharding
    seen.append(eval_preprocessing.from_config(data))
    size = data.image_size
    return [{'image': np.zeros((global_batch_size, size, size, 3), np.float32),
             'label': np.zeros(global_batch_size, np.int32),
             'mask': np.ones(global_batch_size, np.float32)}]

  monkeypatch.setattr(input_pipeline, 'create_eval_iterator', eval_iterator)
  config.eval_only, config.init_from, config.eval_batch_size = True, str(tmp_path / 'w'), 2
  assert loop.train_and_evaluate(config, str(tmp_path / 'eval'))['count'] == 2
  config.eval_only_preprocessing = 'config'
  loop.train_and_evaluate(config, str(tmp_path / 'eval_config'))
  assert seen == [stored, eval_preprocessing.from_config(config.data)]
  assert seen[1].image_size == 16


def test_every_program_of_a_run_takes_the_configs_kernels():
  # Training, eval-only and tpu_compile build their models through `steps.kernel_forms_for`.
  from configs import tiny_test  # pylint: disable=g-import-not-at-top
  config = tiny_test.get_config()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  for field, want in (('auto', 'cpu'), ('xla', 'xla'), ('tpu', 'tpu'), ('cpu', 'cpu')):
    config.kernels = field
    assert steps.kernel_forms_for(config, mesh) == want
    assert steps.build_model(config, mesh).kernels == want
  assert steps.kernel_forms_for(config, None) == 'cpu'
  config.kernels = 'gpu'
  with pytest.raises(ValueError, match="kernels must be one of 'auto', 'xla', 'cpu', 'tpu'"):
    steps.build_model(config, mesh)
