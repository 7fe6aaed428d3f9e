"""The RMT network (the official `VisRetNet`): stem, four stages of RetBlocks, classification head.

One class serves every size; `rmt_jax.models.variants` holds the official hyper-parameters.
Inputs are NHWC float images of any size the official code accepts (height and width divisible
by 32 keep every stage's map whole; other sizes are rounded as stride-2 convs with padding 1 do).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmt_jax.models import network
from rmt_jax.kernels import selection as kernels_lib
from rmt_jax.models import layers

Dtype = Any


class Stage(nn.Module):
  """One stage (the official `BasicLayer`): RetBlocks, then patch merging unless it is the last.

  Returns the stage's output before downsampling (the multi-scale feature) and the downsampled
  map (None for the last stage).
  """
  depth: int
  num_heads: int
  initial_value: float
  heads_range: float
  mlp_ratio: float
  axial: bool
  drop_path: Sequence[float]
  layerscale: bool
  layer_init_values: float
  out_dim: int | None
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = 'auto'
  capture_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, batch_norm_train: bool | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    """`train`: stochastic depth (and batch statistics); `batch_norm_train`, when given, sets
    the patch merging's BatchNorm apart (the backbone's `norm_eval` freezes it in training)."""
    if batch_norm_train is None:
      batch_norm_train = train
    # static_argnums counts the module itself: `train` is argument 2 of (self, x, train).
    # Parameters are the same either way; remat at init would rebuild them through
    # `jax.checkpoint` (and hide them from `initializers.init_in_one_draw`).
    remat = self.remat and not self.is_initializing()
    block_cls = nn.remat(layers.RetBlock, static_argnums=(2,)) if remat else layers.RetBlock
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.initial_value, self.heads_range, self.axial,
                    self.mlp_ratio, self.drop_path[i], self.layerscale, self.layer_init_values,
                    self.dtype, self.param_dtype, self.kernels,
                    capture_attention=self.capture_attention, name=f'blocks_{i}')(x, train)
    if self.out_dim is None:
      return x, None
    merged = layers.PatchMerging(self.out_dim, self.dtype, self.param_dtype, self.kernels,
                                 name='downsample')(x, batch_norm_train)
    return x, merged


def check_stages(network: nn.Module) -> None:
  """Raises ValueError where an RMT's (or RMTBackbone's) per-stage fields do not fit together."""
  kernels_lib.check(network.kernels)
  n = len(network.depths)
  for field in ('embed_dims', 'num_heads', 'init_values', 'heads_ranges', 'mlp_ratios',
                'axial', 'layerscales', 'remat'):
    if len(getattr(network, field)) != n:
      raise ValueError(f'{type(network).__name__}.{field} has {len(getattr(network, field))} '
                       f'entries, depths has {n}: one per stage is needed')
  for dim, heads in zip(network.embed_dims, network.num_heads):
    if dim % heads or (dim // heads) % 2:
      raise ValueError(f'embed_dim {dim} / num_heads {heads} must be an even integer '
                       '(the rotary shift rotates channel pairs)')


def trunk(network: nn.Module) -> tuple[layers.Stem, list['Stage']]:
  """The stem and the stages of an RMT or an RMTBackbone, from the fields they share (built in
  the network's `setup`, whose attributes name them `patch_embed` and `layers_i`)."""
  check_stages(network)
  n = len(network.depths)
  rates = drop_path_rates(network.drop_path_rate, network.depths)
  stem = layers.Stem(network.embed_dims[0], network.dtype, network.param_dtype, network.kernels)
  stages = [
      Stage(depth=network.depths[i], num_heads=network.num_heads[i],
            initial_value=network.init_values[i], heads_range=network.heads_ranges[i],
            mlp_ratio=network.mlp_ratios[i], axial=network.axial[i], drop_path=rates[i],
            layerscale=network.layerscales[i], layer_init_values=network.layer_init_values,
            out_dim=network.embed_dims[i + 1] if i < n - 1 else None, remat=network.remat[i],
            dtype=network.dtype, param_dtype=network.param_dtype, kernels=network.kernels,
            capture_attention=getattr(network, 'capture_attention', False))
      for i in range(n)]
  return stem, stages


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[tuple[float, ...]]:
  """Each stage's blocks' stochastic depth: rising linearly from 0 at the network's first block
  to `drop_path_rate` at its last."""
  rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
  starts = np.cumsum([0, *depths]).tolist()
  return [tuple(rates[starts[i]:starts[i + 1]]) for i in range(len(depths))]


class RMT(network.Network):
  """RMT backbone and classifier.

  Attributes follow the official `VisRetNet` arguments, except `axial` (official
  `chunkwise_recurrents`: True selects the decomposed W-then-H attention) and `remat` (official
  `use_checkpoints`: rematerialise the stage's blocks in the backward pass) and `kernels` (which
  form of the backend-specific operations to compile: 'auto', 'xla', 'cpu' or 'tpu', see
  `rmt_jax.kernels.selection`; every form computes the same function) and `capture_attention` (also
  sow every block's attention weights into the 'intermediates' collection, see
  `rmt_jax.models.attention_maps`; off by default, and then not traced at all) and
  `residual_dtype`: the dtype of the residual stream, what the stem and each patch merging hand
  to the blocks and each block adds to. float32 (the default) is the official mixed-precision
  recipe's (BatchNorm outputs and residual adds in float32 under autocast); bfloat16 halves the
  stream's memory traffic, the most of what a TPU step moves outside the kernels, at bfloat16's
  rounding of every residual add: a departure from the official numerics, not validated by an
  ImageNet run.

  `num_classes=0` drops the head: `__call__` then returns the pooled features (batch, projection).
  `token_label=True` adds the token-labeling `aux_head` (a Linear on the last stage's tokens);
  `__call__` then returns `head(pooled) + 0.5 * max over tokens of aux_head(tokens)`, the official
  evaluation output; `token_logits` gives both parts for a token-labeling loss.
  """
  num_classes: int = 1000
  embed_dims: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 8, 2)
  num_heads: Sequence[int] = (4, 4, 8, 16)
  init_values: Sequence[float] = (2, 2, 2, 2)
  heads_ranges: Sequence[float] = (4, 4, 6, 6)
  mlp_ratios: Sequence[float] = (3, 3, 3, 3)
  drop_path_rate: float = 0.1
  projection: int = 1024
  axial: Sequence[bool] = (True, True, False, False)
  layerscales: Sequence[bool] = (False, False, False, False)
  layer_init_values: float = 1e-6
  remat: Sequence[bool] = (False, False, False, False)
  token_label: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  residual_dtype: Dtype = jnp.float32
  kernels: str = 'auto'
  capture_attention: bool = False

  def setup(self):
    self.patch_embed, self.layers = trunk(self)
    self.proj = layers.dense(self.projection, self.dtype, self.param_dtype, 'proj')
    self.norm = layers.batch_norm('norm', self.param_dtype)
    if self.num_classes > 0:
      self.head = layers.dense(self.num_classes, self.dtype, self.param_dtype, 'head')
      if self.token_label:
        self.aux_head = layers.dense(self.num_classes, self.dtype, self.param_dtype, 'aux_head')

  def features(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """Multi-scale features for detection / segmentation necks.

    Call as `model.apply(variables, images, method=model.features)`.

    Args:
      images: float (batch, height, width, channels), NHWC.
      train: batch statistics and stochastic depth when True.

    Returns:
      {'stem': stride-4 map after the stem, 'stage0' ... 'stage3': each stage's output before
      its downsampling (strides 4, 8, 16, 32)}, all NHWC.
    """
    # The residual stream starts at the stem's and each patch merging's BatchNorm (float32).
    x = self.patch_embed(images, train).astype(self.residual_dtype)
    feats = {'stem': x}
    for i, stage in enumerate(self.layers):
      feats[f'stage{i}'], x = stage(x, train)
      x = None if x is None else x.astype(self.residual_dtype)
    return feats

  def pooled(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """The head's trunk: Linear -> BatchNorm -> Swish -> average over positions."""
    x = self.proj(tokens)
    x = self.norm(x, use_running_average=not train)
    x = nn.swish(x)
    return x.mean(axis=(1, 2))

  def token_logits(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """For token-labeling models: (class logits (b, classes), per-token logits (b, h*w, classes))."""
    if not (self.token_label and self.num_classes > 0):
      raise ValueError('token_logits needs token_label=True and num_classes > 0')
    tokens = self.features(images, train)[f'stage{len(self.depths) - 1}']
    cls = self.head(self.pooled(tokens, train))
    aux = self.aux_head(tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]))
    return cls.astype(jnp.float32), aux.astype(jnp.float32)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Logits (batch, num_classes) in float32, or pooled features if num_classes == 0.

    Args:
      images: float (batch, height, width, channels), NHWC, normalised as in training.
      train: batch statistics (update `batch_stats`, which must be mutable) and stochastic depth
        (needs the 'dropout' rng) when True.
    """
    if self.token_label and self.num_classes > 0:
      cls, aux = self.token_logits(images, train)
      return cls + 0.5 * aux.max(axis=1)
    tokens = self.features(images, train)[f'stage{len(self.depths) - 1}']
    x = self.pooled(tokens, train)
    if self.num_classes > 0:
      x = self.head(x)
    return x.astype(jnp.float32)
