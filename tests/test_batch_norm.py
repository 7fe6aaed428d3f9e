"""rmt_jax.models.batch_norm against PyTorch's BatchNorm2d: the training output, its gradients,
the running statistics (unbiased variance) over several updates, the eval output; the variable
layout of flax's nn.BatchNorm (so conversion and checkpoints are unaffected)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
from rmt_jax.models.batch_norm import BatchNorm

# Float32 against PyTorch in float64. Measured: running statistics 6e-8, outputs and gradients
# up to 8e-7 (x - mean rounds to float32 where a channel's mean is 16 standard deviations away).
TOL = 3e-6


def _batches(n_steps=3, shape=(2, 5, 4, 3)):
  rng = np.random.default_rng(0)
  # A channel mean far from zero: the variance must not come from E[x^2] - E[x]^2.
  return [(rng.normal(size=shape) * [0.5, 2.0, 1.0] + [8.0, -3.0, 0.0]).astype(np.float32)
          for _ in range(n_steps)]


def _flax_run(module, batches):
  """Training-mode outputs and gradients of each batch, updating the statistics as it goes."""
  variables = module.init(jax.random.PRNGKey(0), jnp.asarray(batches[0]),
                          use_running_average=False)
  weights = np.random.default_rng(1).normal(size=batches[0].shape).astype(np.float32)

  def loss(params, batch_stats, x):
    y, updates = module.apply({'params': params, 'batch_stats': batch_stats}, x,
                              use_running_average=False, mutable=['batch_stats'])
    return jnp.sum(y * weights), (y, updates['batch_stats'])

  params, batch_stats = variables['params'], variables['batch_stats']
  outs = []
  for x in batches:
    (_, (y, batch_stats)), (g_params, g_x) = jax.value_and_grad(
        loss, argnums=(0, 2), has_aux=True)(params, batch_stats, jnp.asarray(x))
    outs.append({'y': y, 'grad_x': g_x, 'grad_scale': g_params['scale'],
                 'grad_bias': g_params['bias']})
  eval_y = module.apply({'params': params, 'batch_stats': batch_stats}, jnp.asarray(batches[0]),
                        use_running_average=True)
  return outs, batch_stats, eval_y, weights


def _torch_run(batches, weights):
  torch = pytest.importorskip('torch', reason='the reference is torch.nn.BatchNorm2d '
                              '(pip install -r requirements-test.txt)')
  bn = torch.nn.BatchNorm2d(batches[0].shape[-1], eps=1e-5, momentum=0.1).double()
  w = torch.from_numpy(weights.astype(np.float64)).permute(0, 3, 1, 2)
  outs = []
  for x in batches:
    bn.zero_grad()
    xt = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2).requires_grad_(True)
    y = bn(xt)
    (y * w).sum().backward()
    outs.append({'y': y.detach().permute(0, 2, 3, 1).numpy(),
                 'grad_x': xt.grad.permute(0, 2, 3, 1).numpy(),
                 'grad_scale': bn.weight.grad.numpy(), 'grad_bias': bn.bias.grad.numpy()})
  bn.eval()
  with torch.no_grad():
    eval_y = bn(torch.from_numpy(batches[0].astype(np.float64)).permute(0, 3, 1, 2))
  stats = {'mean': bn.running_mean.numpy(), 'var': bn.running_var.numpy()}
  return outs, stats, eval_y.permute(0, 2, 3, 1).numpy()


def test_batch_norm_is_pytorch_batchnorm2d():
  batches = _batches()
  outs, stats, eval_y, weights = _flax_run(BatchNorm(), batches)
  want_outs, want_stats, want_eval = _torch_run(batches, weights)
  for got, want in zip(outs, want_outs):
    for key in want:
      assert relative_error(got[key], want[key]) < TOL, key
  for key in ('mean', 'var'):
    assert relative_error(stats[key], want_stats[key]) < TOL, key
  assert relative_error(eval_y, want_eval) < TOL
  # flax's nn.BatchNorm moves the running variance towards the biased batch variance: off by
  # ~1/(n - 1) of the update (n = 40 values per channel here), which this test would catch.
  _, flax_stats, _, _ = _flax_run(nn.BatchNorm(momentum=0.9, epsilon=1e-5), batches)
  assert relative_error(flax_stats['mean'], want_stats['mean']) < TOL
  assert relative_error(flax_stats['var'], want_stats['var']) > 100 * TOL


def test_batch_norm_has_flax_variable_layout():
  x = jnp.zeros((2, 4, 4, 3), jnp.bfloat16)
  ours = jax.eval_shape(lambda: BatchNorm(param_dtype=jnp.float32).init(
      jax.random.PRNGKey(0), x, use_running_average=False))
  flax_bn = jax.eval_shape(lambda: nn.BatchNorm(param_dtype=jnp.float32).init(
      jax.random.PRNGKey(0), x, use_running_average=False))
  assert jax.tree.map(lambda s: (s.shape, s.dtype), ours) == jax.tree.map(
      lambda s: (s.shape, s.dtype), flax_bn)
  y = BatchNorm().apply(jax.tree.map(jnp.ones_like, ours), x, use_running_average=True)
  assert y.dtype == jnp.float32  # Norms run in float32 under bfloat16 compute.


def test_batch_norm_refuses_one_value_per_channel_in_training():
  module = BatchNorm()
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((1, 1, 1, 3)),
                          use_running_average=True)
  with pytest.raises(ValueError, match='more than one value per channel'):
    module.apply(variables, jnp.ones((1, 1, 1, 3)), use_running_average=False,
                 mutable=['batch_stats'])
