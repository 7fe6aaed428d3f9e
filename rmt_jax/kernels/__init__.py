"""Backend-specific forms of RMT's operations and the choice between them (the `kernels` field).

Holds `selection` (which form runs: 'auto', 'xla', 'cpu', 'tpu'), `cpu_forms` (forms written for
XLA's CPU backend) and `tpu/` (Pallas TPU kernels and their shared scaffolding). Every form
computes the same function as the plain form in `rmt_jax.models`, which passes it in.

May import: jax, numpy; nothing else of rmt_jax. (This file imports nothing: commands read
`KERNELS` for their flags without starting jax.)
"""

# The values of the `kernels` field (see `selection`).
KERNELS = ('auto', 'xla', 'cpu', 'tpu')
