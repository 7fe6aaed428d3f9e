"""Counting what a network and its compiled programs do: parameters and multiply-accumulates
(`counting`), and the bytes a compiled TPU program moves, per module (`tpu_traffic`).

May import: `rmt_jax.models`, jax, numpy.
"""
