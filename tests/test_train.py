"""Tests of rmt_jax.train: the weight-decay mask, the learning-rate schedule and the EMA decay
against hand-computed values; the train step's EMA, accumulation and loss; eval masking;
fine-tuning's head rule."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import common
from rmt_jax import train
from rmt_jax.models import create_model


def _abstract_params(name='rmt_b', **overrides):
  model = create_model(name, **overrides)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 64, 64, 3))))
  return variables['params']


def test_weight_decay_mask_follows_timm():
  flat = traverse_util.flatten_dict(train.weight_decay_mask(_abstract_params('rmt_tiny')))
  by_name = {'/'.join(k): v for k, v in flat.items()}
  # Dense and conv kernels, depthwise ones included (4-d in PyTorch): decayed.
  for path in ('head/kernel', 'proj/kernel', 'patch_embed/proj_0/kernel',
               'layers_0/blocks_0/retention/q_proj/kernel',
               'layers_0/blocks_0/retention/lepe/kernel', 'layers_0/blocks_0/pos/kernel',
               'layers_0/blocks_0/ffn/dwconv/kernel', 'layers_0/downsample/reduction/kernel'):
    assert by_name[path] is True, path
  # Biases, LayerNorm and BatchNorm scales: not decayed.
  for path in ('head/bias', 'norm/scale', 'norm/bias', 'patch_embed/proj_1/scale',
               'layers_0/blocks_0/retention_layer_norm/scale',
               'layers_0/blocks_0/retention/lepe/bias', 'layers_0/downsample/norm/scale'):
    assert by_name[path] is False, path
  # Layer scale: timm decays the official (1, 1, 1, C) gammas.
  assert by_name['layers_3/blocks_0/gamma_1'] is True
  assert by_name['layers_3/blocks_0/gamma_2'] is True
  exempt = traverse_util.flatten_dict(
      train.weight_decay_mask(_abstract_params('rmt_tiny'), decay_layer_scale=False))
  assert exempt[('layers_3', 'blocks_0', 'gamma_1')] is False
  # The rule is "ndim > 1 in PyTorch": every decayed leaf is a kernel or a gamma, every
  # kernel is decayed, and nothing else is.
  params = traverse_util.flatten_dict(_abstract_params('rmt_tiny'))
  for key, decayed in flat.items():
    torch_ndim = 4 if key[-1].startswith('gamma_') else len(params[key].shape)
    assert decayed == (torch_ndim > 1 and key[-1] != 'bias'), key


def test_weight_decay_mask_counts_on_rmt_b():
  mask = traverse_util.flatten_dict(train.weight_decay_mask(_abstract_params('rmt_b')))
  gammas = [k for k in mask if k[-1].startswith('gamma_')]
  # Layer scale is on in stages 3 and 4: (25 + 8) blocks x 2 gammas.
  assert len(gammas) == 66 and all(mask[k] for k in gammas)


def test_learning_rate_schedule_hand_values():
  config = common.get_config('rmt_s')  # base 5e-4, batch 2048, warmup 5 epochs from 1e-6.
  schedule = train.learning_rate_schedule(config, steps_per_epoch=10, total_steps=300)
  assert train.peak_learning_rate(config) == pytest.approx(2e-3)
  expected = {
      0: 1e-6,
      25: 1e-6 + (2e-3 - 1e-6) * 25 / 50,  # Halfway through the warmup: 1.0005e-3.
      49: 1e-6 + (2e-3 - 1e-6) * 49 / 50,
      50: 1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi / 6)),  # 1.866695e-3.
      150: 1e-5 + 0.5 * (2e-3 - 1e-5),  # Half of the cosine: 1.005e-3.
      300: 1e-5,
  }
  assert expected[50] == pytest.approx(1.866695e-3, rel=1e-6)
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-5), step


def test_ema_decay_hand_values():
  config = common.get_config('rmt_s')
  assert train.ema_decay(config) == pytest.approx(0.99984001, abs=1e-9)  # 0.99996 ** 4.
  config.global_batch_size = 512
  assert train.ema_decay(config) == pytest.approx(0.99996, abs=1e-12)
  config.ema_decay = 0.0
  assert train.ema_decay(config) == 0.0


def test_soft_target_cross_entropy_hand_value():
  logits = jnp.array([[2.0, 0.0, 0.0]])
  targets = jnp.array([[0.9, 0.05, 0.05]])
  log_z = math.log(math.exp(2) + 2)
  want = -(0.9 * (2 - log_z) + 0.1 * (0 - log_z))
  assert float(train.soft_target_cross_entropy(logits, targets)[0]) == pytest.approx(want)


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
  tx = optax.adamw(lr, weight_decay=0.05, mask=train.weight_decay_mask)
  state = train.init_state(jax.random.PRNGKey(0), model, tx, image_size=2)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(8, 2, 2, 3)), jnp.float32),
           'label': jax.nn.one_hot(rng.integers(0, 3, 8), 3)}
  return model, tx, state, batch


def test_train_step_updates_ema_as_timm():
  model, tx, state, batch = _toy_setup()
  new, metrics = train.train_step(state, batch, model=model, tx=tx, ema=0.75)
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
  whole, m1 = train.train_step(state, batch, model=model, tx=tx, ema=0.0)
  accum, m2 = train.train_step(state, batch, model=model, tx=tx, ema=0.0, accum_steps=4)
  assert float(m2['loss']) == pytest.approx(float(m1['loss']), rel=1e-6)
  for a, b in zip(jax.tree.leaves(accum.params), jax.tree.leaves(whole.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_eval_step_ignores_padding():
  model, _, state, batch = _toy_setup()
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
  full = train.eval_step(model, {'raw': variables},
                         {'image': batch['image'][:5], 'label': labels[:5],
                          'mask': jnp.ones(5)})['raw']
  padded = train.eval_step(model, {'raw': variables},
                           {'image': batch['image'], 'label': labels,
                            'mask': jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)})['raw']
  for key in ('loss', 'top1', 'top5', 'count'):
    assert float(padded[key]) == pytest.approx(float(full[key]), rel=1e-6)
  assert float(padded['count']) == 5
  assert float(padded['top5']) == 5  # 3 classes: the label is always among the top 5.


def test_merge_weights_reinitialises_a_head_of_another_size():
  fresh = {'fc': {'kernel': np.zeros((3, 4))}, 'head': {'kernel': np.zeros((4, 10))}}
  loaded = {'fc': {'kernel': np.ones((3, 4))}, 'head': {'kernel': np.ones((4, 1000))}}
  merged = train.merge_weights(fresh, loaded)
  np.testing.assert_array_equal(merged['fc']['kernel'], 1)
  np.testing.assert_array_equal(merged['head']['kernel'], 0)  # Fresh: 10 != 1000 classes.
  same = train.merge_weights(fresh, {'fc': loaded['fc'], 'head': {'kernel': np.ones((4, 10))}})
  np.testing.assert_array_equal(same['head']['kernel'], 1)
  forced = train.merge_weights(fresh, {'fc': loaded['fc'],
                                       'head': {'kernel': np.ones((4, 10))}}, reinit_head=True)
  np.testing.assert_array_equal(forced['head']['kernel'], 0)


def test_merge_weights_lists_what_does_not_fit():
  fresh = {'fc': {'kernel': np.zeros((3, 4)), 'bias': np.zeros(4)}, 'head': {}}
  loaded = {'fc': {'kernel': np.ones((3, 5))}, 'extra': {'kernel': np.ones(2)}}
  with pytest.raises(ValueError) as info:
    train.merge_weights(fresh, loaded)
  message = str(info.value)
  assert 'fc/bias' in message and 'extra/kernel' in message and '(3, 5) != (3, 4)' in message


def test_configs_hold_the_official_recipe():
  for variant, drop_path in (('rmt_t', 0.1), ('rmt_s', 0.15), ('rmt_b', 0.4), ('rmt_l', 0.5)):
    config = __import__(f'configs.{variant}', fromlist=['get_config']).get_config()
    assert config.model == variant and config.drop_path_rate == drop_path
    assert config.global_batch_size == 2048 and config.num_epochs == 300
    assert (config.base_lr, config.weight_decay, config.warmup_epochs) == (5e-4, 0.05, 5)
    assert (config.warmup_lr, config.min_lr, config.eps) == (1e-6, 1e-5, 1e-8)
    assert config.data.label_smoothing == 0.1 and config.data.mixup == 0.8
    config.num_classes = 100  # One number for the head and the targets.
    assert config.data.num_classes == 100
