"""The detection / segmentation backbone's weights (`rmt_jax.models.RMTBackbone`) in the files
that hold them: mmdetection / mmsegmentation checkpoints, and the classification checkpoints that
start a detection run.

The backbone's variables carry the official names (`patch_embed.*`, `layers.N.*`,
`extra_norms.N.*`), so `pytorch.torch_to_flax(state_dict, backbone)` and
`pytorch.flax_to_torch(variables, backbone)` map them as they map the classifier's. This module
adds what sits around a detection run: `backbone_state_dict` takes the backbone's keys out of
whatever file starts one,

- an mmdetection / mmsegmentation checkpoint (`state_dict` with `backbone.*` keys beside
  `neck.*` and `*_head.*`; `meta`, `optimizer` ignored): `backbone.*`, prefix removed; every
  other key is listed, by module, as not converted;
- a bare state_dict of the official backbone class: everything;
- a classification checkpoint (the usual start of a detection run): the stem and the stages;
  the head (`proj.*`, `norm.*`, `head.*`, `aux_head.*`) is dropped and the extra norms start
  fresh (weight 1, bias 0, the official init);

and `write_mmdet_checkpoint` writes back `{'state_dict': {'backbone.' + key: ...}}`, the layout
of an mmdetection checkpoint, which the official backbone loads strictly once the prefix is
removed (as `mmcv_custom.load_checkpoint` does). `python -m rmt_jax.convert ... --backbone` is
the command line over both.
"""

import collections
import os
from typing import Any, Mapping

import numpy as np

from rmt_jax.models import RMTBackbone
from rmt_jax.weights import pytorch

BACKBONE_PREFIX = 'backbone.'
# Modules of the classifier that the backbone does not have.
CLASSIFIER_HEAD = ('proj', 'norm', 'head', 'aux_head')
# How a layout is named in summaries and metadata.
LAYOUTS = {'mmdet': "mmdetection / mmsegmentation checkpoint (prefix 'backbone.')",
           'backbone': 'backbone state_dict',
           'classifier': 'classification checkpoint'}


def backbone_state_dict(state_dict: Mapping[str, Any], backbone: RMTBackbone
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
  """The backbone's official keys out of a detection, segmentation or classification state_dict.

  Args:
    state_dict: keys -> arrays of an mmdet/mmseg model (`backbone.*`, `neck.*`, ...), of the
      official backbone class, or of the classifier (`VisRetNet`).
    backbone: the module the weights are for (gives the extra norms' widths).

  Returns:
    (state_dict for `pytorch.torch_to_flax`, report) where report =
    {'layout': 'mmdet' | 'backbone' | 'classifier', 'not_converted': {module: tensor count},
    'initialised': [keys created fresh]}. Whether the weights fit is left to `torch_to_flax`,
    which checks every key and shape.
  """
  not_converted: collections.Counter = collections.Counter()
  initialised = []
  if any(k.startswith(BACKBONE_PREFIX) for k in state_dict):
    layout, weights = 'mmdet', {}
    for key, value in state_dict.items():
      if key.startswith(BACKBONE_PREFIX):
        weights[key[len(BACKBONE_PREFIX):]] = value
      else:
        not_converted[key.split('.', 1)[0]] += 1
  elif (not any(k.startswith('extra_norms.') for k in state_dict)
        and any(k.split('.', 1)[0] in CLASSIFIER_HEAD for k in state_dict)):
    layout, weights = 'classifier', {}
    for key, value in state_dict.items():
      if key.split('.', 1)[0] in CLASSIFIER_HEAD:
        not_converted[key.split('.', 1)[0]] += 1
      else:
        weights[key] = value
    for i, dim in enumerate(backbone.embed_dims):
      # nn.LayerNorm's init, which the official `_init_weights` sets again: weight 1, bias 0.
      weights[f'extra_norms.{i}.weight'] = np.ones(dim, np.float32)
      weights[f'extra_norms.{i}.bias'] = np.zeros(dim, np.float32)
      initialised += [f'extra_norms.{i}.weight', f'extra_norms.{i}.bias']
  else:
    layout, weights = 'backbone', dict(state_dict)
  return weights, {'layout': layout, 'not_converted': dict(sorted(not_converted.items())),
                   'initialised': initialised}


def describe_report(report: Mapping[str, Any]) -> str:
  """The report of `backbone_state_dict` in words, for the converter's summary.

  Args:
    report: as `backbone_state_dict` returns it.

  Returns:
    'as <layout>' on the first line, then what was left out and what was created fresh.
  """
  lines = [f"as {LAYOUTS[report['layout']]}"]
  if report['not_converted']:
    what = ', '.join(f'{module}.* ({count})' for module, count in report['not_converted'].items())
    reason = ('the classification head' if report['layout'] == 'classifier'
              else 'not part of the backbone')
    lines.append(f'not converted ({reason}): {what}')
  if report['initialised']:
    norms = sorted({k.rsplit('.', 1)[0] for k in report['initialised']})
    lines.append(f"initialised fresh (weight 1, bias 0): {', '.join(norms)}")
  return '\n'.join(lines)


def write_mmdet_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]
                           ) -> None:
  """Writes `{'state_dict': {'backbone.' + key: tensor}}` atomically to a new file.

  Args:
    path: the new file, local or on an object store (gs://...).
    state_dict: the backbone's official keys, as `pytorch.flax_to_torch` gives them.

  Raises:
    FileExistsError: `path` exists.
    pytorch.CheckpointFileError: torch is missing.
  """
  pytorch.write_torch_checkpoint(
      path, {BACKBONE_PREFIX + k: v for k, v in state_dict.items()}, entry='state_dict')
