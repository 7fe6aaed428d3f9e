"""Checkpoints on disk: directories of model variables (orbax) with a JSON description.

A variables directory, as written by `python -m rmt_jax.convert torch2flax` or
`save_variables`, holds:

    DIR/rmt_jax.json   {"format": "rmt_jax.variables", "version": 1, "model": "rmt_s",
                        "model_overrides": {...}, ...anything the writer adds}
    DIR/variables/     an orbax StandardCheckpointer tree: {'params', 'batch_stats',
                        and optionally 'official_buffers'} (see rmt_jax.weights.pytorch)

`load_variables` reads it back as host (NumPy) arrays; it also reads a training workdir (the
latest checkpoint's EMA weights, or raw weights where the run kept no EMA).

Training runs (`TrainCheckpointer`, `restore_or_initialize`) keep an orbax CheckpointManager
under WORKDIR/checkpoints/<step>/{state, data, meta}: the whole train state, the input
pipeline's position and the model's description; saves are asynchronous and atomic, and a run
resumes from the newest checkpoint that reads back whole. A checkpoint damaged after it was
written (truncated or missing files) costs that checkpoint, not the run: readers warn in one line
and take the next older one, and a resuming run moves the damaged one aside to
`<step>.damaged-<n>` (kept for inspection, never deleted) so that it can save that step again.
"""

import contextlib
import gc
import json
import logging as std_logging
import os
import re
import secrets
import sys
import tempfile
import traceback
from typing import Any, Callable, Mapping, Sequence, TypeVar

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from etils import epath
import orbax.checkpoint as ocp

FORMAT = 'rmt_jax.variables'
METADATA_FILE = 'rmt_jax.json'
VARIABLES_DIR = 'variables'

_T = TypeVar('_T')


class CheckpointNotFoundError(FileNotFoundError):
  """The path holds no rmt_jax checkpoint; the message says what was expected there."""


class CheckpointUnreadableError(CheckpointNotFoundError):
  """A training run's checkpoints all fail to read; the message lists each step and why.

  A subclass of `CheckpointNotFoundError`, so that commands which report a missing checkpoint
  in one line (predict, convert, visualize) report this one alike.
  """


def resolve_path(path: str | os.PathLike) -> epath.Path:
  """A path the user gave, local or on an object store (gs://, s3://), as an `epath.Path`.

  `pathlib.Path('gs://bucket/w')` is `gs:/bucket/w`, a local path; epath keeps the URL and
  reaches the bucket through TensorFlow's or fsspec's file systems. Local paths are made
  absolute (orbax refuses relative ones) with `~` expanded.
  """
  text = os.fspath(path)
  if is_object_store(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_object_store(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (gs://bucket/..., s3://...) rather than a local path."""
  return '://' in os.fspath(path)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
  """Writes a new file whole or not at all.

  Locally the bytes go to a hidden file beside `path` that is renamed into place; an object
  store has no rename, but it publishes an object only once its upload is complete, so the
  object is written directly.

  Raises:
    FileExistsError: `path` exists.
  """
  path = resolve_path(path)
  if path.exists():
    raise FileExistsError(f'{path} exists; choose a new name or remove it first')
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_object_store(path):
    path.write_bytes(data)
    return
  # Created with open(), not mkstemp: the file gets the umask's permissions, not 0600.
  staging = path.parent / f'.{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}'
  try:
    with open(staging, 'xb') as f:
      f.write(data)
    os.replace(staging, path)
  except BaseException:
    staging.unlink(missing_ok=True)
    raise


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any]) -> None:
  """Writes `variables` and their description to a new directory, atomically.

  Locally the directory is assembled beside `path` and renamed into place only when complete.
  On an object store (no directory renames) it is written in place with `rmt_jax.json` last:
  readers require that file, so an interrupted save is never read as weights, and a failed
  one removes what it wrote.

  Args:
    path: the directory to create (local or gs://...); must not exist.
    variables: {'params', 'batch_stats', ...} of arrays.
    metadata: JSON-serialisable description; must name the variant under 'model' (and any
      `create_model` overrides under 'model_overrides') so that readers can rebuild the model;
      'class_names' (one per output, in label order) names the classes for `predict`;
      'eval_preprocessing' (`rmt_jax.data.eval_preprocessing`) says how `predict` prepares images.

  Raises:
    FileExistsError: `path` exists.
    ValueError: metadata without 'model'.
  """
  path = resolve_path(path)
  if path.exists():
    raise FileExistsError(f'{path} exists; choose a new directory or remove it first')
  if 'model' not in metadata:
    raise ValueError("metadata must name the variant under 'model'")
  path.parent.mkdir(parents=True, exist_ok=True)
  local = not is_object_store(path)
  if local:
    staging = epath.Path(tempfile.mkdtemp(prefix=f'.{path.name}.partial-', dir=path.parent))
    # mkdtemp makes the directory private (0700); a weights directory is meant to be shared
    # like any other directory the user creates.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
  else:
    staging = path
  try:
    host = jax.tree.map(np.asarray, dict(variables))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / VARIABLES_DIR, host)
    checkpointer.wait_until_finished()
    description = json.dumps({'format': FORMAT, 'version': 1, **metadata}, indent=2,
                             sort_keys=True)
    write_atomically(staging / METADATA_FILE, description.encode())
    if local:
      staging.rename(path)
  except BaseException:
    staging.rmtree(missing_ok=True)
    raise


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON description of a variables directory (local or on an object store).

  Raises:
    CheckpointNotFoundError: `path` is not a variables directory.
  """
  path = resolve_path(path)
  meta_file = path / METADATA_FILE
  if not meta_file.exists() or not (path / VARIABLES_DIR).is_dir():
    raise CheckpointNotFoundError(
        f'{path} is not an rmt_jax variables directory (expected {METADATA_FILE} and '
        f'{VARIABLES_DIR}/ in it, as written by `python -m rmt_jax.convert torch2flax`)')
  metadata = json.loads(meta_file.read_text())
  if metadata.get('format') != FORMAT:
    raise CheckpointNotFoundError(f'{meta_file} is not an rmt_jax variables description')
  return metadata


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads the weights in a variables directory or a training workdir, and their description.

  Returns a pair, not variables alone: `model.apply(variables, x)` takes the first element.
  To get the model too, use `rmt_jax.load(path)`, which rebuilds it from the description.

  Args:
    path: a directory written by `save_variables` (e.g. by the converter), or a training
      workdir (`main.py --workdir`): its newest readable checkpoint, EMA weights where the run
      kept them (metadata['weights'] says 'ema' or 'raw'; metadata['step'] the step). Local or
      on an object store (gs://...).

  Returns:
    (variables, metadata): variables = {'params', 'batch_stats'[, 'official_buffers']} as
    NumPy arrays; metadata = the JSON description: 'model' and 'model_overrides' (the
    `create_model` arguments), 'class_names' and 'eval_preprocessing' where the writer stored
    them, and whatever else the writer added ('step', 'weights', 'source', ...).

  Raises:
    CheckpointNotFoundError: `path` holds no checkpoint that rmt_jax can read.
    CheckpointUnreadableError: a training workdir none of whose checkpoints reads back
      (each damaged one newer than the one read is reported in a warning line).
  """
  path = resolve_path(path)
  if not (path / METADATA_FILE).exists():
    run = _training_checkpoints(path)
    if run is not None:
      return _load_training_run(run[0])
  metadata = read_metadata(path)
  restored = ocp.StandardCheckpointer().restore(path / VARIABLES_DIR)
  return jax.tree.map(np.asarray, restored), metadata


# ---------------------------------------------------------------------------------------
# Training runs: an orbax CheckpointManager over WORKDIR/checkpoints.
#
#   WORKDIR/checkpoints/<step>/state/   the train state pytree (each process writes its shards)
#   WORKDIR/checkpoints/<step>/data/    the input pipeline position (JSON, process 0 writes)
#   WORKDIR/checkpoints/<step>/meta/    {'model', 'model_overrides', 'step', 'class_names',
#                                        'eval_preprocessing'} (JSON)
#   WORKDIR/checkpoints/<step>.damaged-<n>/   a checkpoint that failed to read when the run
#                                        resumed, moved aside whole (see below)
#
# orbax writes each step into a temporary directory and renames it when every process has
# finished, so a run killed mid-save leaves the previous step as the latest complete one. That
# protects the write, not the files afterwards (a disk error, an interrupted copy, a bucket's
# lifecycle rule), so readers try the checkpoints from the newest down. A resuming run moves
# each damaged checkpoint it skipped out of orbax's step naming (orbax lists only `<step>`
# directories) instead of deleting it: left as `<step>`, it would stay the "latest" step, make
# the save of that step fail (StepAlreadyExistsError) when the resumed run reaches it again,
# and hold a place among the `max_to_keep` newest, so that orbax would delete an intact older
# checkpoint in its favour. Moved aside, it is kept for inspection and orbax never deletes it.

CHECKPOINTS_DIR = 'checkpoints'
DAMAGED_SUFFIX = '.damaged-'


class TrainCheckpointer:
  """Periodic, asynchronous checkpoints of a training run.

  Every process must call `save`, `restore` and `set_aside` at the same steps (orbax
  synchronises them).

  Args:
    workdir: the run's directory (local, gs://, ...).
    max_to_keep: the newest checkpoints kept; older ones are deleted.
    async_save: write in a background thread after the arrays are copied to host memory, so
      that training continues during the write.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    workdir = str(workdir)
    if '://' not in workdir:  # orbax refuses relative paths; URLs (gs://...) are absolute
      workdir = os.path.abspath(workdir)
    self.directory = os.path.join(workdir, CHECKPOINTS_DIR)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        # The loop decides when to save (interval, epoch end, preemption, end of run).
        save_interval_steps=1)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=_item_handlers())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The complete checkpoints' steps, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def save(self, step: int, state: Any, data_state: Mapping[str, Any],
           meta: Mapping[str, Any]) -> None:
    """Starts saving; returns once the arrays are on the host (donating them is then safe)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
        meta=ocp.args.JsonSave({**meta, 'step': int(step)})), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """(state placed as `abstract_state`'s shardings say, data iterator position)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['data'])

  def set_aside(self, step: int) -> epath.Path:
    """Moves checkpoint `step` to `<step>.damaged-<n>` beside it, out of the run's steps.

    Nothing is deleted: the files stay for inspection, and the run may save `step` again.
    Process 0 moves it; every process calls this and waits for the move.

    Returns:
      The checkpoint's new path (n is the first number not yet used for `step`).
    """
    source = resolve_path(self.directory) / str(step)
    # Every process names the same target before any of them moves anything.
    target = _unused_damaged_path(source)
    _sync_processes(f'rmt_jax_set_aside_{step}_named')
    if jax.process_index() == 0:
      source.rename(target)
    _sync_processes(f'rmt_jax_set_aside_{step}_moved')
    self._manager.reload()
    return target

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases the manager's threads."""
    self._manager.wait_until_finished()
    self._manager.close()


def restore_or_initialize(
    checkpointer: TrainCheckpointer, abstract_state: Any, *,
    initialize: Callable[[], Any], init_from: str = '',
    load_weights: Callable[[Any, Mapping[str, Any], Mapping[str, Any]], Any] | None = None,
) -> tuple[Any, dict[str, Any] | None, str]:
  """The train state to start from, in the resume order of the house style.

  1. The newest checkpoint in the workdir that reads back (a resumed or preempted run): the
     whole state and the data position. Each newer one that fails to read (missing or
     truncated files, a bad manifest, shapes that no longer fit the model) is moved aside to
     `<step>.damaged-<n>` (`TrainCheckpointer.set_aside`) with one warning line naming its
     step, path and the reason.
  2. Else `init_from` (converted PyTorch weights, or another run's workdir): a fresh state
     whose weights `load_weights(state, variables, metadata)` replaces.
  3. Else the fresh state from `initialize()`.

  Args:
    checkpointer: the run's checkpoints.
    abstract_state: shapes, dtypes and shardings of the state (restore target).
    initialize: builds the fresh, sharded state.
    init_from: '' or a path `load_variables` accepts.
    load_weights: needed with `init_from`.

  Returns:
    (state, data iterator position or None for "from the start", where it came from:
    'checkpoint <step>', 'init_from <path>' or 'scratch').

  Raises:
    CheckpointUnreadableError: the workdir has checkpoints and none of them reads back
      (nothing is moved then: the run stops rather than start over from scratch).
  """
  steps = checkpointer.all_steps()
  if steps:
    step, (state, data_state), failures = _newest_readable(
        checkpointer.directory, steps, lambda s: checkpointer.restore(s, abstract_state))
    for damaged, path, reason in failures:
      moved_to = checkpointer.set_aside(damaged)
      logging.warning('Checkpoint step %d at %s cannot be read (%s); moved it aside to %s '
                      'and resuming from step %d.', damaged, path, reason, moved_to, step)
    return state, data_state, f'checkpoint {step}'
  state = initialize()
  if init_from:
    if load_weights is None:
      raise ValueError('init_from needs load_weights')
    variables, metadata = load_variables(init_from)
    return load_weights(state, variables, metadata), None, f'init_from {init_from}'
  return state, None, 'scratch'


def _newest_readable(directory: str, steps: Sequence[int], read: Callable[[int], _T]
                     ) -> tuple[int, _T, list[tuple[int, epath.Path, str]]]:
  """`read(step)` for the newest of `steps` that reads back.

  Args:
    directory: the checkpoints/ directory that holds the steps.
    steps: the complete checkpoints' steps.
    read: reads one step; any exception it raises marks that step unreadable.

  Returns:
    (the step read, what `read` returned, [(step, path, reason)] for each newer step that
    failed, newest first).

  Raises:
    CheckpointUnreadableError: every step failed; the one-line message lists them.
  """
  failures = []
  for step in sorted(steps, reverse=True):
    try:
      with _abandoned_reads_quiet():
        return step, read(step), failures
    # Broad on purpose: orbax and TensorStore report damage as ValueError (OUT_OF_RANGE,
    # DATA_LOSS, NOT_FOUND, a pytree mismatch), FileNotFoundError, KeyError, ...; whatever the
    # cause, the step is reported with its reason and an older one is tried.
    except Exception as e:  # pylint: disable=broad-except
      failures.append((step, resolve_path(directory) / str(step), _one_line(e)))
  tried = '; '.join(f'step {step} at {path}: {reason}' for step, path, reason in failures)
  raise CheckpointUnreadableError(
      f'none of the {len(failures)} checkpoints in {directory} can be read ({tried}); nothing '
      f'was moved or deleted: restore their files, or move {directory} away to start over')


class _DropAbandonedReads(std_logging.Filter):
  """Drops asyncio's "exception was never retrieved" records (see `_abandoned_reads_quiet`)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return 'exception was never retrieved' not in record.getMessage()


@contextlib.contextmanager
def _abandoned_reads_quiet():
  """Keeps a failed read to the one line its caller writes.

  orbax reads a checkpoint's arrays concurrently, each an asyncio task awaiting a TensorStore
  read, in an event loop of its own; when one read fails it raises and closes that loop, and the
  other reads of the damaged files are abandoned. Two kinds of noise follow, each repeating the
  damage already reported, hundreds of lines of it:
  - asyncio logs each abandoned read's error, when collected, with TensorStore's whole spec;
  - each abandoned read that finishes later (on TensorStore's threads, possibly after the run
    has printed its `error:` line) wakes its task through the closed loop, and TensorStore
    reports the resulting "Event loop is closed" RuntimeError as an unraisable exception, whose
    traceback Python prints. `_drop_closed_loop_wakeups` drops those, from the first read to
    the end of the process: they may come before the failure reaches this function (orbax
    closes its loop first) and long after it, and nothing waits for those reads any more.
  """
  _drop_closed_loop_wakeups()
  asyncio_logger = std_logging.getLogger('asyncio')
  quiet = _DropAbandonedReads()
  asyncio_logger.addFilter(quiet)
  try:
    yield
  finally:
    gc.collect()  # The abandoned reads are logged now, while the filter holds.
    asyncio_logger.removeFilter(quiet)


def _is_closed_loop_wakeup(unraisable: Any) -> bool:
  """Whether an unraisable exception is a finished read waking a task whose loop is closed."""
  error = unraisable.exc_value
  return (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'
          and unraisable.object is None
          and any(frame.name == 'call_soon_threadsafe'
                  for frame in traceback.extract_tb(unraisable.exc_traceback)))


def _drop_closed_loop_wakeups() -> None:
  """Installs, once, a `sys.unraisablehook` that drops `_is_closed_loop_wakeup` exceptions and
  passes every other one to the hook it replaces."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_wakeups', False):
    return

  def hook(unraisable):
    if not _is_closed_loop_wakeup(unraisable):
      previous(unraisable)

  hook.drops_closed_loop_wakeups = True
  sys.unraisablehook = hook


def _one_line(error: Exception, limit: int = 320) -> str:
  """An exception as one line of at most ~`limit` characters: its type and message.

  TensorStore's messages carry each store's whole JSON spec (dropped here) and run to hundreds
  of lines; the first line's end holds the cause ("Requested byte range ... is not valid"), so
  a long one keeps its start and its end.
  """
  text = str(error).strip().splitlines()[0] if str(error).strip() else '(no message)'
  text = re.sub(r" \[tensorstore_spec(\[\d+\])?='[^']*'\]", '', text)
  text = f'{type(error).__name__}: {text}'
  if len(text) > limit:
    text = f'{text[:limit // 3]} ... {text[-(limit - limit // 3):]}'
  return text


def _unused_damaged_path(step_path: epath.Path) -> epath.Path:
  """`<step>.damaged-<n>` beside `step_path`, n the first number from 1 not in use."""
  n = 1
  while (target := step_path.parent / f'{step_path.name}{DAMAGED_SUFFIX}{n}').exists():
    n += 1
  return target


def _sync_processes(name: str) -> None:
  """Waits for every process at `name` (nothing to wait for in a one-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _item_handlers() -> dict[str, Any]:
  return {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
          'meta': ocp.JsonCheckpointHandler()}


def _reader(directory: str) -> ocp.CheckpointManager:
  """A read-only manager that knows the items' handlers (so their metadata can be read)."""
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers=_item_handlers())


def _training_checkpoints(path: str | os.PathLike) -> tuple[str, list[int]] | None:
  """(checkpoints directory, its complete checkpoints' steps, newest first) if `path` is a
  training workdir, or its checkpoints/ directory, holding at least one; else None."""
  for directory in (os.path.join(str(path), CHECKPOINTS_DIR), str(path)):
    if not epath.Path(directory).is_dir():
      continue
    manager = _reader(directory)
    steps = sorted(manager.all_steps(), reverse=True)
    manager.close()
    if steps:
      return directory, steps
  return None


def load_train_state(path: str | os.PathLike,
                     step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """A training checkpoint's whole state as NumPy arrays, on any number of devices.

  Args:
    path: a training workdir or its checkpoints/ directory.
    step: which checkpoint; None = the newest that reads back (each newer one that does not
      is reported in a warning line with its step, path and the reason, and left as it is).

  Returns:
    ({'step', 'params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats', 'rng'}
    as nested dicts of arrays, {'model', 'model_overrides', 'step', ...what the run stored}).

  Raises:
    CheckpointNotFoundError: no complete training checkpoint there.
    CheckpointUnreadableError: with step=None, none of the checkpoints reads back.
  """
  run = _training_checkpoints(path)
  if run is None:
    raise CheckpointNotFoundError(f'{path} holds no complete training checkpoint '
                                  f'(expected {CHECKPOINTS_DIR}/<step>/ written by main.py)')
  directory, steps = run
  if step is not None:
    return _read_train_state(directory, step)
  step, restored, failures = _newest_readable(
      directory, steps, lambda s: _read_train_state(directory, s))
  for damaged, damaged_path, reason in failures:
    logging.warning('Checkpoint step %d at %s cannot be read (%s); reading step %d instead.',
                    damaged, damaged_path, reason, step)
  return restored


def _read_train_state(directory: str, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """One checkpoint's state and meta items, read into host memory."""
  manager = _reader(directory)
  try:
    tree = manager.item_metadata(step)['state']
    # A host-memory target restores on any number of devices, whatever the run's mesh was;
    # np.empty only reserves the memory that the restore then fills.
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), dict(tree))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return restored['state'], dict(restored['meta'])


def _load_training_run(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """The weights of a run's newest readable checkpoint as NumPy arrays: the EMA weights where
  the run kept them (they evaluate better, as in the official release), else the raw ones."""
  state, meta = load_train_state(directory)
  step = int(meta['step'] if 'step' in meta else state['step'])
  use_ema = bool(state.get('ema_params'))
  prefix = 'ema_' if use_ema else ''
  variables = {'params': state[prefix + 'params'],
               'batch_stats': state.get(prefix + 'batch_stats') or {}}
  # Whatever the run stored ('class_names', 'eval_preprocessing', ...) reaches the reader.
  metadata = {'model_overrides': {}, **meta, 'format': FORMAT, 'version': 1, 'step': step,
              'weights': 'ema' if use_ema else 'raw', 'source': f'{directory}/{step}'}
  return jax.tree.map(np.asarray, variables), metadata
