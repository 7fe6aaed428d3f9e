"""rmt_jax: RMT (Retentive Networks Meet Vision Transformers) in JAX/Flax.

`rmt_jax.create_model(name, **overrides)` builds a variant ('rmt_t', 'rmt_s', 'rmt_b', 'rmt_l' or
an official name such as 'RMT_S'); `rmt_jax.create_backbone(name)` the detection / segmentation
backbone of that variant (multi-scale maps, official `extra_norms`); `rmt_jax.load(path)` returns
`(model, variables)` from a converted weights directory or a training workdir. Importing the
package imports neither torch, TensorFlow, optax nor orbax.
"""

from rmt_jax.weights.loading import load
from rmt_jax.models import create_backbone, create_model

__all__ = ['create_backbone', 'create_model', 'load']
