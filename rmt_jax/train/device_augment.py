"""The recipe's per-pixel part inside the train step, each device on its own examples.

With `config.data.augment_on = 'device'` the input pipeline yields the random-resized crops,
{'image': uint8 [B, S, S, 3], 'label': int [B]}, and the compiled train step finishes the
recipe with `rmt_jax.data.batch_augment.augment` (flip, RandAugment, normalisation, random
erasing, Mixup/CutMix + label smoothing) before the forward pass, as big_vision mixes images in
its train step.

Each device augments the examples it holds (a `shard_map` over the batch's mesh axes), so
nothing moves between devices, and Mixup/CutMix mix within one device's examples: what timm
does, where each GPU's process runs `Mixup` on its own loader's batch (the official run's 8
GPUs x 128 images mix within each 128). The host path (`augment_on='host'`) mixes within each
process's batch instead; both pair example i with example n-1-i of the batch they mix. With
gradient accumulation the whole step's batch is augmented before it is split into micro-batches,
as the host path does.

The draws of step t come from `step_key(state.rng, t)` folded with the device's index along the
batch axes: every device draws differently, every step differently, and a resumed run draws
what the uninterrupted one drew (the key depends on the checkpointed state alone; the input
iterator's determinism is that of the host path).
"""

import dataclasses
import functools
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from rmt_jax.data import batch_augment
from rmt_jax.kernels import selection
from rmt_jax.kernels.tpu import operations as tpu_operations
from rmt_jax.train import sharding

# Folded into the state's key before the step number, so the augmentation's draws are
# independent of the dropout/drop-path key the step derives from the same state (fold_in(rng,
# step)).
SALT = 0x61756731


def on_device(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.data.augment_on` puts the recipe in the train step.

  Raises:
    ValueError: neither 'host' nor 'device'.
  """
  where = config.data.get('augment_on', 'host')
  if where not in ('host', 'device'):
    raise ValueError(f"config.data.augment_on must be 'host' or 'device', got {where!r}")
  return where == 'device'


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The augmentation's key of step `step` for a run whose state holds `rng` (before the
  per-device fold)."""
  return jax.random.fold_in(jax.random.fold_in(rng, SALT), step)


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
  """`batch_augment.augment` on each device's share of a global batch.

  Attributes:
    recipe: what to do (from `config.data`).
    form: the plain warp's form for the mesh's devices (`batch_augment.form_for`).
    mesh: the batch is split over `sharding.BATCH_AXES` of this mesh; None: one device.
    kernel: RandAugment's warp by its TPU kernel (`kernels.tpu.warp`, through
      `tpu_operations.affine_warp`: checked on the device, the plain form where it does not
      fit or the check declines it) instead of the plain form.
  """
  recipe: batch_augment.BatchRecipe
  form: str
  mesh: jax.sharding.Mesh | None = None
  kernel: bool = False

  @classmethod
  def for_run(cls, config: ml_collections.ConfigDict,
              mesh: jax.sharding.Mesh | None) -> 'DeviceAugment | None':
    """The augmentation of a run of `config` on `mesh`; None when the host augments.

    Raises:
      ValueError: `augment_on='device'` for a task other than classification (the recipe mixes
        class targets).
    """
    if not on_device(config):
      return None
    if config.get('task', 'classification') != 'classification':
      raise ValueError(f"config.data.augment_on='device' finishes the classification recipe; "
                       f"a {config.task} run augments on the host (augment_on='host')")
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    kernels = selection.resolve(config.get('kernels', 'auto'), devices)
    return cls(batch_augment.BatchRecipe.from_config(config.data),
               batch_augment.form_for(devices), mesh, kernel=kernels == 'tpu')

  def warp(self) -> batch_augment.Warp | None:
    """The warp `augment` takes: the TPU kernel's operation where `kernel` is set (None: the
    plain form)."""
    policy = self.recipe.randaugment
    if not self.kernel or policy is None:
      return None
    return functools.partial(
        tpu_operations.affine_warp, fill=self.recipe.fill,
        max_scale=batch_augment.warp_scale_bound(policy),
        scaled_share=batch_augment.rotation_share(policy),
        plain=batch_augment.plain_warp(self.recipe.fill, self.form))

  def shard(self, images: jax.Array, labels: jax.Array, key: jax.Array,
            index: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """Device `index`'s share: `batch_augment.augment` with the key folded with `index`."""
    return batch_augment.augment(images, labels.astype(np.int32),
                                 jax.random.fold_in(key, index), self.recipe, self.form,
                                 self.warp())

  def __call__(self, batch: Mapping[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
    """{'image': uint8 [B, S, S, 3], 'label': int [B]} -> {'image': float32 normalised,
    'label': float32 [B, num_classes] soft targets}, each device augmenting its share with
    `key` folded with its index along the batch axes (`step_key` gives the step's key)."""
    images, labels = batch['image'], batch['label']
    if self.mesh is None or self.mesh.size == 1:
      images, targets = self.shard(images, labels, key, 0)
    else:
      spec = jax.sharding.PartitionSpec(sharding.BATCH_AXES)

      def local(images, labels, key):
        # The batch axes' linear index: the order in which the batch's shards lie.
        return self.shard(images, labels, key, jax.lax.axis_index(sharding.BATCH_AXES))

      images, targets = jax.shard_map(
          local, mesh=self.mesh, in_specs=(spec, spec, jax.sharding.PartitionSpec()),
          out_specs=(spec, spec), check_vma=False)(images, labels, key)
    return {'image': images, 'label': targets}


def train_batch_spec(config: ml_collections.ConfigDict, global_batch: int,
                     batch_sharding: Any = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The abstract global batch the train step takes for `config`: float32 images and soft
  targets from the host, or uint8 crops and int32 labels with `augment_on='device'`."""
  size = int(config.data.image_size)
  if on_device(config):
    return {'image': jax.ShapeDtypeStruct((global_batch, size, size, 3), np.uint8,
                                          sharding=batch_sharding),
            'label': jax.ShapeDtypeStruct((global_batch,), np.int32, sharding=batch_sharding)}
  return {'image': jax.ShapeDtypeStruct((global_batch, size, size, 3), np.float32,
                                        sharding=batch_sharding),
          'label': jax.ShapeDtypeStruct((global_batch, int(config.num_classes)), np.float32,
                                        sharding=batch_sharding)}
