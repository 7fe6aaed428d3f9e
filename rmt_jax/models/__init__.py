"""The paper's architecture in Flax: decay and rotary tables, Manhattan self-attention, blocks,
stages, the classifier, the detection backbone, dense heads (Semantic FPN: `dense_heads`), the
variant table.

May import: `rmt_jax.kernels` (the backend forms of a few operations); nothing else of rmt_jax,
so the model can be used alone.
"""

from rmt_jax.models.backbone import FeatureInfo, RMTBackbone
from rmt_jax.models.dense_heads import SemanticFPN, SemanticSegmenter, create_segmenter
from rmt_jax.models.rmt import RMT, Stage
from rmt_jax.models.variants import (ALIASES, VARIANTS, backbone_from_official_kwargs,
                                     canonical_name, create_backbone, create_model,
                                     from_official_kwargs, variant_kwargs)

__all__ = ['RMT', 'Stage', 'RMTBackbone', 'FeatureInfo', 'SemanticFPN', 'SemanticSegmenter',
           'ALIASES', 'VARIANTS', 'backbone_from_official_kwargs', 'canonical_name',
           'create_backbone', 'create_model', 'create_segmenter', 'from_official_kwargs',
           'variant_kwargs']
