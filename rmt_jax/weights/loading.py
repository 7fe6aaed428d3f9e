"""One way from a directory of weights to a runnable model: `rmt_jax.load(path)`.

    model, variables = rmt_jax.load('weights/rmt_s')     # or a training workdir, or gs://...
    logits = model.apply(variables, images)

`path` is a variables directory (written by `python -m rmt_jax.convert torch2flax` or
`rmt_jax.weights.checkpoint.save_variables`) or a training workdir (`main.py --workdir`: its latest
checkpoint, with the EMA weights where the run kept them). The model is rebuilt from the
description stored with the weights, so the caller need not know the variant. The predict,
convert and evaluation-only commands all load through here.

This module imports orbax (through `rmt_jax.weights.checkpoint`) only when called: `import rmt_jax`
and the model stay usable without it.
"""

import os
from typing import Any, Mapping

from rmt_jax.models import RMT, create_backbone, create_model
from rmt_jax.models.backbone import RMTBackbone


def model_from_metadata(metadata: Mapping[str, Any], **overrides: Any) -> RMT | RMTBackbone:
  """The network a weights description names: `create_model(metadata['model'],
  **metadata['model_overrides'], **overrides)`, or `create_backbone(...)` for the detection /
  segmentation backbone's weights (`"backbone": true`).

  Args:
    metadata: the description stored with the weights (see `checkpoint.load_variables`).
    **overrides: attributes that do not change the variables, e.g. `dtype=jnp.bfloat16`.

  Raises:
    ValueError: the description names no model, an unknown one, or overrides it does not take.
  """
  if 'model' not in metadata:
    raise ValueError("the weights' description names no model (no 'model' entry)")
  stored = dict(metadata.get('model_overrides', {}))
  build = create_backbone if metadata.get('backbone') else create_model
  try:
    return build(metadata['model'], **{**stored, **overrides})
  except TypeError as e:
    raise ValueError(f"model_overrides {stored} do not build {metadata['model']}: {e}") from None


def load_with_metadata(path: str | os.PathLike, **overrides: Any
                       ) -> tuple[RMT, dict[str, Any], dict[str, Any]]:
  """`load`, plus the description stored with the weights.

  Returns:
    (model, variables, metadata): metadata holds 'model', 'model_overrides', 'class_names'
    where stored, and for a training workdir 'step' and 'weights' ('ema' or 'raw').
  """
  from rmt_jax.weights import checkpoint  # pylint: disable=g-import-not-at-top
  variables, metadata = checkpoint.load_variables(path)
  model = model_from_metadata(metadata, **overrides)
  return model, {k: variables[k] for k in ('params', 'batch_stats') if k in variables}, metadata


def load(path: str | os.PathLike, **overrides: Any) -> tuple[RMT, dict[str, Any]]:
  """The model and its weights, ready for `model.apply(variables, images)`.

  Args:
    path: a variables directory or a training workdir, local or on an object store (gs://).
    **overrides: `create_model` attributes that do not change the variables, e.g.
      `dtype=jnp.bfloat16` or `drop_path_rate=0.1` for fine-tuning.

  Returns:
    (model, variables): variables = {'params', 'batch_stats'} as NumPy arrays (the converter's
    bookkeeping of the official buffers is left out).

  Raises:
    rmt_jax.weights.checkpoint.CheckpointNotFoundError: no rmt_jax weights at `path`.
    ValueError: the stored description does not build a model.
  """
  model, variables, _ = load_with_metadata(path, **overrides)
  return model, variables
