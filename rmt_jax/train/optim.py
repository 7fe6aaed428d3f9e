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
import jax
import jax.numpy as jnp
import ml_collections
import optax

REFERENCE_BATCH = 512


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """The official linear scaling: base_lr x global_batch / 512."""
  return config.base_lr * config.global_batch_size / REFERENCE_BATCH


def timm_cosine_lr(t: Any, *, peak: float, warmup_lr: float, min_lr: float, warmup_t: float,
                   t_initial: float) -> jax.Array:
  """timm's `CosineLRScheduler._get_lr(t)` as the official run configures it.

  One cycle (`cycle_limit` 1), k-decay 1, no noise, no warmup prefix (timm 0.9.10, which the
  official `install.sh` pins, with `create_scheduler`'s defaults):

  lr(t) = warmup_lr + (peak - warmup_lr) * t / warmup_t              for t < warmup_t,
  lr(t) = min_lr + (peak - min_lr) * (1 + cos(pi * t / t_initial)) / 2  up to t_initial,
  lr(t) = min_lr                                                      after it.

  The cosine runs over the whole of `t_initial`, warmup included.

  Args:
    t: the scheduler's time (steps or epochs; int or float, traced or not).
    peak: the (batch-scaled) base learning rate.
    warmup_lr, min_lr: timm's `warmup_lr_init` and `lr_min`.
    warmup_t, t_initial: warmup length and cycle length, in the unit of `t`.

  Returns:
    The learning rate, a float32 scalar.
  """
  t = jnp.asarray(t, jnp.float32)
  warm = warmup_lr + (peak - warmup_lr) * t / max(warmup_t, 1)
  # (1 + cos(pi t / T)) / 2 = sin(pi (T - t) / 2T)^2: the same value, but float32 keeps its
  # relative precision near the cycle's end (1 + cos -> 0 there: errors of 4e-6 otherwise).
  cosine = min_lr + (peak - min_lr) * jnp.square(
      jnp.sin(jnp.pi * (t_initial - t) / (2 * t_initial)))
  return jnp.where(t < warmup_t, warm, jnp.where(t < t_initial, cosine, min_lr))


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """timm's `CosineLRScheduler` as the official run configures it (`timm_cosine_lr`), per step
  or, with `config.lr_schedule_per_epoch`, per epoch exactly as the official loop steps it.

  Per step (the default): t = step, warmup_t = warmup_epochs x steps_per_epoch, t_initial =
  total_steps; the official curve sampled finely, so that lr(total_steps) = min_lr.

  Per epoch (the official schedule, step for step): the official `main.py` creates the scheduler
  with `t_initial = epochs` (timm's `create_scheduler`, on epochs) and calls
  `lr_scheduler.step(epoch)` after each epoch, so epoch e trains at the value of t = e - 1,
  and epoch 0 at `warmup_lr` (set by the scheduler's constructor, which is also t = 0): the
  learning rate is constant within an epoch, warmup_lr for the first two epochs, and the last
  epoch trains at t = epochs - 2, not at min_lr.

  Args:
    config: base_lr, global_batch_size, warmup_epochs, warmup_lr, min_lr, and for the per-epoch
      form lr_schedule_per_epoch and num_epochs.
    steps_per_epoch: optimizer steps per epoch.
    total_steps: optimizer steps of the whole run.

  Returns:
    step -> learning rate, usable under jit and on the host.
  """
  curve = functools.partial(timm_cosine_lr, peak=peak_learning_rate(config),
                            warmup_lr=config.warmup_lr, min_lr=config.min_lr)
  if config.get('lr_schedule_per_epoch', False):
    def per_epoch(step):
      epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch
      return curve(jnp.maximum(epoch - 1, 0), warmup_t=config.warmup_epochs,
                   t_initial=config.num_epochs)
    return per_epoch
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  return functools.partial(curve, warmup_t=warmup, t_initial=max(int(total_steps), 1))


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
