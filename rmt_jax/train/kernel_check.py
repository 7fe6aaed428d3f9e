"""The on-device kernel check for a network: which TPU kernels a run keeps.

`check_model` traces the network's train-mode forward pass under `kernels='tpu'` at the run's
per-device batch (and the step's augmentation where it runs on the device: its warp's kernel),
records every kernel call it would make (`kernels.tpu.operations.recording`), and runs each
against its plain form on the device at hand (`kernels.check`). The results are
cached in the workdir (`KERNEL_CHECK_FILE`), keyed by the device kind, jax's and libtpu's
versions and the calls' shapes, so a resumed run does not check again.
"""

import dataclasses
from typing import Callable

from etils import epath
import jax
import jax.numpy as jnp

from rmt_jax.kernels import check
from rmt_jax.kernels.tpu import operations
from rmt_jax.models import RMT
from rmt_jax.train import device_augment

KERNEL_CHECK_FILE = 'kernel_check.json'


def record_calls(model: RMT, batch: int, image_size: int,
                 augment: device_augment.DeviceAugment | None = None) -> list[operations.Call]:
  """The kernel calls of `model`'s train-mode forward pass (and so of its backward) on `batch`
  images of `image_size`, under `kernels='tpu'`, without running anything; each with its
  plain form in float32 as the check's reference (the same network in float32 throughout);
  then those of `augment` (its TPU kernel forced) on the batch of uint8 crops."""
  calls = _recorded(model, batch, image_size)
  in_float32 = _recorded(model.clone(dtype=jnp.float32, residual_dtype=jnp.float32), batch,
                         image_size)
  references = {(c.key.operation, c.key.shape): c.plain for c in in_float32}
  calls = [dataclasses.replace(c, reference=references.get((c.key.operation, c.key.shape)))
           for c in calls]
  if augment is not None:
    augment = dataclasses.replace(augment, mesh=None, kernel=True)
    crops = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    with operations.recording() as recorded:
      jax.eval_shape(lambda x, y: augment.shard(x, y, jax.random.key(0), 0), crops, labels)
    calls += list(recorded.values())
  return [c for c in calls if c.kernel is not None]


def _recorded(model: RMT, batch: int, image_size: int) -> list[operations.Call]:
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  key = jax.random.key(0)
  variables = jax.eval_shape(model.clone(kernels='xla').init, key, images)
  model = model.clone(kernels='tpu')
  with operations.recording() as calls:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={'dropout': key},
                                            mutable=['batch_stats']), variables, images)
  return list(calls.values())


def check_model(model: RMT, batch: int, image_size: int, workdir: str | None = None, *,
                augment: device_augment.DeviceAugment | None = None,
                say: Callable[[str], None] = print) -> list[check.Result]:
  """Checks every kernel `model` would call (see the module docstring); returns the results.

  Args:
    model: the network as the run builds it (its dtype is the check's).
    batch: images per device.
    image_size: the training resolution.
    workdir: where the results are cached (read if they hold for this device, software and
      these shapes; written otherwise); None: no cache.
    augment: the run's augmentation in the train step (None where the host augments).
    say: where progress and the warnings of dropped kernels go.
  """
  calls = record_calls(model, batch, image_size, augment)
  fingerprint = check.fingerprint(calls)
  path = epath.Path(workdir) / KERNEL_CHECK_FILE if workdir else None
  if path is not None and (results := check.load(path, fingerprint)) is not None:
    say(f'kernel check: the results in {path} hold for this device, software and shapes')
    return results
  say(f'kernel check: {len(calls)} TPU kernels against their plain forms on '
      f'{jax.devices()[0].device_kind}, {batch} images of {image_size} per device')
  results = check.check(calls, say=say)
  if path is not None and jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    check.save(path, fingerprint, results)
  return results
