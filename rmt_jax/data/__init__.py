"""The input pipeline: sources (TFDS ImageNet, image folders, the digits demo), the digit
mosaics of the segmentation demo (`mosaics`, label maps, no tf.data), the official
DeiT-style augmentation (random-resized crop, RandAugment, random erasing, Mixup and CutMix) on
the host (`augment`, `randaugment`, `mixup`, in TensorFlow) or, per batch, in jax inside the
compiled step (`batch_augment`), their shared settings (`policies`), the evaluation
preprocessing, class names, the data config's defaults (`config`, no TensorFlow), and the
tf.data pipeline that yields per-host batches (`input_pipeline`).

May import: TensorFlow, TFDS, jax, numpy; nothing else of rmt_jax.
"""
