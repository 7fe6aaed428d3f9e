"""BatchNorm as PyTorch computes it: the running variance takes the unbiased batch variance.

PyTorch's `BatchNorm2d` (and `SyncBatchNorm`, which the official run uses) normalises a training
batch with its biased variance (divided by n) but moves `running_var` towards the unbiased one
(divided by n - 1), n being the number of values per channel (batch x height x width, over all
devices). flax's `nn.BatchNorm` uses the biased variance for both, so its running variances
drift from the official ones by a factor (n - 1) / n per update: invisible at ImageNet batch
sizes in the stem, but 1/(n - 1) = 1% at the head's 7x7 map with a batch of 2.

Variables have flax's names and layout (`params`: `scale`, `bias`; `batch_stats`: `mean`,
`var`, float32), so weights convert and checkpoints load as with `nn.BatchNorm`. Under `jax.jit`
with the batch split over devices the statistics are those of the global batch, and n counts
the global batch: PyTorch's SyncBatchNorm.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rmt_jax.models import initializers

Dtype = Any


class BatchNorm(nn.Module):
  """PyTorch's BatchNorm over the last axis (channels) of an NHWC (or any ...C) array.

  Attributes:
    momentum: PyTorch's convention: the weight of the new batch in the running statistics,
      `running = (1 - momentum) * running + momentum * batch` (flax's counts the other way).
    epsilon: added to the variance before the square root.
    dtype: the output's dtype; statistics and normalisation always run in float32.
    param_dtype: storage dtype of `scale` and `bias`.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    """Normalises `x`; in training mode (`use_running_average=False`) updates `batch_stats`.

    Args:
      x: (..., channels).
      use_running_average: True in eval mode (running statistics); False in training mode
        (batch statistics; `batch_stats` must be mutable, except during `init`).

    Returns:
      The normalised, scaled and shifted `x`, in `dtype`.

    Raises:
      ValueError: training mode on one value per channel (PyTorch refuses it too: the unbiased
        variance would divide by zero).
    """
    features = x.shape[-1]
    running_mean = self.variable('batch_stats', 'mean', initializers.ZEROS.array, (features,),
                                 jnp.float32)
    running_var = self.variable('batch_stats', 'var', initializers.ONES.array, (features,),
                                jnp.float32)
    scale = self.param('scale', initializers.ONES, (features,), self.param_dtype)
    bias = self.param('bias', initializers.ZEROS, (features,), self.param_dtype)
    x = x.astype(jnp.float32)
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      n = math.prod(x.shape[:-1])
      if n < 2:
        raise ValueError(f'BatchNorm in training mode needs more than one value per channel, '
                         f'got input shape {x.shape}')
      axes = tuple(range(x.ndim - 1))
      mean = x.mean(axes)
      # Two passes (not E[x^2] - E[x]^2): float32 keeps its precision when |mean| >> std.
      var = jnp.square(x - mean).mean(axes)
      if not self.is_initializing():
        unbiased = var * (n / (n - 1))
        running_mean.value = ((1 - self.momentum) * running_mean.value
                              + self.momentum * jax.lax.stop_gradient(mean))
        running_var.value = ((1 - self.momentum) * running_var.value
                             + self.momentum * jax.lax.stop_gradient(unbiased))
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32))
    return (y + bias.astype(jnp.float32)).astype(self.dtype)
