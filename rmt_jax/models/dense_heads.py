"""Dense-prediction heads over RMT's backbone: Semantic FPN for semantic segmentation.

`SemanticFPN` is the segmentation head that the RMT paper's ADE20K figures use (mmseg's
`FPN` neck + `FPNHead`, after Kirillov et al., "Panoptic Feature Pyramid Networks", 2019):

  * the FPN neck: a lateral 1x1 conv per map to `channels`, a top-down pass that upsamples each
    coarser sum twice (nearest, as mmdet's FPN) and adds it, a 3x3 conv on each sum;
  * the semantic branch: per level, 3x3 conv + GroupNorm + ReLU stages, each coarser level
    upsampled 2x (bilinear) after each stage until it reaches stride 4, the levels summed, and
    a 1x1 per-pixel classifier at stride 4.

GroupNorm (the paper's choice) rather than mmseg's SyncBatchNorm keeps the head free of batch
statistics. `SemanticSegmenter` puts a backbone under the head and upsamples the stride-4
logits bilinearly to the input's size. Any flax module that maps NHWC images to a tuple of
NHWC maps, finest first, can stand in for `RMTBackbone`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rmt_jax.models.backbone import RMTBackbone
from rmt_jax.models.variants import create_backbone

Dtype = Any

# mmdet's FPN convs: xavier uniform; mmseg's ConvModules: kaiming normal (fan_out, relu); its
# classifier: normal(0, 0.01).
_FPN_INIT = nn.initializers.xavier_uniform()
_RELU_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_CLASSIFIER_INIT = nn.initializers.normal(0.01)
_PAD_3X3 = ((1, 1), (1, 1))


def _resize(x: jax.Array, height: int, width: int, method: str) -> jax.Array:
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), method=method)


class SemanticFPN(nn.Module):
  """FPN neck + semantic branch + per-pixel classifier (see the module docstring).

  Attributes:
    num_classes: classes of the per-pixel classifier (background included).
    channels: the FPN neck's width (mmseg's ADE20K config: 256).
    head_channels: the semantic branch's width (mmseg: 128).
    norm_groups: GroupNorm groups of the semantic branch (the paper: 32).
  """
  num_classes: int
  channels: int = 256
  head_channels: int = 128
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], train: bool = False) -> jax.Array:
    """Logits at the finest map's resolution.

    Args:
      maps: NHWC maps, finest first, each half the previous one's size (rounded up).
      train: unused (no dropout, no batch statistics); kept for the modules' one signature.

    Returns:
      float32 [batch, H0, W0, num_classes], H0 x W0 the finest map's size (stride 4).
    """
    del train
    conv = lambda features, kernel, name, init, padding='VALID', bias=True: nn.Conv(  # pylint: disable=g-long-lambda
        features, kernel, padding=padding, use_bias=bias, kernel_init=init, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    laterals = [conv(self.channels, (1, 1), f'lateral_convs_{i}', _FPN_INIT)(m)
                for i, m in enumerate(maps)]
    for i in range(len(laterals) - 2, -1, -1):
      h, w = laterals[i].shape[1:3]
      laterals[i] = laterals[i] + _resize(laterals[i + 1], h, w, 'nearest')
    pyramid = [conv(self.channels, (3, 3), f'fpn_convs_{i}', _FPN_INIT, _PAD_3X3)(x)
               for i, x in enumerate(laterals)]

    height, width = pyramid[0].shape[1:3]
    summed = None
    for i, x in enumerate(pyramid):
      for j in range(max(i, 1)):
        x = conv(self.head_channels, (3, 3), f'scale_heads_{i}_{j}_conv', _RELU_INIT, _PAD_3X3,
                 bias=False)(x)
        x = nn.GroupNorm(num_groups=self.norm_groups, epsilon=1e-5, dtype=jnp.float32,
                         param_dtype=self.param_dtype, name=f'scale_heads_{i}_{j}_norm')(x)
        x = nn.relu(x).astype(self.dtype)
        if i > 0:
          # Twice per stage; the last stage lands exactly on the finest map's size.
          h, w = ((height, width) if j == i - 1 else
                  (-(-height // 2 ** (i - j - 1)), -(-width // 2 ** (i - j - 1))))
          x = _resize(x, h, w, 'bilinear')
      summed = x if summed is None else summed + x
    logits = conv(self.num_classes, (1, 1), 'conv_seg', _CLASSIFIER_INIT)(summed)
    return logits.astype(jnp.float32)


class SemanticSegmenter(nn.Module):
  """A backbone under a dense head: per-pixel logits at the input's resolution.

  Attributes:
    backbone: NHWC images -> tuple of NHWC maps, finest first (e.g. `RMTBackbone`).
    head: the maps -> logits at the finest map's resolution (e.g. `SemanticFPN`).

  The variables are {'backbone': the backbone's, 'head': the head's}, so converted backbone
  weights (`python -m rmt_jax.convert torch2flax --backbone`) go under 'backbone' as they are.
  """
  backbone: nn.Module
  head: nn.Module

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """float32 [batch, height, width, num_classes] logits for NHWC `images`."""
    logits = self.head(self.backbone(images, train), train)
    return _resize(logits, images.shape[1], images.shape[2], 'bilinear')


def create_segmenter(backbone: str, num_classes: int, *, channels: int = 256,
                     head_channels: int = 128, norm_groups: int = 32,
                     dtype: Dtype = jnp.float32,
                     **backbone_overrides: Any) -> SemanticSegmenter:
  """RMT's backbone of a variant under a Semantic FPN head, e.g.
  `create_segmenter('rmt_s', 150)` (ADE20K's classes).

  Args:
    backbone: a variant name, as for `create_backbone`.
    num_classes: per-pixel classes.
    channels, head_channels, norm_groups: `SemanticFPN`'s.
    dtype: compute dtype of the backbone and the head (parameters stay float32).
    **backbone_overrides: any `RMTBackbone` attribute (norm_eval, drop_path_rate, remat, ...).
  """
  net: RMTBackbone = create_backbone(backbone, dtype=dtype, **backbone_overrides)
  head = SemanticFPN(num_classes=num_classes, channels=channels, head_channels=head_channels,
                     norm_groups=norm_groups, dtype=dtype)
  return SemanticSegmenter(backbone=net, head=head)
