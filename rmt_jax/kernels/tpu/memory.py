"""Where the Pallas TPU kernels' data lives: the VMEM that the kernels plan for (those keeping
their weights in VMEM, `tpu_block_head`, `tpu_projections`, `tpu_feed_forward`,
`tpu_block_tail`, and `tpu_lepe`), and every kernel's operands kept in HBM (`in_hbm`, all
kernels).

The budget is one number for every chip, a v4 TensorCore's 16 MiB (v5e, v5p and v6e have more),
so that a program compiled for any of them fits all.
"""

from typing import Sequence

import jax
from jax.experimental.pallas import tpu as pltpu

# What a kernel's VMEM may take by its own estimate (`Shape.vmem_bytes` of each module), and the
# scoped VMEM it asks Mosaic for: the estimate leaves 2 MiB for what it does not count.
BUDGET = 14 * 1024 * 1024
LIMIT = 16 * 1024 * 1024


def in_hbm(operands: Sequence[jax.Array]) -> list[jax.Array]:
  """`operands` of a Mosaic kernel, constrained to stay in HBM.

  A kernel's BlockSpecs stream its operands from HBM into VMEM block by block, overlapped with
  its work. Left free, XLA's memory-space assignment also copies operands that fit into VMEM
  there ahead of the kernel (`copy-start`): a second on-chip copy of bytes the kernel's pipeline
  brings in anyway, which XLA's cost model counts on top of the kernel's own reads. RMT-S's v5p
  train step estimates at 32.8 ms with the constraint and 36.4 ms without
  (`python -m rmt_jax.tpu_compile`); the HBM traffic is the same (24.3 ms either way with
  memory-space assignment off). For Mosaic calls only: the Pallas interpreter does not take
  memory-space constraints.
  """
  return [pltpu.with_memory_space_constraint(a, pltpu.HBM) for a in operands]
