"""Weights on disk: orbax checkpoints of variables and training runs, the one loader from a
directory to `(model, variables)`, and the Flax NNX bridge.

May import: `rmt_jax.models`, jax, flax, orbax; nothing else of rmt_jax.
"""
