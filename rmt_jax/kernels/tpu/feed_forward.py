"""RMT's FFN as Pallas TPU kernels (`kernels='tpu'`): fc1 -> GELU -> (+ depthwise 3x3) -> fc2.

`feed_forward` computes `layers.FeedForward`'s function, fc2(u + dwconv(u)) with
u = GELU(fc1(x)), in one kernel whose hidden activations never leave VMEM. XLA runs the plain
form as separate fusions around the two matmuls and the convolution: the hidden activations,
3-4x wider than x, are written to HBM and read back several times forward, and kept for the
backward pass, so the FFN moved a fifth of the RMT-S train step's bytes (`tpu_compile
--traffic`). Here:

- The kernel reads x (tokens of whole images, raster order) and writes y; nothing else of the
  activations touches HBM. The backward kernel reads x and dy, recomputes the hidden
  activations, and writes dx and the weight gradients: the forward saves x alone.
- A grid step holds whole images (x, and dy in the backward); the kernel works through them
  in bands of tokens, each with a halo of a row and a pixel on either side, so that its
  float32 temporaries are bounded whatever the image size: fc1, GELU and the conv are
  recomputed on the halos. The depthwise conv works on the band's flattened tokens, its
  neighbours reached by rotations of the sublane axis (`tpu_bands`, shared with the
  depthwise conv kernel).
- The hidden channels are processed in chunks of 128 lanes or more: the conv is depthwise and
  GELU elementwise, so a chunk is a complete FFN of its own, summed into y. Hidden widths
  that are not a multiple of 128 (RMT-T's 192, RMT-B's 320 and 960, RMT-L's 448) are padded
  with zero weights, whose channels are zero throughout (GELU(0) = 0) and add nothing: a
  (tokens, 192) array takes 256 lanes in VMEM either way.
- Matmuls run in the compute dtype with float32 accumulation; GELU (exact, erf), the conv and
  the sums in float32.
- The weights stay in VMEM (one buffer: their block is the same at every step) and their
  gradients are added into one float32 block per TensorCore: the grid is (cores, steps), the
  first axis parallel, the second a sequential sum; the partial sums (and, under a mesh, the
  devices' sums) are added outside.
- `Shape.plan` chooses images per step, band and chunk within the chip's VMEM budget
  (`common.budget`). Where the weights and their gradients leave too little of it (on a v4: the
  last stage of RMT-S, -B and -L, 512 -> 1536 channels or wider, and the third of RMT-B and -L),
  there is no plan (`fits_vmem`) and `layers.FeedForward` runs the plain form.

Both kernels declare their true cost (`pl.CostEstimate`, see `cost_estimates`), which XLA's
TPU cost model takes for the custom calls. As the other kernels, they run per device under a
context mesh (`common.per_device`: a `shard_map` over images) and keep their operands in HBM
(`common.in_hbm`).
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rmt_jax.kernels.tpu import bands as tpu_bands
from rmt_jax.kernels.tpu import common

# Tokens per grid step are kept near this (whole images, so stage 1 takes one 56 x 56 image):
# large enough that the step's fixed cost is small against its work.
_BLOCK_TOKENS = 2048


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a kernel covers its tokens: grid blocks of whole images, bands within a block.

  Attributes:
    block_images: images per grid step.
    band: tokens per band; the kernel works through a block band by band, each with `halo`
      tokens on either side (its pixels' neighbours), so that its float32 temporaries are
      (band + 2 halo, chunk) whatever the image size.
    chunk: hidden channels per inner step (the conv is depthwise and GELU elementwise, so a
      chunk of hidden channels is a complete FFN of its own, summed into y).
  """
  block_images: int
  band: int
  chunk: int


@dataclasses.dataclass(frozen=True)
class Shape:
  """The static description of one FFN call.

  Attributes:
    tokens: N, images x height x width, in raster order per image.
    height: rows per image.
    width: columns per image.
    dim: C, input and output channels.
    hidden: hidden channels (fc1's output), a multiple of 128 (`feed_forward` pads them).
    itemsize: bytes per element of x, y and the weights (the compute dtype).
  """
  tokens: int
  height: int
  width: int
  dim: int
  hidden: int
  itemsize: int

  @property
  def images(self) -> int:
    return self.tokens // (self.height * self.width)

  @property
  def halo(self) -> int:
    """Tokens a band needs on either side: a row and a pixel (the conv's corner taps)."""
    return tpu_bands.halo(self.width, 1)

  def vmem_bytes(self, plan: Plan) -> int:
    """The backward kernel's VMEM (the larger of the two) under `plan`: x, dy and dx blocks
    double-buffered and x, dy copies with halos, lanes padded to 128; the weights once
    (single-buffered) and their float32 gradient sums twice; 26 float32 (band + 2 halo, chunk)
    temporaries and two (band + 2 halo, C) sums. Mosaic keeps the temporaries in spill slots:
    compiled for a v4, RMT-S's stage 3 with bands of 784 tokens (816 with the halos) and
    chunks of 128 spilled 10.6 MiB, 25 of them."""
    tokens = plan.block_images * self.height * self.width
    extended = plan.band + 2 * self.halo
    channels = tpu_bands.lanes(self.dim) * self.itemsize
    blocks = 6 * tokens * channels + 2 * (tokens + 2 * self.halo) * channels
    matrices = self.dim * tpu_bands.lanes(self.hidden) + self.hidden * tpu_bands.lanes(self.dim)
    # Vectors (biases, taps) pad to 8-16 sublanes.
    vectors = 48 * tpu_bands.lanes(self.hidden) + 16 * tpu_bands.lanes(self.dim)
    weights = (matrices + vectors) * self.itemsize + 2 * (matrices + vectors) * 4
    temporaries = (26 * tpu_bands.lanes(plan.chunk) + 2 * tpu_bands.lanes(self.dim)) * extended * 4
    return blocks + weights + temporaries

  @functools.cached_property
  def plan(self) -> Plan | None:
    """The plan with the longest bands (the least recomputed halo), then the widest chunks,
    then the most images per step, that fits `common.budget()`; None if none does.

    Blocks hold whole images, a multiple of 16 tokens (a bfloat16 tile) unless a block is all
    the images, and at most `_BLOCK_TOKENS` where whole images allow; bands divide the block
    in multiples of 16 tokens (or are all of it) and are at least twice the halo where the
    block allows; chunks are multiples of 128 lanes dividing `hidden` (which `feed_forward`
    pads to a multiple of 128).
    """
    pixels = self.height * self.width
    chunks = [c for c in range(self.hidden, 0, -128) if self.hidden % c == 0]
    plans = [Plan(block_images, band, chunk)
             for block_images in tpu_bands.image_blocks(self.images, pixels, _BLOCK_TOKENS)
             for band in tpu_bands.bands(block_images * pixels, self.halo)
             for chunk in chunks]
    fitting = [p for p in plans if self.vmem_bytes(p) <= common.budget()]
    return max(fitting, key=lambda p: (p.band, p.chunk, p.block_images), default=None)

  @property
  def block_tokens(self) -> int:
    return self.plan.block_images * self.height * self.width

  @property
  def steps(self) -> int:
    return self.images // self.plan.block_images

  @property
  def cores(self) -> int:
    """Partial weight-gradient sums, one per TensorCore (`common.CoreGrid`)."""
    return common.CoreGrid(self.steps).cores

  def weight_bytes(self, itemsize: int) -> int:
    """fc1 and fc2 kernels and biases, the conv's 9 taps and bias, at `itemsize` bytes."""
    return (2 * self.dim * self.hidden + 11 * self.hidden + self.dim) * itemsize


def fits_vmem(x_shape: Sequence[int], hidden: int, itemsize: int) -> bool:
  """Whether `feed_forward` has a plan within `common.budget()` for x of `x_shape` (b, h, w, C)
  and `hidden` channels, with the batch split over the context mesh's devices as the kernel
  splits it.

  The weights stay in VMEM with their float32 gradients, which leaves too little of a v4's 16
  MiB in a wide stage (RMT-S's last: 512 -> 1536 channels, 12 MiB of them; RMT-B's and -L's
  last two): `layers.FeedForward` runs its plain form where this is False.
  """
  batch, height, width, dim = x_shape
  shape = Shape(common.images_per_device(batch) * height * width, height, width, dim,
                tpu_bands.lanes(hidden), itemsize)
  return shape.plan is not None


def cost_estimates(shape: Shape) -> tuple[pl.CostEstimate, pl.CostEstimate]:
  """The forward and backward kernels' costs, from the shapes and the plan alone.

  A band computes fc1, GELU and the conv on its tokens and its two halos (`extended` tokens in
  all), the rest on its own tokens (n). Flops: matmuls of 2 C hidden per token (forward: fc1
  extended, fc2; backward: fc1 and dz extended, dW2, dW1, dx), the conv's 9 multiply-adds per
  hidden activation (forward once, extended; backward the recomputation and the transpose
  extended, the kernel gradient). Transcendentals: an erf per extended hidden activation, and
  in the backward an erf and an exp more per token's (GELU's derivative). Bytes: every block
  read or written once (forward: x in, y out; backward: x, dy in, dx out), the weights once
  (their block is the same at every step), and the backward's float32 weight-gradient sums
  once per core.
  """
  n, c, h, plan = shape.tokens, shape.dim, shape.hidden, shape.plan
  extended = n // plan.band * (plan.band + 2 * shape.halo)
  array_bytes = n * c * shape.itemsize
  weights = shape.weight_bytes(shape.itemsize)
  forward = pl.CostEstimate(flops=2 * c * h * (extended + n) + 18 * h * extended,
                            transcendentals=h * extended,
                            bytes_accessed=2 * array_bytes + weights)
  backward = pl.CostEstimate(flops=2 * c * h * (2 * extended + 3 * n)
                             + 18 * h * (2 * extended + n),
                             transcendentals=h * (extended + 2 * n),
                             bytes_accessed=3 * array_bytes + weights
                             + shape.cores * shape.weight_bytes(4))
  return forward, backward


def _gelu(a: jax.Array) -> jax.Array:
  return 0.5 * a * (1.0 + jax.lax.erf(a * np.float32(np.sqrt(0.5))))


def _gelu_derivative(a: jax.Array) -> jax.Array:
  return (0.5 * (1.0 + jax.lax.erf(a * np.float32(np.sqrt(0.5))))
          + a * jnp.exp(-0.5 * a * a) * np.float32(1.0 / np.sqrt(2.0 * np.pi)))


def _hidden(x, w1_ref, b1_ref, taps_ref, bias_ref, near, channels):
  """For one chunk of hidden channels: a = fc1(x), the conv's taps, u = GELU(a) at its three
  column taps, and z = u + dwconv(u) + bias; float32."""
  a = (jnp.dot(x, w1_ref[:, channels], preferred_element_type=jnp.float32)
       + b1_ref[:, channels].astype(jnp.float32))
  u = _gelu(a)
  taps = taps_ref[:, channels].astype(jnp.float32)  # (9, chunk), row-major over (3, 3)
  columns = near.columns(u, 1)
  z = u + near.conv(columns, taps) + bias_ref[:, channels].astype(jnp.float32)
  return a, taps, columns, z


def _forward_kernel(x_ref, w1_ref, b1_ref, taps_ref, bias_ref, w2_ref, b2_ref, y_ref, x_padded,
                    *, height, width, band, halo, chunk):
  tokens, dim = x_ref.shape
  tpu_bands.with_halo(x_padded, x_ref, halo)

  def body(first):
    x = x_padded[pl.ds(first, band + 2 * halo), :]
    near = tpu_bands.Neighbours(band + 2 * halo, height, width, first - halo)
    y = jnp.broadcast_to(b2_ref[...].astype(jnp.float32), (band, dim))
    for start in range(0, w1_ref.shape[1], chunk):
      channels = pl.ds(start, chunk)
      z = _hidden(x, w1_ref, b1_ref, taps_ref, bias_ref, near, channels)[3]
      y = y + jnp.dot(z[halo:halo + band].astype(x.dtype), w2_ref[channels, :],
                      preferred_element_type=jnp.float32)
    y_ref[pl.ds(first, band), :] = y.astype(y_ref.dtype)

  tpu_bands.for_each_band(tokens, band, body)


def _backward_kernel(x_ref, w1_ref, b1_ref, taps_ref, bias_ref, w2_ref, dy_ref,
                     dx_ref, dw1_ref, db1_ref, dtaps_ref, dbias_ref, dw2_ref, db2_ref,
                     x_padded, dy_padded, *, height, width, band, halo, chunk):
  @pl.when(pl.program_id(1) == 0)
  def _():
    for ref in (dw1_ref, db1_ref, dtaps_ref, dbias_ref, dw2_ref, db2_ref):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  tokens = x_ref.shape[0]
  tpu_bands.with_halo(x_padded, x_ref, halo)
  tpu_bands.with_halo(dy_padded, dy_ref, halo)
  db2_ref[0] += dy_ref[...].astype(jnp.float32).sum(axis=0, keepdims=True)
  kept = slice(halo, halo + band)

  def body(first):
    x = x_padded[pl.ds(first, band + 2 * halo), :]
    dy = dy_padded[pl.ds(first, band + 2 * halo), :]
    near = tpu_bands.Neighbours(band + 2 * halo, height, width, first - halo)
    dx = jnp.zeros((band, x.shape[1]), jnp.float32)
    for start in range(0, w1_ref.shape[1], chunk):
      dx = dx + backward_chunk(x, dy, near, kept, pl.ds(start, chunk),
                               (w1_ref, b1_ref, taps_ref, bias_ref, w2_ref),
                               (dw1_ref, db1_ref, dtaps_ref, dbias_ref, dw2_ref))[0]
    dx_ref[pl.ds(first, band), :] = dx.astype(dx_ref.dtype)

  tpu_bands.for_each_band(tokens, band, body)


def backward_chunk(x, dy, near, kept, channels, weights, gradients):
  """The FFN's backward over one band for one chunk of hidden channels (kernel code, shared with
  `tpu_block_tail`).

  Args:
    x, dy: the band with its halos, (band + 2 halo, C), in the compute dtype.
    near: the band's `tpu_bands.Neighbours`.
    kept: the band's own tokens among them (a slice).
    channels: the chunk of hidden channels (a `pl.ds`).
    weights: refs of fc1's kernel and bias, the conv's taps and bias, fc2's kernel.
    gradients: refs of their float32 sums (1, ...) to add this chunk's gradients into.

  Returns:
    The chunk's part of dx, (band, C) float32, and z = u + dwconv(u) + bias, the chunk's input
    of fc2 over the band with its halos (float32), for a caller that also needs y.
  """
  w1_ref, b1_ref, taps_ref, bias_ref, w2_ref = weights
  dw1_ref, db1_ref, dtaps_ref, dbias_ref, dw2_ref = gradients
  a, taps, columns, z = _hidden(x, w1_ref, b1_ref, taps_ref, bias_ref, near, channels)
  dw2_ref[0, channels, :] += jax.lax.dot_general(z[kept].astype(x.dtype), dy[kept],
                                                 common.TRANS_A,
                                                 preferred_element_type=jnp.float32)
  # dz over the whole band with its halo: the conv's transpose reads it at neighbours.
  dz = jax.lax.dot_general(dy, w2_ref[channels, :], common.TRANS_B,
                           preferred_element_type=jnp.float32)
  dbias_ref[0, :, channels] += dz[kept].sum(axis=0, keepdims=True)
  # Each shift's transpose is the opposite shift (and mask): tap (i, j)'s gradient is the sum
  # over tokens of dz moved back by row tap i times u moved by column tap j.
  moved_rows = near.conv_transpose_rows(dz, 1)
  dtaps = [(moved_rows[i][kept] * columns[j][kept]).sum(axis=0, keepdims=True)
           for i in range(3) for j in range(3)]
  dtaps_ref[0, :, channels] += jnp.concatenate(dtaps, axis=0)
  du = dz[kept] + near.conv_transpose(moved_rows, taps)[kept]
  da32 = du * _gelu_derivative(a[kept])
  db1_ref[0, :, channels] += da32.sum(axis=0, keepdims=True)
  da = da32.astype(x.dtype)
  dw1_ref[0, :, channels] += jax.lax.dot_general(x[kept], da, common.TRANS_A,
                                                 preferred_element_type=jnp.float32)
  dx = jax.lax.dot_general(da, w1_ref[:, channels], common.TRANS_B,
                           preferred_element_type=jnp.float32)
  return dx, z


def _call(kernel, shape: Shape, inputs: Sequence[jax.Array], weights: int,
          grads: Sequence[jax.Array], cost, interpret):
  """The kernel over blocks of whole images: inputs[0] and inputs[1 + weights:] (x, and dy in
  the backward) by blocks of tokens, each with a VMEM copy with halos (`tpu_bands.with_halo`),
  inputs[1:1 + weights] (the weights) whole at every step. It gives a token array in x's shape
  and dtype, and the float32 sums per core of the gradients of `grads` (`common.CoreGrid`)."""
  x = inputs[0]
  grid = common.CoreGrid(shape.steps)
  tokens = grid.blocks((shape.block_tokens, shape.dim))
  sums, sum_specs = grid.sums(grads)
  padded = pltpu.VMEM((shape.block_tokens + 2 * shape.halo, shape.dim), x.dtype)
  return common.call(
      functools.partial(kernel, height=shape.height, width=shape.width, band=shape.plan.band,
                        halo=shape.halo, chunk=shape.plan.chunk),
      inputs, out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), *sums], grid=grid.shape,
      in_specs=[tokens if i == 0 or i > weights else common.whole(a)
                for i, a in enumerate(inputs)],
      out_specs=[tokens, *sum_specs], scratch_shapes=[padded] * (len(inputs) - weights),
      cost=cost, interpret=interpret)


def _shape(x: jax.Array, w1: jax.Array, height: int, width: int) -> Shape:
  tokens, dim = x.shape
  if tokens % (height * width):
    raise ValueError(f'{tokens} tokens are not whole {height} x {width} images')
  shape = Shape(tokens, height, width, dim, w1.shape[1], x.dtype.itemsize)
  if shape.plan is None:
    raise ValueError(f'the FFN kernel does not fit {common.budget() / 2**20:.0f} MiB of VMEM '
                     f'for {dim} -> {shape.hidden} channels on {height} x {width} images '
                     "(its weights stay in VMEM; see fits_vmem); use kernels='xla'")
  return shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _feed_forward(x, weights, height, width, interpret):
  common.images_per_device(x.shape[0] // (height * width), (x,))

  def forward(tokens, weights):
    (x,) = tokens
    shape = _shape(x, weights[0], height, width)
    return _call(_forward_kernel, shape, (x, *weights), len(weights), (),
                 cost_estimates(shape)[0], interpret)[0], ()

  return common.per_device(forward, (x,), weights)[0]


def _feed_forward_fwd(x, weights, height, width, interpret):
  return _feed_forward(x, weights, height, width, interpret), (x, weights)


def _feed_forward_bwd(height, width, interpret, residuals, dy):
  x, weights = residuals

  def backward(tokens, weights):
    x, dy = tokens
    shape = _shape(x, weights[0], height, width)
    # Every weight's gradient, fc2's bias too, though the kernel does not read that bias.
    dx, *grads = _call(_backward_kernel, shape, (x, *weights[:5], dy), 5, weights,
                       cost_estimates(shape)[1], interpret)
    return dx, common.core_sums(grads)

  dx, grads = common.per_device(backward, (x, dy.astype(x.dtype)), weights)
  return dx, common.like_weights(grads, weights)


_feed_forward.defvjp(_feed_forward_fwd, _feed_forward_bwd)


def feed_forward(x: jax.Array, fc1: tuple[jax.Array, jax.Array],
                 dwconv: tuple[jax.Array, jax.Array], fc2: tuple[jax.Array, jax.Array], *,
                 interpret: bool | None = None) -> jax.Array:
  """fc2(u + dwconv3x3(u) + conv bias) with u = GELU(fc1(x)), as one Pallas kernel.

  Args:
    x: (b, h, w, C) in the compute dtype (the weights are cast to it).
    fc1: (kernel (C, hidden), bias (hidden,)).
    dwconv: (kernel (3, 3, 1, hidden) as `layers.DepthwiseConv` stores it, bias (hidden,)).
    fc2: (kernel (hidden, C), bias (C,)).
    interpret: True runs Pallas's interpreter, False the Mosaic kernel (TPU only); None (the
      default) chooses at lowering (`common.call`).

  Returns:
    (b, h, w, C) in x's dtype. Differentiable in x and every weight (a second kernel).
  """
  batch, height, width, dim = x.shape
  (w1, b1), (taps, bias), (w2, b2) = fc1, dwconv, fc2
  hidden = w1.shape[1]
  if (w1.shape != (dim, hidden) or b1.shape != (hidden,) or taps.shape != (3, 3, 1, hidden)
      or bias.shape != (hidden,) or w2.shape != (hidden, dim) or b2.shape != (dim,)):
    raise ValueError(f'FFN weights for {dim} -> {hidden} -> {dim} channels expected, got '
                     f'{[tuple(a.shape) for a in (w1, b1, taps, bias, w2, b2)]}')
  pad = tpu_bands.lanes(hidden) - hidden  # zero channels: GELU(0) = 0, nothing reaches y
  columns = lambda a: jnp.pad(a.reshape(-1, hidden), ((0, 0), (0, pad)))
  weights = tuple(a.astype(x.dtype) for a in (
      columns(w1), columns(b1), columns(taps), columns(bias),
      jnp.pad(w2, ((0, pad), (0, 0))), b2.reshape(1, dim)))
  y = _feed_forward(x.reshape(batch * height * width, dim), weights, height, width, interpret)
  return y.reshape(x.shape)
