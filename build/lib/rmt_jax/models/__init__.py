"""Flax modules of RMT. Imports nothing else of rmt_jax, so the model can be used alone."""

from rmt_jax.models.rmt import RMT, Stage
from rmt_jax.models.variants import (ALIASES, VARIANTS, canonical_name, create_model,
                                     from_official_kwargs, variant_kwargs)

__all__ = ['RMT', 'Stage', 'ALIASES', 'VARIANTS', 'canonical_name', 'create_model',
           'from_official_kwargs', 'variant_kwargs']
