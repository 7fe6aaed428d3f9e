"""Weights on disk: orbax checkpoints of variables and training runs, the one loader from a
directory to `(model, variables)`, the official PyTorch checkpoints' mapping and files
(`pytorch`, `pytorch_backbone`; torch is imported only when a .pth file is read or written),
and the Flax NNX bridge.

May import: `rmt_jax.models`, jax, flax, orbax; nothing else of rmt_jax.
"""
