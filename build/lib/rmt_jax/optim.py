"""The optimizer of the official RMT recipe: AdamW with timm's weight-decay rule, the
warmup + cosine learning-rate schedule, and the EMA decay, all derived from the config.

The official lr and EMA decay are stated for a global batch of 512 and scaled with the batch
(qhfan/RMT `classfication_release/main.py`, DeiT's script, with timm's `create_optimizer`,
`create_scheduler` and `ModelEma`).
"""

import functools
from typing import Any

import flax
from flax import traverse_util
import jax.numpy as jnp
import ml_collections
import optax

REFERENCE_BATCH = 512


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """The official linear scaling: base_lr x global_batch / 512."""
  return config.base_lr * config.global_batch_size / REFERENCE_BATCH


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """timm's `CosineLRScheduler` as the official run configures it, evaluated per step.

  lr(t) = warmup_lr + (peak - warmup_lr) * t / W                 for t < W,
  lr(t) = min_lr + (peak - min_lr) * (1 + cos(pi * t / T)) / 2    for t >= W,

  with W = warmup_epochs x steps_per_epoch and T = total_steps. As in timm (warmup_prefix
  False), the cosine runs over the whole run, warmup included, so that lr(T) = min_lr; the
  official run evaluates this per epoch (t = epoch), we per step (finer, same curve).

  Args:
    config: base_lr, global_batch_size, warmup_epochs, warmup_lr, min_lr.
    steps_per_epoch: optimizer steps per epoch.
    total_steps: optimizer steps of the whole run.

  Returns:
    step -> learning rate, usable under jit and on the host.
  """
  peak = peak_learning_rate(config)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  total = max(int(total_steps), 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = config.warmup_lr + (peak - config.warmup_lr) * t / max(warmup, 1)
    cosine = config.min_lr + 0.5 * (peak - config.min_lr) * (1 + jnp.cos(jnp.pi * t / total))
    return jnp.where(t < warmup, warm, cosine)

  return schedule


def weight_decay_mask(params: Any, decay_layer_scale: bool = True) -> Any:
  """True where AdamW's weight decay applies, as timm's `create_optimizer` decides it for the
  official PyTorch model.

  timm decays every parameter except those with one dimension, those named '*.bias' and the
  model's `no_weight_decay()` set (the official model names only 'absolute_pos_embed', which
  it does not have). So, in Flax names:

  - Dense and Conv `kernel`s, depthwise (`pos`, `lepe`, `dwconv`) kernels included: decayed.
  - every `bias`, LayerNorm and BatchNorm `scale`: not decayed.
  - layer-scale `gamma_1`/`gamma_2`: the official tensors are (1, 1, 1, C), four dimensions,
    so timm DOES decay them (in RMT-B and RMT-L, the only variants with layer scale), although
    layer-scale parameters are commonly exempted. Ours are stored as (C,);
    `decay_layer_scale=True` (the default) reproduces the official run, False exempts them.

  Args:
    params: the parameter pytree (arrays or ShapeDtypeStructs).
    decay_layer_scale: see above.

  Returns:
    A pytree of bools with the structure of `params`.
  """
  def decays(path, _):
    name = path[-1]
    if name.startswith('gamma_'):
      return decay_layer_scale
    return name == 'kernel'

  flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
  return traverse_util.unflatten_dict({k: decays(k, v) for k, v in flat.items()})


def ema_decay(config: ml_collections.ConfigDict) -> float:
  """The official per-step EMA decay: 0.99996 ** (global_batch / 512).

  The official script builds timm's `ModelEma` with `model_ema_decay ** (batch_size *
  world_size / 512)` and updates it after every optimizer step, so the EMA's horizon in
  *images* stays that of 0.99996 at batch 512 whatever the batch. At batch 2048 this is
  0.99996^4 = 0.99984, a horizon of ~6250 steps (10 epochs of 1.28M images).
  """
  if not config.ema_decay:
    return 0.0
  return float(config.ema_decay) ** (config.global_batch_size / REFERENCE_BATCH)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with the official hyper-parameters, the weight-decay mask, optional clipping."""
  tx = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                   weight_decay=config.weight_decay,
                   mask=functools.partial(weight_decay_mask,
                                          decay_layer_scale=config.decay_layer_scale))
  if config.get('grad_clip_norm'):
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
