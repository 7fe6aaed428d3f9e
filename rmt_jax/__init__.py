"""rmt_jax: RMT (Retentive Networks Meet Vision Transformers) in JAX/Flax.

`rmt_jax.create_model(name, **overrides)` builds a variant ('rmt_t', 'rmt_s', 'rmt_b', 'rmt_l' or
an official name such as 'RMT_S'); `rmt_jax.create_backbone(name)` the detection / segmentation
backbone of that variant (multi-scale maps, official `extra_norms`). Importing the package
imports neither torch nor TensorFlow.
"""

from rmt_jax.models import create_backbone, create_model

__all__ = ['create_backbone', 'create_model']
