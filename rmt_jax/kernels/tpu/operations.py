"""The TPU forms of RMT's operations as the model calls them (`kernels='tpu'`).

Each function takes the arrays of one step of the paper's block and the plain form of that
step, and decides for itself what runs: its Pallas kernel where the kernel's memory plan fits
the shape (VMEM, `common.budget()`) and the on-device check has not declined it (`declined`,
`rmt_jax.kernels.check`), else the plain form, which it reports in one log line per operation
and shape (`selection.fallback`). The model never asks a kernel whether it fits.

- `first_half`: x1 = x + pos(x), then LN(x1) and the q/k/v projections (`block_head`, else
  `projections` after a plain `pos`, else plain).
- `attention`: the decayed softmax attention, axial (rows, then columns) or whole (`attention`).
- `lepe_add`: attention + LePE(v) (`lepe`).
- `feed_forward`: the FFN (`feed_forward`).
- `second_half`: out_proj, the residuals, LN and the FFN (`block_tail`, else the plain second
  half with the FFN's kernel where that fits).
- `affine_warp`: RandAugment's warp of a batch in the train step's augmentation (`warp`), not
  the model's; recorded and checked as the others.

`recording()` collects, while a model is traced, each kernel call it would make (operation,
per-image shape, dtype, abstract arguments, the kernel and the plain form as functions), which
is what the on-device check runs.
"""

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp

from rmt_jax.kernels import selection
from rmt_jax.kernels.tpu import attention as tpu_attention
from rmt_jax.kernels.tpu import block_head
from rmt_jax.kernels.tpu import block_tail
from rmt_jax.kernels.tpu import common
from rmt_jax.kernels.tpu import feed_forward as tpu_feed_forward
from rmt_jax.kernels.tpu import lepe
from rmt_jax.kernels.tpu import projections as tpu_projections
from rmt_jax.kernels.tpu import warp as tpu_warp


@dataclasses.dataclass(frozen=True)
class Key:
  """What a decision about a kernel is keyed by: the operation, the per-image shape of its main
  input (the batch is split over devices, the kernel's program is the same per image shape)
  and the compute dtype's name."""
  operation: str
  shape: tuple[int, ...]
  dtype: str

  def __str__(self) -> str:
    return f'{self.operation} {"x".join(map(str, self.shape))} {self.dtype}'


@dataclasses.dataclass(frozen=True)
class Call:
  """A kernel call recorded while tracing: `kernel(*arguments)` and `plain(*arguments)` compute
  the same function of arrays shaped as `arguments` (a pytree of ShapeDtypeStructs). `kernel`
  is None where the kernel's memory plan does not fit (the plain form runs anyway);
  `reference`, where set, is the plain form in float32 (of the same arguments cast to it).
  `constants`: the positions of arguments that are not differentiated (drop path's scales).
  `sample`, where set, draws the check's arguments (numpy Generator -> arguments) where normal
  draws mean nothing (images and their affine maps)."""
  key: Key
  arguments: Any
  kernel: Callable[..., Any] | None
  plain: Callable[..., Any]
  reference: Callable[..., Any] | None = None
  constants: tuple[int, ...] = ()
  sample: Callable[[Any], Any] | None = None


_declined: frozenset[Key] = frozenset()
_plain_only = False
_recorded: dict[Key, Call] | None = None


@contextlib.contextmanager
def declined(keys: Iterable[Key]) -> Iterator[None]:
  """Within the block, the kernels of `keys` are not used: their plain forms run (one log line
  each). The trainer traces its programs within the on-device check's decisions."""
  global _declined
  previous, _declined = _declined, frozenset(keys)
  try:
    yield
  finally:
    _declined = previous


@contextlib.contextmanager
def plain_only() -> Iterator[None]:
  """Within the block, every operation runs its plain form, silently (the check's reference)."""
  global _plain_only
  previous, _plain_only = _plain_only, True
  try:
    yield
  finally:
    _plain_only = previous


@contextlib.contextmanager
def recording() -> Iterator[dict[Key, Call]]:
  """Collects the kernel calls of what is traced within the block: {key: `Call`}, the first
  call of each key. What is traced runs the plain forms meanwhile."""
  global _recorded
  previous, _recorded = _recorded, {}
  try:
    yield _recorded
  finally:
    _recorded = previous


def _run(operation: str, arguments: tuple[Any, ...], dtype: Any,
         kernel: Callable[..., Any] | None, plain: Callable[..., Any], *,
         independent: int | None = None, constants: tuple[int, ...] = (),
         unfit: tuple[str, str, str, Callable[..., Any]] | None = None,
         sample: Callable[[Any], Any] | None = None) -> Any:
  """`kernel(*arguments)`, unless the plain forms are asked for, the check declined it, or it
  does not fit (`unfit`: what, why, what runs instead, and that function, for the one line).

  `independent`: how many leading arguments are independent inputs (default all); the others
  equal some of them (the attention's column q and k), and the recorded call takes only those.
  """
  if _plain_only:
    return plain(*arguments)
  key = Key(operation, tuple(arguments[0].shape[1:]), jnp.dtype(dtype).name)
  if _recorded is not None:
    if key not in _recorded:
      n = len(arguments) if independent is None else independent
      tied = lambda f: (lambda *a: f(*a, *a[:len(arguments) - n])) if (
          f is not None and n < len(arguments)) else f
      _recorded[key] = Call(key, jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arguments[:n]),
                            None if unfit else tied(kernel), tied(plain),
                            constants=constants, sample=sample)
    # Recording needs the shapes only: the kernel is traced when the check runs it, where its
    # failures are caught and reported. Where it does not fit, what runs instead is traced: its
    # own kernels (the projections', the FFN's) are recorded too.
    if unfit is not None:
      return unfit[3](*arguments)
    with plain_only():
      return plain(*arguments)
  if unfit is not None:
    what, reason, instead, fallback = unfit
    selection.fallback(what, arguments[0].shape, reason, instead)
    return fallback(*arguments)
  if key in _declined:
    selection.fallback(operation, arguments[0].shape, 'the on-device check declined it '
                       '(rmt_jax.kernels.check)')
    with plain_only():
      return plain(*arguments)
  return kernel(*arguments)


Pair = tuple[jax.Array, jax.Array]


@common.on_operands_mesh
def first_half(x: jax.Array, pos: Pair, norm: Pair, projections: Sequence[Pair],
               scales: Sequence[float], *, uses: Sequence[int], eps: float, dtype: Any,
               plain_pos: Callable[[jax.Array, Pair], jax.Array],
               plain_projections: Callable[..., tuple[jax.Array, ...]]) -> tuple[Any, ...]:
  """x1 = x + pos(x) and each projection of LN(x1), once per use.

  Args:
    x: (b, h, w, C), the residual stream.
    pos: the 3 x 3 depthwise conv's (kernel, bias).
    norm: the layer norm's (scale, bias).
    projections: (kernel (C, C), bias (C,)) each.
    scales: a constant per projection.
    uses: consumers of each projection's output: the kernel that takes every use's cotangent
      runs where it fits, else the kernel that takes one of each (autodiff adds the others).
    eps: the layer norm's epsilon.
    dtype: the compute dtype.
    plain_pos: (x, pos) -> x1 in the plain form.
    plain_projections: (x1, norm, projections) -> the scaled projections in the plain form.

  Returns:
    (x1, *(a tuple of `uses[i]` outputs for each projection)).
  """
  repeat = lambda outs: tuple((out,) * n for out, n in zip(outs, uses))

  def plain(x, pos, norm, projections):
    x1 = plain_pos(x, pos)
    return (x1, *repeat(plain_projections(x1, norm, projections)))

  itemsize, stream = jnp.dtype(dtype).itemsize, x.dtype.itemsize
  kernel_uses = next((u for u in (tuple(uses), (1,) * len(uses)) if block_head.fits_vmem(
      x.shape, len(projections), itemsize, stream, uses=u)), None)

  def projections_kernel(x, pos, norm, projections):
    x1 = plain_pos(x, pos)
    return (x1, *repeat(normalized_projections(x1, norm, projections, scales, eps=eps,
                                               dtype=dtype, plain=plain_projections)))

  unfit = None if kernel_uses else (
      'the block head (pos, norm, q/k/v)', 'its weights leave too little VMEM',
      'pos runs plainly, then the projections', projections_kernel)

  def kernel(x, pos, norm, projections):
    x1, *outs = block_head.block_first_half(x, pos, norm, projections, scales, eps=eps,
                                            dtype=dtype, uses=kernel_uses)
    return (x1, *(out + out[-1:] * (n - len(out)) for out, n in zip(outs, uses)))

  return _run('first_half', (x, pos, norm, tuple(projections)), dtype, kernel, plain,
              unfit=unfit)


@common.on_operands_mesh
def normalized_projections(x: jax.Array, norm: Pair, projections: Sequence[Pair],
                           scales: Sequence[float], *, eps: float, dtype: Any,
                           plain: Callable[..., tuple[jax.Array, ...]]) -> tuple[jax.Array, ...]:
  """(LN(x) @ kernel_i + bias_i) * scales[i] for each projection (`plain(x, norm, projections)`
  where the kernel does not fit)."""
  features = projections[0][0].shape[1]
  fits = tpu_projections.fits_vmem(x.shape, features, len(projections), x.dtype.itemsize,
                                   jnp.dtype(dtype).itemsize)
  kernel = lambda x, norm, projections: tpu_projections.normalized_projections(
      x, norm, projections, scales, eps=eps, dtype=dtype)
  return _run('projections', (x, norm, tuple(projections)), dtype, kernel, plain,
              unfit=None if fits else ('the q/k/v projections', 'their weights leave too '
                                       'little VMEM', 'the plain form runs', plain))


@common.on_operands_mesh
def attention(q: jax.Array, k: jax.Array, v: jax.Array, column_q: jax.Array,
              column_k: jax.Array, *, heads: int, axial: bool, log_gamma: Sequence[float],
              rotary: Callable[[], Pair], plain: Callable[..., jax.Array]) -> jax.Array:
  """MaSA's decayed attention on the (b, h, w, heads * d) maps the projections give.

  The kernels take q, k, v with heads on the lane axis and no pass transposes them: the row
  pass and the whole attention as (problems, tokens, heads * d), the column pass as the map
  itself (where its blocks fit VMEM; else transposed into rows, as the plain form does). The
  kernels apply the rotary shift to q and k themselves, so rotated copies are never written.

  Args:
    q, k, v: (b, h, w, heads * d), k scaled, neither rotated.
    column_q, column_k: the column pass' q and k: the same values as q and k, from a producer
      that takes their cotangents apart (`first_half`'s uses).
    heads: number of heads.
    axial: row then column attention (True) or whole-map attention (False).
    log_gamma: per head, the decay's log rate.
    rotary: () -> the (sin, cos) tables of shape (h, w, heads * d) in the compute dtype,
      computed where the kernel is traced (functions of the static shape, not arguments).
    plain: (q, k, v, column_q, column_k) -> the attention in the plain form.

  Returns:
    (b, h, w, heads * d) in v's dtype.
  """
  def kernel(q, k, v, column_q, column_k):
    batch, height, width, channels = q.shape
    sin, cos = rotary()
    if not axial:
      flat = [t.reshape(batch, height * width, channels) for t in (q, k, v)]
      tables = tuple(t.reshape(1, height * width, channels) for t in (sin, cos))
      return tpu_attention.decayed_attention(*flat, log_gamma, width=width, rotary=tables
                                             ).reshape(q.shape)
    # Row pass: problem b * h + y takes the tables of row y. Column pass: the map as it is,
    # the kernel attending along h in each column (column x takes the tables [:, x]).
    rows = [t.reshape(batch * height, width, channels) for t in (q, k, v)]
    out = tpu_attention.decayed_attention(*rows, log_gamma, rotary=(sin, cos)).reshape(q.shape)
    if tpu_attention.columns_fit_vmem(q.shape, heads, q.dtype.itemsize):
      return tpu_attention.decayed_attention(column_q, column_k, out, log_gamma,
                                             rotary=(sin, cos))
    # Where the column layout's blocks do not fit VMEM (float32 maps of 28 columns with more
    # than 128 channels), the columns transposed into rows: problem b * w + x, column x's
    # tables.
    transposed = [t.transpose(0, 2, 1, 3).reshape(batch * width, height, channels)
                  for t in (column_q, column_k, out)]
    out = tpu_attention.decayed_attention(
        *transposed, log_gamma, rotary=tuple(t.transpose(1, 0, 2) for t in (sin, cos)))
    return out.reshape(batch, width, height, channels).transpose(0, 2, 1, 3)

  operation = 'axial attention' if axial else 'whole attention'
  return _run(operation, (q, k, v, column_q, column_k), v.dtype, kernel, plain, independent=3)


@common.on_operands_mesh
def lepe_add(out: jax.Array, v: jax.Array, weights: Pair, *,
             plain: Callable[[jax.Array, jax.Array, Pair], jax.Array]) -> jax.Array:
  """attention + LePE(v): `lepe.lepe_add` where it fits, else `plain(out, v, weights)`."""
  kernel = lambda out, v, weights: lepe.lepe_add(out.astype(v.dtype), v, *weights)
  unfit = None if lepe.fits_vmem(v.shape, v.dtype.itemsize) else (
      'LePE', 'its blocks do not fit VMEM', 'the plain form runs', plain)
  return _run('lepe', (out, v, weights), v.dtype, kernel, plain, unfit=unfit)


@common.on_operands_mesh
def feed_forward(x: jax.Array, fc1: Pair, dwconv: Pair, fc2: Pair, *,
                 plain: Callable[..., jax.Array]) -> jax.Array:
  """The FFN: its kernel, which keeps the weights in VMEM, where they leave room enough (not
  the last stage of RMT-S, -B and -L, nor the third of RMT-B and -L), else `plain`."""
  unfit = None if tpu_feed_forward.fits_vmem(x.shape, fc1[0].shape[1], x.dtype.itemsize) else (
      'the FFN', 'its weights leave too little VMEM', 'the plain form runs', plain)
  return _run('ffn', (x, fc1, dwconv, fc2), x.dtype, tpu_feed_forward.feed_forward, plain,
              unfit=unfit)


@common.on_operands_mesh
def second_half(x1: jax.Array, o: jax.Array, out_proj: Pair, norm: Pair, ffn: Any,
                gammas: Pair | None, drop_scales: jax.Array | None, *, eps: float,
                plain: Callable[..., jax.Array]) -> jax.Array:
  """A block's second half: the tail kernel pair where it fits, else `plain` (whose arguments
  are this function's, the FFN's form its own choice)."""
  arguments = (x1, o, out_proj, norm, ffn, gammas, drop_scales)
  hidden = ffn[0][0].shape[1]
  kernel = lambda *arguments: block_tail.block_second_half(*arguments, eps=eps)
  unfit = None if block_tail.fits_vmem(x1.shape, hidden, o.dtype.itemsize,
                                       x1.dtype.itemsize) else (
      "the block's second half", 'its weights leave too little VMEM', 'the plain form runs',
      plain)
  return _run('second_half', arguments, o.dtype, kernel, plain, constants=(6,), unfit=unfit)


def affine_warp(images: jax.Array, matrices: jax.Array, *, fill: tuple[int, int, int],
                max_scale: float, scaled_share: float,
                plain: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """RandAugment's warp of a device's batch (uint8 (B, H, W, 3), each image at its affine map
  (B, 6)): `warp.affine_warp` where its lines fit VMEM (a finite `max_scale` among them), else
  `plain(images, matrices)`. Called on each device's share (inside the augmentation's
  `shard_map`), so the kernel takes no mesh of its own."""
  fits = math.isfinite(max_scale) and tpu_warp.fits_vmem(images.shape, max_scale)
  kernel = lambda images, matrices: tpu_warp.affine_warp(
      images, matrices, fill=tuple(int(v) for v in fill), max_scale=max_scale,
      scaled_share=scaled_share)
  unfit = None if fits else ('the affine warp', f'its lines at scales up to {max_scale} do not '
                             'fit VMEM', 'the plain form runs', plain)
  return _run('affine warp', (images, matrices), images.dtype, kernel, plain, constants=(0, 1),
              unfit=unfit, sample=functools.partial(tpu_warp.sample, images.shape,
                                                    max_scale=max_scale))
