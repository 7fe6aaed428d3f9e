"""MaSA's layer norm and q/k/v projections as Pallas TPU kernels (`kernels='tpu'`).

`normalized_projections` computes LN(x) @ W_i + b_i (times a constant, for k's scaling) for
several projections of the same normalised input in one kernel. XLA runs the plain form as a
layer norm fusion and three matmuls: the residual stream x (float32) is read, the normalised
copy written in the compute dtype and read back, and in the backward pass the normalised input
is rebuilt, the three input gradients summed and the layer norm's transpose taken in further
passes. Here:

- The forward kernel reads x and writes q, k and v; the normalised x never leaves VMEM. The
  backward kernel reads x and dq, dk, dv, recomputes the normalisation, and writes dx and the
  gradients of every weight and of the norm's scale and bias: the forward saves x alone.
- Arrays are (rows, width, channels): image rows, the layout the attention kernels
  (`attention`) read for the row pass. Flattening rows of 14 or 7 tokens to (tokens, channels)
  outside would be a relayout in HBM (the TPU tiles the last two axes by 8 or 16 rows); inside
  the kernel it is a relayout in VMEM.
- Statistics and the norm in float32; matmuls in the compute dtype with float32 accumulation,
  the bias and k's scale applied in the compute dtype (the plain form's roundings).
- The weights stay in VMEM (one buffer) and their gradients are summed into one float32 block
  per TensorCore: the grid is (cores, steps), the first axis parallel, the second a sequential
  sum; the partial sums (and, under a mesh, the devices' sums) are added outside.
- `Shape.plan` picks the rows per step that fit the chip's VMEM budget (`common.budget`); where
  none do, there is no plan (`fits_vmem`) and `layers.ManhattanSelfAttention` runs the plain form.
- In a `RetBlock`, MaSA runs `tpu_block_head` (this kernel with the block's `pos` conv in
  front) where that has a plan; this kernel serves MaSA on its own and the stages where the
  larger one does not fit (RMT-L's third).

Both kernels declare their true cost (`cost_estimates`). As the other kernels, they run per
device under a context mesh (`common.per_device`: a `shard_map` over image rows) and keep their
operands in HBM (`common.in_hbm`).
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rmt_jax.kernels.tpu import bands as tpu_bands
from rmt_jax.kernels.tpu import common

# Tokens per grid step are kept at most this (whole rows): big enough that a step's fixed cost
# is small against its work, small enough for the backward's float32 temporaries.
_BLOCK_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class Shape:
  """The static description of one call.

  Attributes:
    rows: image rows (images x height).
    width: tokens per row.
    dim: C, input channels.
    features: D, output channels of each projection.
    outputs: number of projections, n.
    in_itemsize: bytes per element of x (and dx): the residual stream's dtype.
    itemsize: bytes per element of the weights and outputs (the compute dtype).
  """
  rows: int
  width: int
  dim: int
  features: int
  outputs: int
  in_itemsize: int
  itemsize: int

  @property
  def tokens(self) -> int:
    return self.rows * self.width

  def vmem_bytes(self, block_rows: int) -> int:
    """The backward kernel's VMEM (the larger of the two) with `block_rows` rows per step:
    the x, dx and n dy blocks double-buffered (rows padded to 16 sublanes, channels to 128
    lanes), the weights once, their float32 gradient sums twice, and float32 temporaries: ten
    of (tokens, C) (x, its normalisation, the summed input gradient and the norm's transpose)
    and two of (C, D) (a weight gradient's product)."""
    tokens = block_rows * -(-self.width // tpu_bands.TILE) * tpu_bands.TILE
    c, d = tpu_bands.lanes(self.dim), tpu_bands.lanes(self.features)
    blocks = 2 * tokens * (2 * c * self.in_itemsize + self.outputs * d * self.itemsize)
    matrix = self.dim * self.outputs * d
    weights = matrix * self.itemsize + 2 * (matrix + 16 * self.outputs * d + 32 * c) * 4
    temporaries = 10 * tokens * max(c, d) * 4 + 2 * self.dim * d * 4
    return blocks + weights + temporaries

  @functools.cached_property
  def block_rows(self) -> int | None:
    """The most rows per step (a divisor of `rows`, within `_BLOCK_TOKENS` where any is) that
    fits `common.budget()`; None if none does."""
    divisors = [r for r in range(self.rows, 0, -1) if self.rows % r == 0]
    candidates = [r for r in divisors if r * self.width <= _BLOCK_TOKENS] or divisors[-1:]
    return next((r for r in candidates if self.vmem_bytes(r) <= common.budget()), None)

  @property
  def steps(self) -> int:
    return self.rows // self.block_rows

  @property
  def cores(self) -> int:
    """Partial weight-gradient sums, one per TensorCore (`common.CoreGrid`)."""
    return common.CoreGrid(self.steps).cores


def fits_vmem(x_shape: Sequence[int], features: int, outputs: int, in_itemsize: int,
              itemsize: int) -> bool:
  """Whether `normalized_projections` has a plan within `common.budget()` for x of `x_shape`
  (b, h, w, C), `outputs` projections to `features` channels, with the batch split over the
  context mesh's devices as the kernel splits it."""
  batch, height, width, dim = x_shape
  shape = Shape(common.images_per_device(batch) * height, width, dim, features, outputs,
                in_itemsize, itemsize)
  return shape.block_rows is not None


def cost_estimates(shape: Shape) -> tuple[pl.CostEstimate, pl.CostEstimate]:
  """The forward and backward kernels' costs, from the shapes alone.

  Flops: the matmuls' 2 C D per token and projection (forward one, backward two: the weight's
  gradient and the input's) and the norm's elementwise work, 8 C per token forward (mean,
  centring, variance, scale and shift) and 2 x 8 C backward (the recomputation and its
  transpose). Transcendentals: a reciprocal square root per token in each. Bytes: every block
  read or written once (forward: x in, n outputs; backward: x and n dy in, dx out), the weights
  and the norm's parameters once (their block is the same at every step), and the backward's
  float32 gradient sums once per core.
  """
  n, c, d, k = shape.tokens, shape.dim, shape.features, shape.outputs
  weights = (c * d * k + d * k) * shape.itemsize + 2 * c * 4
  x_bytes, out_bytes = n * c * shape.in_itemsize, n * d * k * shape.itemsize
  forward = pl.CostEstimate(flops=2 * n * c * d * k + 8 * n * c, transcendentals=n,
                            bytes_accessed=x_bytes + out_bytes + weights)
  backward = pl.CostEstimate(flops=4 * n * c * d * k + 16 * n * c, transcendentals=n,
                             bytes_accessed=2 * x_bytes + out_bytes + weights
                             + shape.cores * (c * d * k + d * k + 2 * c) * 4)
  return forward, backward


def _normalise(x_ref, eps):
  """x's block as (tokens, C) float32, normalised, and 1 / std (`common.normalise`)."""
  x = x_ref[...].astype(jnp.float32)
  return common.normalise(x.reshape(-1, x.shape[-1]), eps)


def _forward_kernel(x_ref, scale_ref, shift_ref, w_ref, b_ref, *out_refs, eps, scales):
  xhat, _ = _normalise(x_ref, eps)
  features = out_refs[0].shape[-1]
  xn = (xhat * scale_ref[...] + shift_ref[...]).astype(w_ref.dtype)
  for i, (ref, s) in enumerate(zip(out_refs, scales)):
    columns = slice(i * features, (i + 1) * features)
    y = (jnp.dot(xn, w_ref[:, columns], preferred_element_type=jnp.float32).astype(ref.dtype)
         + b_ref[:, columns])
    if s != 1.0:
      y = y * jnp.asarray(s, ref.dtype)
    ref[...] = y.reshape(ref.shape)


def _backward_kernel(x_ref, scale_ref, shift_ref, w_ref, *refs, eps, scales):
  outputs = len(scales)
  dy_refs, (dx_ref, dw_ref, db_ref, dscale_ref, dshift_ref) = refs[:outputs], refs[outputs:]

  @pl.when(pl.program_id(1) == 0)
  def _():
    for ref in (dw_ref, db_ref, dscale_ref, dshift_ref):
      ref[...] = jnp.zeros_like(ref)

  xhat, rstd = _normalise(x_ref, eps)
  features = dy_refs[0].shape[-1]
  scale = scale_ref[...]
  xn = (xhat * scale + shift_ref[...]).astype(w_ref.dtype)
  dxn = jnp.zeros(xhat.shape, jnp.float32)
  for i, (ref, s) in enumerate(zip(dy_refs, scales)):
    columns = slice(i * features, (i + 1) * features)
    dy = ref[...].reshape(-1, features)
    if s != 1.0:
      dy = dy * jnp.asarray(s, dy.dtype)
    dw_ref[0, :, columns] += jax.lax.dot_general(xn, dy, common.TRANS_A,
                                                 preferred_element_type=jnp.float32)
    db_ref[0, :, columns] += jnp.sum(dy.astype(jnp.float32), axis=0, keepdims=True)
    dxn = dxn + jax.lax.dot_general(dy, w_ref[:, columns], common.TRANS_B,
                                    preferred_element_type=jnp.float32)
  dscale_ref[0] += jnp.sum(dxn * xhat, axis=0, keepdims=True)
  dshift_ref[0] += jnp.sum(dxn, axis=0, keepdims=True)
  dxhat = dxn * scale
  dx = common.normalise_transpose(dxhat, xhat, rstd)
  dx_ref[...] = dx.astype(dx_ref.dtype).reshape(dx_ref.shape)


def _call(kernel, shape: Shape, inputs: Sequence[jax.Array], weights: int, outputs, grads,
          cost, eps, scales, interpret):
  """The kernel over blocks of rows: inputs[0] and inputs[1 + weights:] by rows,
  inputs[1:1 + weights] whole at every step. It gives `outputs` (structs of rows arrays) and
  the float32 sums per core of the gradients of `grads` (`common.CoreGrid`)."""
  grid = common.CoreGrid(shape.steps)
  rows = lambda channels: grid.blocks((shape.block_rows, shape.width, channels))
  sums, sum_specs = grid.sums(grads)
  return common.call(
      functools.partial(kernel, eps=eps, scales=scales), inputs,
      out_shape=[*outputs, *sums], grid=grid.shape,
      in_specs=[rows(a.shape[-1]) if i == 0 or i > weights else common.whole(a)
                for i, a in enumerate(inputs)],
      out_specs=[rows(struct.shape[-1]) for struct in outputs] + sum_specs,
      cost=cost, interpret=interpret)


def _shape(x: jax.Array, w: jax.Array, outputs: int) -> Shape:
  rows, width, dim = x.shape
  shape = Shape(rows, width, dim, w.shape[1] // outputs, outputs, x.dtype.itemsize,
                w.dtype.itemsize)
  if shape.block_rows is None:
    raise ValueError(f'the projection kernel does not fit {common.budget() / 2**20:.0f} MiB of '
                     f'VMEM for {outputs} x {dim} -> {shape.features} channels on rows of '
                     f"{width} tokens (its weights stay in VMEM; see fits_vmem); use "
                     "kernels='xla'")
  return shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _projections(x, norm, weights, eps, scales, interpret):
  def forward(rows, parameters):
    (x,), weights = rows, parameters[2:]
    shape = _shape(x, weights[0], len(scales))
    out = [jax.ShapeDtypeStruct((*x.shape[:2], shape.features), weights[0].dtype)
           ] * shape.outputs
    return tuple(_call(_forward_kernel, shape, (x, *parameters), 4, out, (),
                       cost_estimates(shape)[0], eps, scales, interpret)), ()

  return common.per_device(forward, (x,), (*norm, *weights))[0]


def _projections_fwd(x, norm, weights, eps, scales, interpret):
  return _projections(x, norm, weights, eps, scales, interpret), (x, norm, weights)


def _projections_bwd(eps, scales, interpret, residuals, dys):
  x, norm, weights = residuals

  def backward(rows, parameters):
    (x, *dys), (scale, shift, w, b) = rows, parameters
    shape = _shape(x, w, len(scales))
    dx, dw, db, dscale, dshift = _call(
        _backward_kernel, shape, (x, scale, shift, w, *dys), 3,
        [jax.ShapeDtypeStruct(x.shape, x.dtype)], (w, b, scale, shift),
        cost_estimates(shape)[1], eps, scales, interpret)
    return dx, common.core_sums((dscale, dshift, dw, db))

  dys = tuple(dy.astype(weights[0].dtype) for dy in dys)
  dx, grads = common.per_device(backward, (x, *dys), (*norm, *weights))
  return (dx, common.like_weights(grads[:2], norm),
          common.like_weights(grads[2:], weights))


_projections.defvjp(_projections_fwd, _projections_bwd)


def normalized_projections(x: jax.Array, norm: tuple[jax.Array, jax.Array],
                           projections: Sequence[tuple[jax.Array, jax.Array]],
                           scales: Sequence[float], *, eps: float, dtype: jnp.dtype,
                           interpret: bool | None = None) -> tuple[jax.Array, ...]:
  """(LN(x) @ kernel_i + bias_i) * scales[i] for each projection, as one Pallas kernel.

  Args:
    x: (b, h, w, C), the residual stream (any float dtype; dx comes back in it).
    norm: the layer norm's (scale (C,), bias (C,)), applied in float32.
    projections: (kernel (C, D), bias (D,)) each, cast to `dtype`.
    scales: a constant per projection (1.0, or k's key_dim ** -0.5), applied in `dtype`.
    eps: the layer norm's epsilon.
    dtype: the compute dtype: of the matmuls and the outputs.
    interpret: True runs Pallas's interpreter, False the Mosaic kernel (TPU only); None (the
      default) chooses at lowering (`common.call`).

  Returns:
    (b, h, w, D) in `dtype` per projection. Differentiable in x, the norm and every weight (a
    second kernel).
  """
  batch, height, width, dim = x.shape
  features = projections[0][0].shape[1]
  if any(w.shape != (dim, features) or b.shape != (features,) for w, b in projections) or any(
      p.shape != (dim,) for p in norm) or len(scales) != len(projections):
    raise ValueError(f'a norm of {dim} channels and projections {dim} -> {features} with a '
                     f'scale each expected, got norm {[tuple(p.shape) for p in norm]}, '
                     f'projections {[(tuple(w.shape), tuple(b.shape)) for w, b in projections]}'
                     f', scales {tuple(scales)}')
  weights = (jnp.concatenate([w.astype(dtype) for w, _ in projections], axis=1),
             jnp.concatenate([b.astype(dtype) for _, b in projections]).reshape(1, -1))
  norm = tuple(p.astype(jnp.float32).reshape(1, dim) for p in norm)
  outs = _projections(x.reshape(batch * height, width, dim), norm, weights, float(eps),
                      tuple(float(s) for s in scales), interpret)
  return tuple(o.reshape(batch, height, width, features) for o in outs)
