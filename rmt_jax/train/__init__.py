"""Training: the train state and steps, the loop (`loop.train_and_evaluate`), the optimizer and
its schedule, sharding over a device mesh, and where metrics go.

May import: `rmt_jax.models`, `rmt_jax.kernels.selection`, `rmt_jax.data`, `rmt_jax.weights`.
"""
