"""Training: the train state and the jitted steps (`steps.py`, which imports no TensorFlow), the
loop that feeds them data, evaluates and checkpoints (`loop.train_and_evaluate`), the optimizer
and its schedule, sharding over a device mesh, and where metrics go.

May import: `rmt_jax.models`, `rmt_jax.kernels.selection`, `rmt_jax.data`, `rmt_jax.weights`.
"""
