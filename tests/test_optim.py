"""Tests of rmt_jax.train.optim against hand-computed values: the weight-decay mask (timm's rule on
the official parameter shapes), the warmup + cosine learning rate (per step, and per epoch
against timm's scheduler as the official loop steps it), and the EMA decay."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import common
from rmt_jax.train import optim
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


class _TimmCosine:
  """timm 0.9.10's `CosineLRScheduler` (the official install.sh pins it), transcribed for the
  official arguments: t_in_epochs, cycle_mul 1, cycle_limit 1, k_decay 1, no noise, no warmup
  prefix. `lr` is the optimizer's learning rate, as `update_groups` leaves it."""

  def __init__(self, base_lr, t_initial, lr_min, warmup_t, warmup_lr_init):
    self.base_lr, self.t_initial, self.lr_min = base_lr, t_initial, lr_min
    self.warmup_t, self.warmup_lr_init = warmup_t, warmup_lr_init
    self.warmup_step = (base_lr - warmup_lr_init) / warmup_t
    self.lr = warmup_lr_init  # The constructor's `update_groups(warmup_lr_init)`.

  def _get_lr(self, t):
    if t < self.warmup_t:
      return self.warmup_lr_init + t * self.warmup_step
    i = t // self.t_initial
    t_curr = t - self.t_initial * i
    if i < 1:
      return self.lr_min + 0.5 * (self.base_lr - self.lr_min) * (
          1 + math.cos(math.pi * t_curr / self.t_initial))
    return self.lr_min

  def step(self, epoch):
    self.lr = self._get_lr(epoch)


def test_per_epoch_schedule_is_the_official_loop_of_timm_scheduler():
  config = common.get_config('rmt_s')
  config.lr_schedule_per_epoch = True
  steps_per_epoch = 7
  schedule = optim.learning_rate_schedule(config, steps_per_epoch,
                                          total_steps=300 * steps_per_epoch)
  timm = _TimmCosine(optim.peak_learning_rate(config), t_initial=config.num_epochs,
                     lr_min=config.min_lr, warmup_t=config.warmup_epochs,
                     warmup_lr_init=config.warmup_lr)
  official = []
  # The official main.py: train an epoch at the optimizer's lr, then `lr_scheduler.step(epoch)`.
  for epoch in range(config.num_epochs):
    official.append(timm.lr)
    timm.step(epoch)
  steps = np.arange(config.num_epochs * steps_per_epoch)
  ours = np.asarray(jax.jit(jax.vmap(schedule))(steps)).reshape(config.num_epochs, -1)
  np.testing.assert_allclose(ours, np.repeat(np.array(official)[:, None], steps_per_epoch, 1),
                             rtol=1e-6)
  # What that means: two epochs at warmup_lr, the top reached never, the end above min_lr.
  peak = 2e-3
  assert official[0] == official[1] == 1e-6
  assert official[2] == pytest.approx(1e-6 + (peak - 1e-6) / 5)
  assert official[6] == pytest.approx(1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi / 60)))
  assert official[-1] == pytest.approx(1e-5 + 0.5 * (peak - 1e-5) *
                                       (1 + math.cos(math.pi * 298 / 300)))


def test_per_step_schedule_is_timm_curve_on_steps_and_stays_at_min_lr():
  config = common.get_config('rmt_s')
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=300)
  timm = _TimmCosine(optim.peak_learning_rate(config), t_initial=300, lr_min=config.min_lr,
                     warmup_t=50, warmup_lr_init=config.warmup_lr)
  for step in (0, 1, 49, 50, 51, 137, 299, 300, 305):
    assert float(schedule(step)) == pytest.approx(timm._get_lr(step), rel=1e-6), step
