"""Pallas TPU kernels of RMT's operations: the decayed attention, a block's first half (pos conv,
layer norm, q/k/v projections), LePE, the FFN and a block's second half; one outside the network,
RandAugment's affine warp in the train step's augmentation (`warp`); their shared scaffolding in
`common` (the VMEM budget, the per-device mapping over a mesh, the `pallas_call` skeleton, the
layer norm in a kernel) and `bands` (image tokens in bands with halos); and `operations`, the API
the model and the augmentation call.

May import: jax (Pallas included), numpy, and each other; nothing else of rmt_jax.
"""
