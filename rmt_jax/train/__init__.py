"""Training: the train state and the jitted steps (`steps.py`, which imports no TensorFlow; with
`augment_on='device'` they finish the augmentation recipe on each device, `device_augment.py`),
the tasks that the loop runs (`tasks.py`: classification; `segmentation.py`: RMT under a Semantic FPN
head), the loop that feeds them data, evaluates and checkpoints (`loop.train_and_evaluate`), the
optimizer and its schedule, sharding over a device mesh, and where metrics go.

May import: `rmt_jax.models`, `rmt_jax.kernels.selection`, `rmt_jax.data`, `rmt_jax.weights`.
"""
