"""RMT as the backbone of a detector or segmenter: the official dense-prediction class.

The authors' detection and segmentation code (`detect/mmdet/models/backbones/RMT.py` and
`segmentation/mmseg/models/backbones/RMT.py`, class `RMT`, the same network) is a separate class
from the classifier: the same stem and stages, no head, and for each stage in `out_indices` that
stage's output before its downsampling, through an extra LayerNorm (`extra_norms.{i}`, PyTorch's
default eps 1e-5). `RMTBackbone` computes the same maps, returned NHWC (the official returns
them NCHW; a Flax neck takes NHWC) in float32, and takes the official checkpoints through
`rmt_jax.weights.pytorch` (the variable names are the official ones, as in `RMT`).

`norm_eval=True` keeps the stem's and patch merging's BatchNorms on their running statistics in
training (PyTorch `eval()` mode: neither batch statistics nor updates); drop path still trains.
Note on the official code: its `train()` override puts only `nn.BatchNorm2d` modules in eval
mode, and its norms are `nn.SyncBatchNorm`, which is not a subclass, so in the authors' runs the
BatchNorms trained despite `norm_eval=True`. Pass `norm_eval=False` to train as they did.
"""

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rmt_jax.models import initializers
from rmt_jax.models import network
from rmt_jax.models.rmt import trunk

Dtype = Any


class FeatureInfo(NamedTuple):
  """One returned map: the stage it comes from, its channels, and its stride to the input."""
  stage: int
  channels: int
  stride: int


class RMTBackbone(network.Network):
  """The official detection / segmentation `RMT`: multi-scale NHWC maps, no head.

  Attributes follow the official class's arguments, except `axial` (official
  `chunkwise_recurrents`: True selects the decomposed W-then-H attention) and `remat` (official
  `use_checkpoint`, here per stage). `out_indices`: the stages whose outputs are returned, in
  stage order. `norm_eval`: BatchNorms on running statistics in training (see the module
  docstring for how the official code behaves).

  Call `backbone.apply(variables, images, train=False)` with NHWC images; `train=True` needs the
  'dropout' rng when drop path is on, and `mutable=['batch_stats']` when `norm_eval` is False.
  """
  embed_dims: Sequence[int] = (64, 128, 256, 512)
  depths: Sequence[int] = (2, 2, 8, 2)
  num_heads: Sequence[int] = (4, 4, 8, 16)
  init_values: Sequence[float] = (2, 2, 2, 2)
  heads_ranges: Sequence[float] = (4, 4, 6, 6)
  mlp_ratios: Sequence[float] = (3, 3, 3, 3)
  drop_path_rate: float = 0.1
  axial: Sequence[bool] = (True, True, False, False)
  layerscales: Sequence[bool] = (False, False, False, False)
  layer_init_values: float = 1e-6
  remat: Sequence[bool] = (False, False, False, False)
  out_indices: Sequence[int] = (0, 1, 2, 3)
  norm_eval: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernels: str = 'auto'

  @property
  def feature_info(self) -> tuple[FeatureInfo, ...]:
    """Stage, channels and stride of each returned map, in the order they are returned.

    Strides are nominal (4, 8, 16, 32): each stride-2 conv rounds an odd size up.
    """
    return tuple(FeatureInfo(i, self.embed_dims[i], 4 * 2 ** i)
                 for i in range(len(self.depths)) if i in self.out_indices)

  def setup(self):
    n = len(self.depths)
    if not self.out_indices or any(i not in range(n) for i in self.out_indices):
      raise ValueError(f'out_indices {tuple(self.out_indices)} must name stages 0..{n - 1}')
    self.patch_embed, self.layers = trunk(self)
    # PyTorch's LayerNorm default eps, not the blocks' 1e-6: the official class builds these
    # with `nn.LayerNorm(embed_dims[i])`.
    self.extra_norms = [nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32,
                                     param_dtype=self.param_dtype, scale_init=initializers.ONES,
                                     bias_init=initializers.ZEROS) for _ in range(n)]

  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    """The maps of the stages in `out_indices`.

    Args:
      images: float (batch, height, width, 3), NHWC, normalised as in training.
      train: stochastic depth (and BatchNorm batch statistics, unless `norm_eval`) when True.

    Returns:
      One float32 NHWC map per out index, in stage order: the stage's output before its
      downsampling through `extra_norms_{i}`; `feature_info` gives channels and strides.
    """
    batch_norm_train = train and not self.norm_eval
    x = self.patch_embed(images, batch_norm_train)
    outs = []
    for i, stage in enumerate(self.layers):
      out, x = stage(x, train, batch_norm_train)
      if i in self.out_indices:
        outs.append(self.extra_norms[i](out))
      elif self.is_initializing():
        # The official class builds a norm for every stage whatever out_indices says, so
        # every checkpoint holds all of them: create them all, for strict conversion.
        self.extra_norms[i](out)
    return tuple(outs)
