"""The host input pipeline: sources (TFDS ImageNet, image folders, the digits demo), the
official DeiT-style augmentation (random-resized crop, RandAugment, random erasing, Mixup and
CutMix), the evaluation preprocessing, class names, and the tf.data pipeline that yields
per-host batches.

May import: TensorFlow, TFDS, jax, numpy; nothing else of rmt_jax.
"""
