"""Training and evaluation: the train state, the jitted steps, and the loop.

`train_and_evaluate(config, workdir)` runs the official RMT recipe (DeiT's, as in
qhfan/RMT `classfication_release/main.py`) on any number of devices and hosts: AdamW with
timm's weight-decay rule, warmup + cosine lr (per step, or per epoch as the official loop) and
the batch-scaled EMA decay (`optim.py`); soft-target cross-entropy on the input pipeline's
Mixup/CutMix/label-smoothed targets; the EMA of the weights and BatchNorm statistics evaluated
beside the raw weights after every epoch (top-1, top-5, loss).

The state is one pytree (`TrainState`); `jax.eval_shape` of its initialiser and the rules in
`sharding.py` give its shardings, and the init, train and eval steps are `jax.jit` with
explicit in/out shardings, the state donated. Under jit the global batch is one array split over
the devices, so BatchNorm's batch statistics are those of the whole global batch (PyTorch's
SyncBatchNorm, which the official run uses). Checkpoints, resumption and `init_from` weights
go through `checkpoint.py`; metrics through `metrics_writer.py`.
"""

import functools
import math
import signal
import threading
import time
from typing import Any, Callable, Mapping

from absl import logging
import flax
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rmt_jax.weights import checkpoint
from rmt_jax.data import eval_preprocessing
from rmt_jax.data import input_pipeline
from rmt_jax.weights import loading
from rmt_jax.train import metrics_writer
from rmt_jax.train import optim
from rmt_jax.train import sharding
from rmt_jax.models import RMT, create_model
from rmt_jax.kernels import selection as kernel_forms

HEAD_MODULES = ('head', 'aux_head')


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss; the message gives the step and the last checkpoint."""


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
  kernels = config.get('kernels', 'auto')
  if kernels == 'auto' and mesh is not None:
    kernels = kernel_forms.for_devices(mesh)
  return create_model(config.model, **model_overrides(config),
                      dtype=jnp.dtype(config.get('dtype', 'float32')),
                      residual_dtype=jnp.dtype(config.get('residual_dtype', 'float32')),
                      kernels=kernels)


# ---------------------------------------------------------------------------------------
# Init, train and eval steps (pure functions; jitted in `train_and_evaluate`).


def init_state(rng: jax.Array, model: RMT, tx: optax.GradientTransformation,
               image_size: int) -> TrainState:
  """A fresh state: the model's init, AdamW's zeros, the EMA equal to the weights."""
  init_rng, train_rng = jax.random.split(rng)
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
               micro_sharding: jax.sharding.NamedSharding | None = None
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
    batch: {'image': [B, H, W, 3], 'label': [B, classes] soft targets}.
    model: the network.
    tx: the optimizer.
    ema: EMA decay per step (0 keeps the EMA equal to the weights).
    accum_steps: micro-batches per step.
    micro_sharding: sharding of a micro-batch's leading axis (the batch sharding).

  Returns:
    (new state, {'loss', 'grad_norm'} as float32 scalars).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params, batch_stats, images, labels, step_rng):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'],
                                  rngs={'dropout': step_rng})
    loss = soft_target_cross_entropy(logits, labels).mean()
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


def evaluate(eval_fn: Callable[..., Any], weights: Any, eval_data: Any) -> dict[str, dict]:
  """One pass over the eval split; {name: {'loss', 'top1', 'top5', 'count'}} means."""
  totals = None
  for batch in eval_data:
    sums = eval_fn(weights, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  return {name: {'loss': s['loss'] / max(s['count'], 1), 'top1': s['top1'] / max(s['count'], 1),
                 'top5': s['top5'] / max(s['count'], 1), 'count': s['count']}
          for name, s in totals.items()}


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


def _place(tree: Any, shardings: Any) -> Any:
  """Host arrays -> global jax.Arrays (every process holds the same values)."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


# ---------------------------------------------------------------------------------------
# The loop.


class _Preemption:
  """Notices a preemption (SIGTERM) at a step where every process can act on it.

  One process: our SIGTERM handler sets a flag. Several processes: `jax.distributed` has its
  own preemption notifier and agrees on a step at which all processes save
  (`reached_preemption_sync_point`); installing a Python handler would override it.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

  def reached(self, step: int) -> bool:
    if self._multi:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # The preemption sync manager is not running.
        return False
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _eval_events(results: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
  names = {'raw': 'eval', 'ema': 'eval_ema'}
  return {names.get(k, k): {m: v[m] for m in ('loss', 'top1', 'top5')}
          for k, v in results.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or, with `config.eval_only`, evaluates) as `config` says; resumable.

  Resumes from the newest checkpoint in `workdir/checkpoints` that reads back (damaged newer
  ones are moved aside, see `checkpoint.restore_or_initialize`) when there is one, else starts
  from `config.init_from` weights when set, else from scratch. Stops early, having saved, on
  SIGTERM (preemption).

  Args:
    config: see `configs/common.py`.
    workdir: checkpoints, `metrics.jsonl` and TensorBoard summaries go here.

  Returns:
    The last metrics, {'step', 'eval': {...}, 'eval_ema': {...}, 'train_loss', 'preempted'},
    and, when training, the final 'state' (a `TrainState` of global arrays).

  Raises:
    input_pipeline.DataNotFoundError: the dataset is not where `config.data` says.
    NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint is kept).
    checkpoint.CheckpointUnreadableError: the workdir has checkpoints and none reads back.
  """
  if config.get('prng_impl'):
    # Process-wide: 'rbg' compiles much faster than threefry on XLA:CPU (the demo).
    jax.config.update('jax_default_prng_impl', config.prng_impl)
  if config.get('compilation_cache_dir'):
    # A restarted (preempted) run then loads its compiled steps instead of recompiling.
    jax.config.update('jax_compilation_cache_dir', config.compilation_cache_dir)
  mesh = sharding.create_mesh(config.mesh)
  logging.info('Mesh %s over %d devices, %d processes.', dict(mesh.shape), mesh.size,
               jax.process_count())
  writer = metrics_writer.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  try:
    if config.eval_only:
      return _evaluate_only(config, workdir, mesh, writer)
    return _train(config, workdir, mesh, writer)
  finally:
    writer.close()


def _eval_iterator(config, mesh, data):
  """One pass over the eval split that `data` (config.data or a variant of it) describes."""
  return input_pipeline.create_eval_iterator(
      data, global_batch_size=config.eval_batch_size,
      mesh_sharding=sharding.batch_sharding(mesh))


def _evaluate_only(config, workdir, mesh, writer) -> dict[str, Any]:
  """Loads `config.init_from` and reports top-1/top-5/loss over the whole eval split, its
  images preprocessed as `config.eval_only_preprocessing` says."""
  if not config.init_from:
    raise ValueError('config.eval_only needs config.init_from (converted weights or a run).')
  model, variables, metadata = loading.load_with_metadata(
      config.init_from, dtype=jnp.dtype(config.get('dtype', 'float32')),
      kernels=kernel_forms.for_devices(mesh))
  # The weights are evaluated as their own run evaluated them (config.data's where they store
  # nothing), unless the config asks for its own preprocessing, e.g. to test another size.
  choice = config.get('eval_only_preprocessing', 'weights')
  if choice not in ('weights', 'config'):
    raise ValueError(f"config.eval_only_preprocessing must be 'weights' or 'config', got "
                     f'{choice!r}')
  preprocessing, origin = eval_preprocessing.from_config(config.data), 'config.data'
  if choice == 'weights':
    preprocessing, origin = eval_preprocessing.from_metadata(metadata, default=preprocessing)
    if origin == eval_preprocessing.DEFAULT:
      origin = 'config.data: init_from stores none'
  data = input_pipeline.with_eval_preprocessing(config.data, preprocessing)
  logging.info('Eval-only preprocessing: %s (%s).', preprocessing.describe(), origin)
  weights = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  shardings = sharding.state_shardings(weights, mesh, config.fsdp_min_size)
  weights = _place(weights, shardings)
  batch_sh = sharding.batch_sharding(mesh)
  eval_fn = jax.jit(sharding.traced_on(mesh, lambda w, b: eval_step(model, {'raw': w}, b)),
                    in_shardings=(shardings, {'image': batch_sh, 'label': batch_sh,
                                              'mask': batch_sh}),
                    out_shardings=sharding.replicated(mesh))
  start = time.time()
  results = evaluate(eval_fn, weights, _eval_iterator(config, mesh, data))['raw']
  step = int(metadata.get('step', 0))
  event = writer.write(step, 'eval_only', {'loss': results['loss'], 'top1': results['top1'],
                                           'top5': results['top5'],
                                           'num_images': results['count'],
                                           'images_per_sec': results['count'] /
                                           max(time.time() - start, 1e-9)})
  logging.info('Eval-only %s (%s): top-1 %.4f  top-5 %.4f  loss %.4f over %d images.',
               config.init_from, metadata.get('model'), results['top1'], results['top5'],
               results['loss'], results['count'])
  return {'step': step, 'eval': {k: event[k] for k in ('loss', 'top1', 'top5')},
          'count': int(results['count'])}


@flax.struct.dataclass
class Programs:
  """What a run compiles, built from the config and the mesh alone (no data, no weights).

  `train_and_evaluate` runs these; `rmt_jax.tpu_compile` compiles the same ones ahead of time
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
                   steps_per_epoch: int, total_steps: int) -> Programs:
  """The model, optimizer, state shardings and jitted steps of a run of `config` on `mesh`.

  Args:
    config: the run's config.
    mesh: from `sharding.create_mesh` (real devices, or a TPU topology's for AOT compiles).
    steps_per_epoch: optimizer steps per epoch (the schedule's unit).
    total_steps: optimizer steps of the run.

  Raises:
    ValueError: the global batch does not split into `grad_accum_steps` x devices.
  """
  model = build_model(config, mesh)
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
                                         micro_sharding=batch_sh)),
      in_shardings=(state_sh, batch_shardings),
      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  p_eval = jax.jit(
      sharding.traced_on(mesh, lambda s, b: eval_step(
          model, {'raw': {'params': s.params, 'batch_stats': s.batch_stats},
                  'ema': {'params': s.ema_params, 'batch_stats': s.ema_batch_stats}}, b)),
      in_shardings=(state_sh, {'image': batch_sh, 'label': batch_sh, 'mask': batch_sh}),
      out_shardings=sharding.replicated(mesh))
  return Programs(model=model, schedule=schedule, tx=tx, init_fn=init_fn, abstract_state=abstract,
                  state_shardings=state_sh, batch_sharding=batch_sh, train_step=p_train,
                  eval_step=p_eval)


def _train(config, workdir, mesh, writer) -> dict[str, Any]:
  batch_sh = sharding.batch_sharding(mesh)
  train_iter = input_pipeline.create_train_iterator(
      config.data, global_batch_size=config.global_batch_size, seed=config.seed,
      mesh_sharding=batch_sh)
  eval_data = _eval_iterator(config, mesh, config.data)
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = (int(config.total_steps) if config.get('total_steps', -1) > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  programs = build_programs(config, mesh, steps_per_epoch, total_steps)
  schedule = programs.schedule
  state_sh, abstract, init_fn = programs.state_shardings, programs.abstract_state, programs.init_fn
  p_train, p_eval = programs.train_step, programs.eval_step

  def load_weights(state, variables, _):
    params = merge_weights(state.params, variables['params'],
                           reinit_head=config.init_reinit_head)
    batch_stats = merge_weights(state.batch_stats, variables.get('batch_stats', {}),
                                collection='batch_stats')
    params = _place(params, state_sh.params)
    batch_stats = _place(batch_stats, state_sh.batch_stats)
    # timm creates the EMA after loading the fine-tuning weights: it starts from them.
    return state.replace(params=params, batch_stats=batch_stats,
                         ema_params=jax.tree.map(jnp.copy, params),
                         ema_batch_stats=jax.tree.map(jnp.copy, batch_stats))

  ckpt = checkpoint.TrainCheckpointer(workdir, max_to_keep=config.max_to_keep,
                                      async_save=config.async_checkpoints)
  # The evaluation's preprocessing travels with the weights: predict, visualize and eval-only
  # runs prepare images as this run's evaluation did (a 32 px digit is no 224 px photo).
  meta = {'model': config.model, 'model_overrides': model_overrides(config),
          eval_preprocessing.METADATA_KEY:
              eval_preprocessing.from_config(config.data).to_metadata()}
  names = input_pipeline.class_names(config.data)
  if names:  # `predict` prints them (a folder's class names, ImageNet's readable names).
    meta['class_names'] = names
  preemption = _Preemption()
  try:
    state, data_state, source = checkpoint.restore_or_initialize(
        ckpt, abstract,
        initialize=jax.jit(init_fn, out_shardings=state_sh),
        init_from=config.init_from, load_weights=load_weights)
    if data_state is not None:
      train_iter.set_state(data_state)
    step = int(jax.device_get(state.step))
    logging.info('Starting at step %d of %d (%d per epoch) from %s.', step, total_steps,
                 steps_per_epoch, source)
    return _loop(config, state, step, total_steps, steps_per_epoch, train_iter, eval_data,
                 p_train, p_eval, schedule, ckpt, meta, writer, preemption)
  finally:
    preemption.close()
    ckpt.close()


def _loop(config, state, step, total_steps, steps_per_epoch, train_iter, eval_data, p_train,
          p_eval, schedule, ckpt, meta, writer, preemption) -> dict[str, Any]:
  """Steps until `total_steps`, logging, evaluating, checkpointing; see `train_and_evaluate`."""
  pending: list[tuple[int, dict]] = []  # Per-step device metrics not yet looked at.
  last = {'step': step, 'preempted': False}
  window_start, window_steps = time.time(), 0
  run_start, run_start_step = time.time(), step
  eval_every = max(int(round(config.eval_every_epochs * steps_per_epoch)), 1)

  def flush_train_metrics():
    """Checks every pending step's loss (raises on a non-finite one); logs their mean."""
    nonlocal pending, window_start, window_steps
    if not pending:
      return
    values = jax.device_get([m for _, m in pending])
    for (s, _), v in zip(pending, values):
      if not np.isfinite(v['loss']):
        raise NonFiniteLossError(
            f'Loss is {v["loss"]} at step {s}; stopping. The last good checkpoint is step '
            f'{ckpt.latest_step()} in {ckpt.directory}.')
    elapsed = time.time() - window_start
    done = pending[-1][0]
    rate = window_steps * config.global_batch_size / max(elapsed, 1e-9)
    event = writer.write(done, 'train', {
        'loss': float(np.mean([v['loss'] for v in values])),
        'grad_norm': float(np.mean([v['grad_norm'] for v in values])),
        'learning_rate': float(schedule(done - 1)), 'images_per_sec': rate,
        'epoch': done / steps_per_epoch})
    per_step = (time.time() - run_start) / max(done - run_start_step, 1)
    metrics_writer.log_progress(done, total_steps, steps_per_epoch, event,
                                per_step * (total_steps - done))
    last['train_loss'] = event['loss']
    pending, window_start, window_steps = [], time.time(), 0

  def save(at_step):
    flush_train_metrics()  # Never save a state that follows a non-finite loss.
    ckpt.save(at_step, state, train_iter.get_state(), meta)

  def run_eval():
    flush_train_metrics()
    results = evaluate(p_eval, state, eval_data)
    for split, values in _eval_events(results).items():
      event = writer.write(step, split, values)
      metrics_writer.log_progress(step, total_steps, steps_per_epoch, event, None)
      last[split] = values

  if step >= total_steps:
    logging.info('The run is complete (step %d); evaluating its final weights only.', step)
    run_eval()
  while step < total_steps:
    batch = next(train_iter)
    state, metrics = p_train(state, batch)
    step += 1
    window_steps += 1
    pending.append((step, metrics))
    if step % config.log_every_steps == 0 or step == total_steps:
      flush_train_metrics()
    if preemption.reached(step):
      save(step)
      ckpt.wait_until_finished()
      logging.warning('Preempted (SIGTERM): saved step %d in %s; exiting.', step, ckpt.directory)
      last.update(step=step, preempted=True, state=state)
      return last
    if step % eval_every == 0 or step == total_steps:
      run_eval()
    if (step % config.checkpoint_every_steps == 0 or step == total_steps
        or (config.checkpoint_every_epoch and step % steps_per_epoch == 0)):
      save(step)
    last['step'] = step
  flush_train_metrics()
  last['state'] = state
  return last
