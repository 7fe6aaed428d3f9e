"""The training loop: data in, the jitted steps, evaluation, checkpoints, metrics; eval-only.

`train_and_evaluate(config, workdir)` runs the official RMT recipe (DeiT's, as in
qhfan/RMT `classfication_release/main.py`) on any number of devices and hosts: it builds the
jitted steps of `steps.py` for the mesh (`steps.build_programs`), feeds them the input
pipeline's global batches (Mixup/CutMix/label-smoothed targets), and evaluates the EMA of the
weights and BatchNorm statistics beside the raw weights after every epoch (top-1, top-5, loss).
The task (`config.task`: classification, or segmentation) brings its data, programs and
evaluation (`tasks.Task`, `task_for`); everything else here is shared.
Checkpoints, resumption and `init_from` weights go through `rmt_jax.weights.checkpoint`;
metrics through `metrics_writer.py`. With `config.eval_only` it evaluates `config.init_from`
over the whole eval split instead.
"""

import dataclasses
import math
import signal
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rmt_jax.data import eval_preprocessing
from rmt_jax.data import input_pipeline
from rmt_jax.kernels import check
from rmt_jax.kernels import selection as kernel_forms
from rmt_jax.kernels.tpu import operations as tpu_operations
from rmt_jax.train import device_augment
from rmt_jax.train import kernel_check
from rmt_jax.train import metrics_writer
from rmt_jax.train import sharding
from rmt_jax.train import segmentation
from rmt_jax.train import steps
from rmt_jax.train import tasks
from rmt_jax.weights import checkpoint
from rmt_jax.weights import loading


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss; the message gives the step and the last checkpoint."""


def task_for(config: ml_collections.ConfigDict, workdir: str) -> tasks.Task:
  """The task that `config.task` names ('classification' when absent).

  Raises:
    ValueError: an unknown task.
  """
  name = config.get('task', 'classification')
  if name == 'classification':
    return tasks.Classification()
  if name == 'segmentation':
    return segmentation.Segmentation(workdir)
  raise ValueError(f'config.task must be one of {tasks.TASKS}, got {name!r}')


def _to_global_arrays(tree: Any, shardings: Any) -> Any:
  """Host arrays -> global jax.Arrays (every process holds the same values)."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


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
    and, when training, the final 'state' (a `steps.TrainState` of global arrays).

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
  task = task_for(config, workdir)
  if config.eval_only and task.name != 'classification':
    raise ValueError(f'config.eval_only evaluates classifiers; a {task.name} run evaluates its '
                     'weights by training for 0 more steps (rerun a finished workdir).')
  writer = metrics_writer.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  try:
    # Every program of the run is traced within the on-device kernel check's decisions.
    with tpu_operations.declined(_declined_kernels(config, mesh, workdir)):
      if config.eval_only:
        return _evaluate_init_from(config, mesh, writer)
      return _start_or_resume_training(config, workdir, mesh, writer, task)
  finally:
    writer.close()


def _declined_kernels(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      workdir: str) -> list[tpu_operations.Key]:
  """The TPU kernels this run does not use: where `config.kernels` is 'auto' and the mesh's
  devices are TPUs, those the on-device check finds wrong, failing or slower than their plain
  forms (`kernel_check.check_model`, cached in the workdir); none elsewhere ('tpu' forces the
  kernels, 'xla' the plain forms, other devices have no TPU kernels)."""
  if config.get('kernels', 'auto') != 'auto' or kernel_forms.for_devices(mesh) != 'tpu':
    return []
  model = steps.build_model(config, mesh)
  say = lambda line: (logging.warning if line.startswith('warning:') else logging.info)(line)
  results = kernel_check.check_model(model, max(1, config.global_batch_size // mesh.size),
                                     config.data.image_size, workdir,
                                     augment=device_augment.DeviceAugment.for_run(config, mesh),
                                     say=say)
  logging.info('Kernel check (rmt_jax.kernels.check):\n%s', check.table(results))
  # Every process traces the same programs: process 0's choices (its timings) hold for all.
  chosen = np.array([r.chosen == 'kernel' for r in results])
  if jax.process_count() > 1:
    chosen = multihost_utils.broadcast_one_to_all(chosen)
  return [r.key for r, kept in zip(results, chosen) if not kept]


def _eval_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  data: ml_collections.ConfigDict) -> Iterable[dict[str, jax.Array]]:
  """One pass over the eval split that `data` (config.data or a variant of it) describes."""
  return input_pipeline.create_eval_iterator(
      data, global_batch_size=config.eval_batch_size,
      mesh_sharding=sharding.batch_sharding(mesh))


# ---------------------------------------------------------------------------------------
# Eval-only: weights from elsewhere over the whole eval split.


def _evaluate_init_from(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                        writer: metrics_writer.MetricsWriter) -> dict[str, Any]:
  """Loads `config.init_from` and reports top-1/top-5/loss over the whole eval split, its
  images preprocessed as `config.eval_only_preprocessing` says."""
  if not config.init_from:
    raise ValueError('config.eval_only needs config.init_from (converted weights or a run).')
  model, variables, metadata = loading.load_with_metadata(
      config.init_from, dtype=jnp.dtype(config.get('dtype', 'float32')),
      kernels=steps.kernel_forms_for(config, mesh))
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
  weights = _to_global_arrays(weights, shardings)
  batch_sh = sharding.batch_sharding(mesh)
  eval_fn = jax.jit(
      sharding.traced_on(mesh, lambda w, b: steps.eval_step(model, {'raw': w}, b)),
      in_shardings=(shardings, {'image': batch_sh, 'label': batch_sh, 'mask': batch_sh}),
      out_shardings=sharding.replicated(mesh))
  start = time.time()
  results = tasks.classification_means(
      tasks.sum_over_batches(eval_fn, weights, _eval_batches(config, mesh, data)))['raw']
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


# ---------------------------------------------------------------------------------------
# Training: the setup, then the loop.


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


@dataclasses.dataclass(frozen=True)
class LoopSetup:
  """What the training loop reads, besides the state it advances and the step it is at.

  Attributes:
    config: the run's config (the log, eval and checkpoint intervals, the global batch size).
    total_steps: optimizer steps of the whole run; the loop stops there.
    steps_per_epoch: optimizer steps per epoch (the unit of `config.eval_every_epochs`).
    train_batches: endless global training batches (`Task.train_batches`); its `get_state()`
      is saved with each checkpoint.
    train_step: jitted (state, batch) -> (state, {'loss', 'grad_norm'}) (`Programs.train_step`).
    evaluate: (state, step) -> {split: {metric: value}} for the raw and EMA weights, one pass
      over the held-out data (`Task.evaluate` with `Programs.eval_step`).
    learning_rate: step -> learning rate (the run's schedule), for the logs.
    checkpointer: saves the state, the data position and `checkpoint_metadata`.
    checkpoint_metadata: what every checkpoint stores beside the state (the model, its
      overrides, the evaluation preprocessing, the class names: `Task.checkpoint_metadata`).
    writer: where the metrics go.
    preemption: `reached(step)` says when a SIGTERM asks the run to save and stop.
  """
  config: ml_collections.ConfigDict
  total_steps: int
  steps_per_epoch: int
  train_batches: input_pipeline.TrainIterator
  train_step: Callable[..., Any]
  evaluate: Callable[[Any, int], Mapping[str, Mapping[str, float]]]
  learning_rate: optax.Schedule
  checkpointer: checkpoint.TrainCheckpointer
  checkpoint_metadata: Mapping[str, Any]
  writer: metrics_writer.MetricsWriter
  preemption: _Preemption


def _start_or_resume_training(config: ml_collections.ConfigDict, workdir: str,
                              mesh: jax.sharding.Mesh,
                              writer: metrics_writer.MetricsWriter,
                              task: tasks.Task) -> dict[str, Any]:
  """Builds the task's data and programs and the checkpointer; restores or initialises the
  state (see `train_and_evaluate`); runs the loop."""
  train_batches = task.train_batches(config, mesh)
  eval_batches = task.eval_batches(config, mesh)
  steps_per_epoch = train_batches.steps_per_epoch
  total_steps = (int(config.total_steps) if config.get('total_steps', -1) > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  programs = task.build_programs(config, mesh, steps_per_epoch, total_steps)
  state_sh = programs.state_shardings

  def load_weights(state, variables, _):
    variables = task.variables_for_network(variables)
    params = steps.merge_weights(state.params, variables['params'],
                                 reinit_head=config.init_reinit_head)
    batch_stats = steps.merge_weights(state.batch_stats, variables.get('batch_stats', {}),
                                      collection='batch_stats')
    params = _to_global_arrays(params, state_sh.params)
    batch_stats = _to_global_arrays(batch_stats, state_sh.batch_stats)
    # timm creates the EMA after loading the fine-tuning weights: it starts from them.
    return state.replace(params=params, batch_stats=batch_stats,
                         ema_params=jax.tree.map(jnp.copy, params),
                         ema_batch_stats=jax.tree.map(jnp.copy, batch_stats))

  ckpt = checkpoint.TrainCheckpointer(workdir, max_to_keep=config.max_to_keep,
                                      async_save=config.async_checkpoints)
  meta = task.checkpoint_metadata(config)
  preemption = _Preemption()
  try:
    state, data_state, source = checkpoint.restore_or_initialize(
        ckpt, programs.abstract_state,
        initialize=jax.jit(programs.init_fn, out_shardings=state_sh),
        init_from=config.init_from, load_weights=load_weights)
    if data_state is not None:
      train_batches.set_state(data_state)
    step = int(jax.device_get(state.step))
    logging.info('Starting at step %d of %d (%d per epoch) from %s.', step, total_steps,
                 steps_per_epoch, source)
    setup = LoopSetup(
        config=config, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        train_batches=train_batches, train_step=programs.train_step,
        evaluate=lambda s, at: task.evaluate(programs.eval_step, s, eval_batches, at),
        learning_rate=programs.schedule, checkpointer=ckpt, checkpoint_metadata=meta,
        writer=writer, preemption=preemption)
    return _run_loop(setup, state, step)
  finally:
    preemption.close()
    ckpt.close()


def _run_loop(setup: LoopSetup, state: Any, step: int) -> dict[str, Any]:
  """Steps `state` from `step` to `setup.total_steps`, logging, evaluating, checkpointing; see
  `train_and_evaluate` (what it returns, what it raises)."""
  config, total_steps, steps_per_epoch = setup.config, setup.total_steps, setup.steps_per_epoch
  ckpt, writer = setup.checkpointer, setup.writer
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
        'learning_rate': float(setup.learning_rate(done - 1)), 'images_per_sec': rate,
        'epoch': done / steps_per_epoch})
    per_step = (time.time() - run_start) / max(done - run_start_step, 1)
    metrics_writer.log_progress(done, total_steps, steps_per_epoch, event,
                                per_step * (total_steps - done))
    last['train_loss'] = event['loss']
    pending, window_start, window_steps = [], time.time(), 0

  def save_checkpoint(at_step):
    flush_train_metrics()  # Never save a state that follows a non-finite loss.
    ckpt.save(at_step, state, setup.train_batches.get_state(), setup.checkpoint_metadata)

  def evaluate_and_log():
    flush_train_metrics()
    for split, values in setup.evaluate(state, step).items():
      event = writer.write(step, split, values)
      metrics_writer.log_progress(step, total_steps, steps_per_epoch, event, None)
      last[split] = values

  if step >= total_steps:
    logging.info('The run is complete (step %d); evaluating its final weights only.', step)
    evaluate_and_log()
  while step < total_steps:
    batch = next(setup.train_batches)
    state, metrics = setup.train_step(state, batch)
    step += 1
    window_steps += 1
    pending.append((step, metrics))
    if step % config.log_every_steps == 0 or step == total_steps:
      flush_train_metrics()
    if setup.preemption.reached(step):
      save_checkpoint(step)
      ckpt.wait_until_finished()
      logging.warning('Preempted (SIGTERM): saved step %d in %s; exiting.', step, ckpt.directory)
      last.update(step=step, preempted=True, state=state)
      return last
    if step % eval_every == 0 or step == total_steps:
      evaluate_and_log()
    if (step % config.checkpoint_every_steps == 0 or step == total_steps
        or (config.checkpoint_every_epoch and step % steps_per_epoch == 0)):
      save_checkpoint(step)
    last['step'] = step
  flush_train_metrics()
  last['state'] = state
  return last
