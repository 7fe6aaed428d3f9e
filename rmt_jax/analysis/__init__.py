"""Counting what a network and its compiled programs do: parameters and multiply-accumulates
(`counting`), the bytes a compiled TPU program moves, per module (`tpu_traffic`), and what a TPU
would spend on each Pallas kernel of a program, read from its jaxpr (`tpu_floor`).

May import: `rmt_jax.models`, jax, numpy.
"""
