"""The VMEM the Pallas TPU kernels that keep their weights in VMEM plan for (`tpu_feed_forward`,
`tpu_projections`): one number for every chip, a v4 TensorCore's 16 MiB (v5e, v5p and v6e have
more), so that a program compiled for any of them fits all.
"""

# What a kernel's VMEM may take by its own estimate (`Shape.vmem_bytes` of each module), and the
# scoped VMEM it asks Mosaic for: the estimate leaves 2 MiB for what it does not count.
BUDGET = 14 * 1024 * 1024
LIMIT = 16 * 1024 * 1024
