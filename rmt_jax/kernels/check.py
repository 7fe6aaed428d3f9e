"""The on-device check of the TPU kernels: each kernel a run would call, against its plain form,
on the device at hand, for the run's own shapes and dtypes.

For every recorded call (`tpu.operations.recording`) both forms run forward and backward (the
value and every input's gradient of sum(sin(f(inputs))), inputs drawn at O(0.3) so that no form
hides behind a near-zero value; for a call with nothing to differentiate, the augmentation's
warp of uint8 images, its outputs, on the inputs its `sample` draws) and are timed. A kernel is
kept where it lowers, compiles and runs, its results are finite and as close to the reference
as the plain form's (error <= 1.5 x the plain form's + 1e-5 relative in float32, + 2^-9 in
bfloat16 and uint8: the tolerances of the interpreter tests), and it is faster; else the plain
form runs (`tpu.operations.declined`). The reference is the plain form in float32 at the
highest matmul precision: both forms' rounding (bfloat16 compute, a chip's float32 matmul
precision) counts against them alike, and a kernel that accumulates in float32 where the plain
form rounds is not blamed for being closer.

On a CPU the kernels run in Pallas's interpreter: values are checked, timings say nothing about a
TPU.
"""

import dataclasses
import json
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax.kernels.tpu import operations

# Relative error a kernel may add to the plain form's, by compute dtype. uint8: images (the
# augmentation's warp), where forms that round differently leave a few pixels a grey level apart
# (~1e-3 relative at 2% of the pixels) and a wrong one moves whole regions (~0.1 or more).
TOLERANCE = {'float32': 1e-5, 'bfloat16': 2.0 ** -9, 'uint8': 2.0 ** -9}


@dataclasses.dataclass(frozen=True)
class Result:
  """One kernel's check: its key, each form's time (ms per forward + backward; None where it did
  not run), each form's relative error from the reference, why the kernel was dropped (None if
  it is correct) and the form chosen ('kernel' or 'plain')."""
  key: operations.Key
  kernel_ms: float | None
  plain_ms: float | None
  kernel_error: float | None
  plain_error: float | None
  failure: str | None
  chosen: str

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'key': dataclasses.asdict(self.key)}

  @classmethod
  def from_json(cls, record: dict[str, Any]) -> 'Result':
    key = record['key']
    return cls(**{**record, 'key': operations.Key(key['operation'], tuple(key['shape']),
                                                  key['dtype'])})


def check(calls: Iterable[operations.Call], *, repeats: int = 5,
          say: Callable[[str], None] = print) -> list[Result]:
  """Runs every call in both forms on the default device; returns a `Result` each.

  Args:
    calls: recorded kernel calls (`tpu.operations.recording`).
    repeats: timed runs per form after the compiling one (the median is reported).
    say: where one line per finished check goes (progress), and one warning line per dropped
      kernel.
  """
  results = []
  for call in calls:
    result = _check_one(call, repeats)
    results.append(result)
    if result.failure:
      say(f'warning: the TPU kernel of {result.key} is dropped: {result.failure}; the plain '
          'form runs')
    else:
      say(f'checked {result.key}: kernel {_ms(result.kernel_ms)}, plain '
          f'{_ms(result.plain_ms)} ms, {result.chosen} chosen')
  return results


def declined(results: Iterable[Result]) -> list[operations.Key]:
  """The keys whose kernels are not to run (`tpu.operations.declined`)."""
  return [r.key for r in results if r.chosen != 'kernel']


def table(results: Sequence[Result]) -> str:
  """The check as a table: operation, per-image shape, dtype, errors, ms per form, chosen."""
  rows = [('operation', 'shape', 'dtype', 'kernel err', 'plain err', 'kernel ms', 'plain ms',
           'chosen')]
  for r in results:
    rows.append((r.key.operation, 'x'.join(map(str, r.key.shape)), r.key.dtype,
                 _error(r.kernel_error), _error(r.plain_error), _ms(r.kernel_ms),
                 _ms(r.plain_ms), r.chosen + (f' ({r.failure})' if r.failure else '')))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
  return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(row, widths)) + '  ' + row[-1]
                   for row in rows)


def save(path: Any, fingerprint: dict[str, Any], results: Sequence[Result]) -> None:
  """Writes the results with what they hold for (`fingerprint`) as JSON at `path` (an
  `epath.Path`-like with `write_text`)."""
  path.write_text(json.dumps({'fingerprint': fingerprint,
                              'results': [r.to_json() for r in results]}, indent=1))


def load(path: Any, fingerprint: dict[str, Any]) -> list[Result] | None:
  """The results saved at `path` for this `fingerprint`, or None (absent, unreadable, or for
  another device, software or set of shapes)."""
  try:
    saved = json.loads(path.read_text())
    if saved['fingerprint'] != json.loads(json.dumps(fingerprint)):
      return None
    return [Result.from_json(r) for r in saved['results']]
  except (OSError, ValueError, KeyError, TypeError):
    return None


def fingerprint(calls: Iterable[operations.Call]) -> dict[str, Any]:
  """What a check's results hold for: the device kind, jax's and libtpu's versions, and the
  calls' keys."""
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    libtpu = metadata.version('libtpu')
  except Exception:  # pylint: disable=broad-except
    libtpu = None
  return {'device_kind': jax.devices()[0].device_kind, 'jax': jax.__version__,
          'libtpu': libtpu, 'keys': sorted(str(c.key) for c in calls)}


def _check_one(call: operations.Call, repeats: int) -> Result:
  arguments = call.sample(np.random.default_rng(0)) if call.sample else _random(call.arguments)
  plain = _loss_and_grads(call.plain, call.constants, plain=True)
  kernel = _loss_and_grads(call.kernel, call.constants, plain=False)
  # The reference: the plain form in float32 where the call has one (else in its own dtype),
  # at the highest matmul precision.
  in_float32 = jax.tree.map(lambda a: a.astype(jnp.float32), arguments)
  with jax.default_matmul_precision('highest'):
    reference = jax.jit(_loss_and_grads(call.reference or call.plain, call.constants,
                                        plain=True))(
        *(in_float32 if call.reference else arguments))
  plain_out, plain_ms, plain_failure = _timed(plain, arguments, repeats)
  if plain_failure:  # nothing to compare with: the run cannot take this kernel either
    return Result(call.key, None, None, None, None, f'the plain form failed: {plain_failure}',
                  'plain')
  kernel_out, kernel_ms, failure = _timed(kernel, arguments, repeats)
  plain_error = _relative_error(plain_out, reference)
  kernel_error = None if failure else _relative_error(kernel_out, reference)
  if not failure:
    allowed = 1.5 * plain_error + TOLERANCE.get(call.key.dtype, 2.0 ** -9)
    if not np.isfinite(kernel_error) or kernel_error > allowed:
      failure = f'wrong: error {kernel_error:.2e} > {allowed:.2e} allowed'
  chosen = 'kernel' if not failure and kernel_ms < plain_ms else 'plain'
  return Result(call.key, kernel_ms, plain_ms, kernel_error, plain_error, failure, chosen)


def _loss_and_grads(function: Callable[..., Any], constants: Sequence[int],
                    plain: bool) -> Callable[..., Any]:
  def outputs(*arguments):
    if plain:
      with operations.plain_only():
        return function(*arguments)
    return function(*arguments)

  def loss(*arguments):
    return sum(jnp.sum(jnp.sin(o.astype(jnp.float32))) for o in jax.tree.leaves(
        outputs(*arguments)))

  def value_and_grads(*arguments):
    floating = [i for i, a in enumerate(arguments) if a is not None and i not in constants]
    if not floating:
      # Nothing to differentiate (the augmentation's uint8 warp): the outputs themselves.
      return jax.tree.map(lambda o: o.astype(jnp.float32), outputs(*arguments))
    return jax.value_and_grad(loss, argnums=tuple(floating))(*arguments)

  return value_and_grads


def _timed(function: Callable[..., Any], arguments: Sequence[Any],
           repeats: int) -> tuple[Any, float | None, str | None]:
  """(outputs, median ms of `repeats` runs after the compiling one, None) or (None, None, the
  failure's first line)."""
  try:
    compiled = jax.jit(function).lower(*arguments).compile()
    out = jax.block_until_ready(compiled(*arguments))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*arguments))
      times.append((time.perf_counter() - start) * 1e3)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever stops a form (Mosaic's lowering, the compiler, the run) drops it, with its reason.
    first = (str(e).strip().splitlines() or [''])[0][:200]
    return None, None, f'{type(e).__name__}: {first}'
  return out, statistics.median(times), None


def _random(arguments: Any) -> Any:
  """Arrays of the arguments' shapes and dtypes, normal at 0.3 (the tests' draw)."""
  leaves, tree = jax.tree.flatten(arguments)
  rng = np.random.default_rng(0)
  arrays = [jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype) for a in leaves]
  return jax.tree.unflatten(tree, arrays)


def _relative_error(got: Any, want: Any) -> float:
  got = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(got)])
  want = np.concatenate([np.ravel(np.asarray(w, np.float64)) for w in jax.tree.leaves(want)])
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _ms(value: float | None) -> str:
  return '-' if value is None else f'{value:.3f}'


def _error(value: float | None) -> str:
  return '-' if value is None else f'{value:.1e}'
