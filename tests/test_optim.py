"""Tests of rmt_jax.optim against hand-computed values: the weight-decay mask (timm's rule on
the official parameter shapes), the warmup + cosine learning rate, and the EMA decay."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from configs import common
from rmt_jax import optim
from rmt_jax.models import create_model


def _abstract_params(name='rmt_b', **overrides):
  model = create_model(name, **overrides)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 64, 64, 3))))
  return variables['params']


def test_weight_decay_mask_follows_timm():
  flat = traverse_util.flatten_dict(optim.weight_decay_mask(_abstract_params('rmt_tiny')))
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
      optim.weight_decay_mask(_abstract_params('rmt_tiny'), decay_layer_scale=False))
  assert exempt[('layers_3', 'blocks_0', 'gamma_1')] is False
  # The rule is "ndim > 1 in PyTorch": every decayed leaf is a kernel or a gamma, every
  # kernel is decayed, and nothing else is.
  params = traverse_util.flatten_dict(_abstract_params('rmt_tiny'))
  for key, decayed in flat.items():
    torch_ndim = 4 if key[-1].startswith('gamma_') else len(params[key].shape)
    assert decayed == (torch_ndim > 1 and key[-1] != 'bias'), key


def test_weight_decay_mask_counts_on_rmt_b():
  mask = traverse_util.flatten_dict(optim.weight_decay_mask(_abstract_params('rmt_b')))
  gammas = [k for k in mask if k[-1].startswith('gamma_')]
  # Layer scale is on in stages 3 and 4: (25 + 8) blocks x 2 gammas.
  assert len(gammas) == 66 and all(mask[k] for k in gammas)


def test_learning_rate_schedule_hand_values():
  config = common.get_config('rmt_s')  # base 5e-4, batch 2048, warmup 5 epochs from 1e-6.
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=300)
  assert optim.peak_learning_rate(config) == pytest.approx(2e-3)
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
  assert optim.ema_decay(config) == pytest.approx(0.99984001, abs=1e-9)  # 0.99996 ** 4.
  config.global_batch_size = 512
  assert optim.ema_decay(config) == pytest.approx(0.99996, abs=1e-12)
  config.ema_decay = 0.0
  assert optim.ema_decay(config) == 0.0
