"""The train state and the steps: what a training run compiles, with no TensorFlow.

`TrainState` is one pytree (weights, BatchNorm statistics, AdamW's state, their EMA, the step
and the PRNG key); `init_state`, `train_step` and `eval_step` are pure functions of it, and
`build_programs` jits them for a mesh with explicit in/out shardings (`sharding.py`), the
state donated: `jax.eval_shape` of the initialiser and the sharding rules give the state's
shardings. Under jit the global batch is one array split over the devices, so BatchNorm's batch
statistics are those of the whole global batch (PyTorch's SyncBatchNorm, which the official run
uses).

The recipe is the official one (DeiT's, as in qhfan/RMT `classfication_release/main.py`):
AdamW with timm's weight-decay rule, warmup + cosine lr and the batch-scaled EMA decay
(`optim.py`), soft-target cross-entropy on Mixup/CutMix/label-smoothed targets, the EMA of the
weights and of the BatchNorm statistics. The loop that feeds these steps with data, evaluates,
checkpoints and logs is `loop.py`; this module imports no TensorFlow, so that benchmarks, AOT
compiles (`rmt_jax.tpu_compile`) and tests can take the steps without the input pipeline.
"""

import functools
from typing import Any, Callable, Mapping

from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rmt_jax.kernels import selection as kernel_forms
from rmt_jax.kernels.tpu import operations as tpu_operations
from rmt_jax.models import RMT, create_model
from rmt_jax.train import device_augment
from rmt_jax.train import optim
from rmt_jax.train import sharding

# The classifier's modules: fine-tuning may start them afresh (`merge_weights`).
HEAD_MODULES = ('head', 'aux_head')


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes, and everything a checkpoint holds.

  Attributes:
    step: optimizer steps taken (int32 scalar).
    params, batch_stats: the model's variables.
    opt_state: AdamW's state (moments, step count).
    ema_params, ema_batch_stats: exponential moving averages of the two above.
    rng: raw PRNG key; each step folds in its step number, so a resumed run draws the same
      stochastic-depth masks as an uninterrupted one.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any
  rng: jax.Array


# ---------------------------------------------------------------------------------------
# The model from the config.


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `create_model` overrides that change the network's variables or function (saved
  with checkpoints so that `load_variables` users can rebuild it)."""
  overrides = dict(config.get('model_overrides', {}) or {})
  overrides['num_classes'] = int(config.num_classes)
  if config.get('drop_path_rate') is not None and config.drop_path_rate >= 0:
    overrides['drop_path_rate'] = float(config.drop_path_rate)
  if config.get('remat') is not None:
    overrides['remat'] = [bool(r) for r in config.remat]
  return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}


def build_model(config: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh | None = None) -> RMT:
  """The network of `config.model` with the config's classes, drop path, dtypes and remat.

  Its kernel forms are `config.kernels`; 'auto' with a mesh means the forms for the mesh's
  devices (what the steps are compiled for), so the programs carry one form only.
  """
  return create_model(config.model, **model_overrides(config),
                      dtype=jnp.dtype(config.get('dtype', 'float32')),
                      residual_dtype=jnp.dtype(config.get('residual_dtype', 'float32')),
                      kernels=kernel_forms_for(config, mesh))


def kernel_forms_for(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None) -> str:
  """`config.kernels`, with 'auto' resolved to the forms of the mesh's devices (where a mesh is
  given): what every program of a run is built with."""
  return kernel_forms.resolve(config.get('kernels', 'auto'), mesh)


# ---------------------------------------------------------------------------------------
# Init, train and eval steps (pure functions; jitted by `build_programs`).


def init_state(rng: jax.Array, model: RMT, tx: optax.GradientTransformation,
               image_size: int) -> TrainState:
  """A fresh state: the model's init, AdamW's zeros, the EMA equal to the weights."""
  init_rng, train_rng = jax.random.split(rng)
  # The weights are the same whatever form runs; the TPU kernels' memory plans are for the
  # steps' shapes, not this one image traced outside the mesh, so the plain forms trace it.
  with tpu_operations.plain_only():
    variables = model.init({'params': init_rng}, jnp.zeros((1, image_size, image_size, 3)),
                           train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), ema_params=params, ema_batch_stats=batch_stats,
                    rng=train_rng)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum(targets * log_softmax(logits)) (timm's SoftTargetCrossEntropy)."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: RMT,
               tx: optax.GradientTransformation, ema: float, accum_steps: int = 1,
               micro_sharding: jax.sharding.NamedSharding | None = None,
               augment: device_augment.DeviceAugment | None = None,
               criterion: Callable[[jax.Array, jax.Array], jax.Array] | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on one global batch.

  Gradient accumulation (`accum_steps` > 1) splits the batch into that many micro-batches,
  run one after another (`lax.scan`, so only one micro-batch's activations live at a time) and
  averages their gradients: the update is that of the whole batch, except that BatchNorm
  normalises each micro-batch with its own statistics, and its running statistics take one
  momentum update per micro-batch, as PyTorch's accumulation loops do. The EMA and the
  learning rate advance once per optimizer step. Micro-batch j holds examples j, j + k, ...,
  so that each device keeps its own examples (no data movement).

  Args:
    state: the train state (donated by the jitted caller).
    batch: {'image': [B, H, W, 3], 'label': [B, classes] soft targets}; with `augment`,
      {'image': uint8 [B, H, W, 3] crops, 'label': int [B]}.
    model: the network.
    tx: the optimizer.
    ema: EMA decay per step (0 keeps the EMA equal to the weights).
    accum_steps: micro-batches per step.
    micro_sharding: sharding of a micro-batch's leading axis (the batch sharding).
    augment: `config.data.augment_on = 'device'`: the rest of the recipe, run on each device's
      share of the batch with the step's key (`device_augment`), before the micro-batch split.
    criterion: (logits, labels) -> the mean loss; None: soft-target cross-entropy (the
      classifier's). A dense task passes its own (e.g. `segmentation.pixel_cross_entropy`).

  Returns:
    (new state, {'loss', 'grad_norm'} as float32 scalars).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  if augment is not None:
    batch = augment(batch, device_augment.step_key(state.rng, state.step))

  def loss_fn(params, batch_stats, images, labels, step_rng):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'],
                                  rngs={'dropout': step_rng})
    if criterion is None:
      loss = soft_target_cross_entropy(logits, labels).mean()
    else:
      loss = criterion(logits, labels)
    return loss, updates['batch_stats']

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, batch['image'],
                                         batch['label'], rng)
  else:
    def split(x):
      x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
      if micro_sharding is not None:
        spec = jax.sharding.PartitionSpec(None, *micro_sharding.spec)
        x = jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(micro_sharding.mesh, spec))
      return x

    def micro_step(carry, xs):
      grads_sum, loss_sum, batch_stats = carry
      j, images, labels = xs
      (loss, batch_stats), grads = grad_fn(state.params, batch_stats, images, labels,
                                           jax.random.fold_in(rng, j))
      return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, batch_stats), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss, batch_stats), _ = jax.lax.scan(
        micro_step, (zeros, jnp.zeros((), jnp.float32), state.batch_stats),
        (jnp.arange(accum_steps), split(batch['image']), split(batch['label'])))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    loss = loss / accum_steps

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # timm's ModelEma: ema <- decay * ema + (1 - decay) * model, after the optimizer step,
  # over the whole state_dict (BatchNorm running statistics included).
  average = lambda e, p: e * ema + p * (1.0 - ema)  # pylint: disable=unnecessary-lambda-assignment
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
      ema_params=jax.tree.map(average, state.ema_params, params),
      ema_batch_stats=jax.tree.map(average, state.ema_batch_stats, batch_stats))
  return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}


def eval_step(model: RMT, variable_sets: Mapping[str, Mapping[str, Any]],
              batch: Mapping[str, jax.Array]) -> dict[str, dict[str, jax.Array]]:
  """Sums over one eval batch, for each set of weights (e.g. 'raw' and 'ema').

  Padding examples (mask 0) count nowhere, so sums over all batches divided by 'count' are
  exact means over the validation split. The loss is plain cross-entropy on the hard label,
  as the official evaluation computes it.

  Returns:
    {name: {'loss', 'top1', 'top5', 'count'}} float32 sums.
  """
  labels, mask = batch['label'], batch['mask']
  out = {}
  for name, variables in variable_sets.items():
    logits = model.apply({'params': variables['params'],
                          'batch_stats': variables['batch_stats']}, batch['image'], train=False)
    logits = logits.astype(jnp.float32)
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    top5 = jnp.any(top_k == labels[:, None], axis=-1)
    top1 = top_k[:, 0] == labels
    out[name] = {'loss': jnp.sum(loss * mask), 'top1': jnp.sum(top1 * mask),
                 'top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}
  return out


# ---------------------------------------------------------------------------------------
# Weights from elsewhere (fine-tuning, eval-only).


def merge_weights(fresh: Mapping[str, Any], loaded: Mapping[str, Any], *,
                  reinit_head: bool = False, collection: str = 'params') -> dict[str, Any]:
  """`fresh` with every leaf replaced by `loaded`'s, for fine-tuning from other weights.

  The classifier (`head`, `aux_head`) keeps its fresh initialisation where its shape differs
  (another `num_classes`), where `loaded` lacks it, or everywhere with `reinit_head`: the
  official recipe's fine-tuning rule. Any other difference is an error.

  Raises:
    ValueError: listing the missing, unexpected and mis-shaped keys outside the head.
  """
  fresh_flat = traverse_util.flatten_dict(flax.core.unfreeze(fresh))
  loaded_flat = traverse_util.flatten_dict(flax.core.unfreeze(dict(loaded)))
  merged, missing, misshaped, head_reset = {}, [], [], []
  for key, value in fresh_flat.items():
    is_head = key[0] in HEAD_MODULES
    other = loaded_flat.get(key)
    if is_head and (reinit_head or other is None or tuple(other.shape) != tuple(value.shape)):
      merged[key] = value
      head_reset.append('/'.join(key))
    elif other is None:
      missing.append('/'.join(key))
    elif tuple(other.shape) != tuple(value.shape):
      misshaped.append(f'{"/".join(key)}: {tuple(other.shape)} != {tuple(value.shape)}')
    else:
      merged[key] = other
  unexpected = ['/'.join(k) for k in loaded_flat
                if k not in fresh_flat and k[0] not in HEAD_MODULES]
  if missing or unexpected or misshaped:
    raise ValueError(f'The {collection} do not fit the model:\n  missing: {missing}\n  '
                     f'unexpected: {unexpected}\n  mis-shaped (checkpoint != model): '
                     f'{misshaped}')
  if head_reset:
    logging.info('Classifier initialised afresh (not taken from init_from): %s', head_reset)
  return traverse_util.unflatten_dict(merged)


# ---------------------------------------------------------------------------------------
# The jitted programs of a run.


@flax.struct.dataclass
class Programs:
  """What a run compiles, built from the config and the mesh alone (no data, no weights).

  `loop.train_and_evaluate` runs these; `rmt_jax.tpu_compile` compiles the same ones ahead of time
  for a TPU slice it does not have.

  Attributes:
    model: the network, its kernel forms resolved for the mesh's devices.
    schedule: step -> learning rate.
    tx: AdamW with that schedule.
    init_fn: () -> a fresh TrainState.
    abstract_state: the state's shapes and dtypes, each with its sharding.
    state_shardings: NamedShardings of the state.
    batch_sharding: the global batch's sharding (leading axis over every device).
    train_step: jitted (state, {'image', 'label'}) -> (state, metrics); the state is donated.
      The batch is `device_augment.train_batch_spec(config, ...)`'s: the host's augmented
      float32 images and soft targets, or with `config.data.augment_on = 'device'` the uint8
      crops and int labels, which the step augments itself.
    eval_step: jitted (state, {'image', 'label', 'mask'}) -> sums for the raw and EMA weights.
  """
  model: RMT = flax.struct.field(pytree_node=False)
  schedule: optax.Schedule = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  init_fn: Callable[[], TrainState] = flax.struct.field(pytree_node=False)
  abstract_state: Any = flax.struct.field(pytree_node=False)
  state_shardings: Any = flax.struct.field(pytree_node=False)
  batch_sharding: jax.sharding.NamedSharding = flax.struct.field(pytree_node=False)
  train_step: Any = flax.struct.field(pytree_node=False)
  eval_step: Any = flax.struct.field(pytree_node=False)


def build_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   steps_per_epoch: int, total_steps: int, *, model: Any = None,
                   criterion: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                   evaluation: Callable[..., Any] | None = None) -> Programs:
  """The model, optimizer, state shardings and jitted steps of a run of `config` on `mesh`.

  The defaults are the classifier's; another task (`segmentation.py`) passes its network, its
  loss and its evaluation, and shares the rest (optimizer, EMA, sharding, accumulation).

  Args:
    config: the run's config.
    mesh: from `sharding.create_mesh` (real devices, or a TPU topology's for AOT compiles).
    steps_per_epoch: optimizer steps per epoch (the schedule's unit).
    total_steps: optimizer steps of the run.
    model: the network; None: `build_model(config, mesh)`.
    criterion: the training loss, as `train_step` takes it; None: the classifier's.
    evaluation: (model, variable_sets, batch) -> sums, as `eval_step`; None: `eval_step`.

  Raises:
    ValueError: the global batch does not split into `grad_accum_steps` x devices.
  """
  model = build_model(config, mesh) if model is None else model
  evaluation = eval_step if evaluation is None else evaluation
  batch_sh = sharding.batch_sharding(mesh)
  accum = int(config.get('grad_accum_steps', 1))
  if config.global_batch_size % (accum * mesh.size):
    raise ValueError(f'global_batch_size {config.global_batch_size} must be a multiple of '
                     f'grad_accum_steps {accum} x {mesh.size} devices.')
  schedule = optim.learning_rate_schedule(config, steps_per_epoch, total_steps)
  tx = optim.create_optimizer(config, schedule)

  rng = jax.random.PRNGKey(config.seed)
  init_fn = functools.partial(init_state, rng, model, tx, config.data.image_size)
  abstract = jax.eval_shape(init_fn)
  state_sh = sharding.state_shardings(abstract, mesh, config.fsdp_min_size)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)
  batch_shardings = {'image': batch_sh, 'label': batch_sh}
  p_train = jax.jit(
      sharding.traced_on(mesh, functools.partial(train_step, model=model, tx=tx,
                                         ema=optim.ema_decay(config), accum_steps=accum,
                                         micro_sharding=batch_sh,
                                         augment=device_augment.DeviceAugment.for_run(
                                             config, mesh), criterion=criterion)),
      in_shardings=(state_sh, batch_shardings),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  p_eval = jax.jit(
      sharding.traced_on(mesh, lambda s, b: evaluation(
          model, {'raw': {'params': s.params, 'batch_stats': s.batch_stats},
                  'ema': {'params': s.ema_params, 'batch_stats': s.ema_batch_stats}}, b)),
      in_shardings=(state_sh, {'image': batch_sh, 'label': batch_sh, 'mask': batch_sh}),
      out_shardings=sharding.replicated(mesh))
  return Programs(model=model, schedule=schedule, tx=tx, init_fn=init_fn, abstract_state=abstract,
                  state_shardings=state_sh, batch_sharding=batch_sh, train_step=p_train,
                  eval_step=p_eval)
