"""Pallas TPU kernels of RMT's operations: the decayed attention, a block's first half (pos conv,
layer norm, q/k/v projections), LePE, the FFN and a block's second half, with their shared
scaffolding (image tokens in bands, VMEM memory plans, the per-device mapping over a mesh).

May import: jax (Pallas included), numpy, and each other; nothing else of rmt_jax.
"""
