"""Weights of the detection / segmentation backbone (`rmt_jax.models.RMTBackbone`).

    python -m rmt_jax.convert torch2flax --backbone --model rmt_s --src FILE.pth --dst DIR
    python -m rmt_jax.convert flax2torch --backbone --model rmt_s --src DIR --dst FILE.pth

The backbone's variables carry the official names (`patch_embed.*`, `layers.N.*`,
`extra_norms.N.*`), so `rmt_jax.convert.torch_to_flax(state_dict, backbone)` and
`flax_to_torch(variables, backbone)` map them as they map the classifier's. This module adds
what sits around a detection run: `backbone_state_dict` takes the backbone's keys out of
whatever file starts one,

- an mmdetection / mmsegmentation checkpoint (`state_dict` with `backbone.*` keys beside
  `neck.*` and `*_head.*`; `meta`, `optimizer` ignored): `backbone.*`, prefix removed; every
  other key is listed, by module, as not converted;
- a bare state_dict of the official backbone class: everything;
- a classification checkpoint (the usual start of a detection run): the stem and the stages;
  the head (`proj.*`, `norm.*`, `head.*`, `aux_head.*`) is dropped and the extra norms start
  fresh (weight 1, bias 0, the official init);

and the command line's `--backbone` mode, which writes back `{'state_dict': {'backbone.' + key:
...}}`, the layout of an mmdetection checkpoint, that the official backbone loads strictly
once the prefix is removed (as `mmcv_custom.load_checkpoint` does).
"""

import argparse
import collections
import pathlib
from typing import Any, Mapping

import numpy as np

from rmt_jax.weights import checkpoint
from rmt_jax import convert
from rmt_jax.models import RMTBackbone, canonical_name, create_backbone

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
    (state_dict for `rmt_jax.convert.torch_to_flax`, report) where report =
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
  """The report of `backbone_state_dict` in words, for the converter's summary."""
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


def write_mmdet_checkpoint(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes `{'state_dict': {'backbone.' + key: tensor}}` atomically to a new file."""
  convert.write_torch_checkpoint(
      path, {BACKBONE_PREFIX + k: v for k, v in state_dict.items()}, entry='state_dict')


# --- the command line (`python -m rmt_jax.convert ... --backbone`) ----------------------------


def torch2flax(args: argparse.Namespace) -> str:
  """`torch2flax --backbone`: an mmdet/mmseg, backbone or classification .pth -> variables dir."""
  name = canonical_name(args.model)
  if args.num_classes is not None or args.token_label is not None:
    raise ValueError('--num-classes and --token-label describe a classification head; the '
                     'backbone has none (drop them, or drop --backbone)')
  dst = pathlib.Path(args.dst).absolute()
  if dst.exists():
    raise FileExistsError(f'{dst} exists; choose a new directory or remove it first')
  print(f'torch2flax: reading {args.src} ...', flush=True)
  state_dict, source = convert.read_torch_checkpoint(args.src, args.ema, args.allow_pickle)
  entry = convert.describe_source(source)
  backbone = create_backbone(name)
  weights, report = backbone_state_dict(state_dict, backbone)
  print(f'torch2flax: {len(state_dict)} tensors of {entry} -> {name} backbone, '
        f'writing {dst} ...', flush=True)
  try:
    variables = convert.torch_to_flax(weights, backbone)
  except convert.ConversionError as e:
    guesses = [g for g in convert.guess_variants(weights) if g != name]
    hint = f' (its shapes are those of --model {" or ".join(guesses)})' if guesses else ''
    raise convert.ConversionError(
        f'{entry} of {args.src}, read {describe_report(report).splitlines()[0]}, does not fit '
        f'the {name} backbone{hint}: '
        f'{str(e).removeprefix("checkpoint does not fit the model: ")}') from None
  count = convert.parameter_count(variables)
  metadata = {
      'model': name, 'model_overrides': {}, 'backbone': True, 'parameter_count': count,
      'source': {'file': str(pathlib.Path(args.src).absolute()), **source, **report,
                 'sha256': convert._sha256(args.src)},  # pylint: disable=protected-access
      'converted_by': 'python -m rmt_jax.convert torch2flax --backbone'}
  # No 'eval_preprocessing': detection and segmentation resize whole images, without the
  # classifier's centre crop, so there is no crop recipe to store.
  checkpoint.save_variables(dst, variables, metadata)
  used = len(state_dict) - sum(report['not_converted'].values())
  return (f'{name} backbone: {count:,} parameters, {used} tensors from {entry} of {args.src} '
          f'{describe_report(report)}\nwrote {dst}')


def flax2torch(args: argparse.Namespace) -> str:
  """`flax2torch --backbone`: a backbone variables directory -> mmdet-style .pth."""
  name = canonical_name(args.model)
  dst = pathlib.Path(args.dst).absolute()
  if dst.exists():
    raise FileExistsError(f'{dst} exists; choose a new file or remove it first')
  print(f'flax2torch: reading {args.src} ...', flush=True)
  variables, metadata = read_variables(args.src)
  if not metadata.get('backbone'):
    raise convert.ConversionError(f'{args.src} holds classifier variables (per its metadata), '
                                  'not a backbone: drop --backbone')
  if canonical_name(metadata['model']) != name:
    raise convert.ConversionError(f"{args.src} holds {metadata['model']} backbone variables "
                                  f'(per its metadata), not {name}')
  backbone = create_backbone(name, **metadata.get('model_overrides', {}))
  try:
    state_dict = convert.flax_to_torch(variables, backbone)
  except convert.ConversionError as e:
    raise convert.ConversionError(f'{args.src} does not fit the {name} backbone: {e}') from None
  write_mmdet_checkpoint(str(dst), state_dict)
  return (f'{name} backbone: {convert.parameter_count(variables):,} parameters, '
          f"{len(state_dict)} tensors as entry 'state_dict', prefix 'backbone.'\nwrote {dst}")


def read_variables(src: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """`checkpoint.load_variables`, with unreadable directories as one-line errors."""
  try:
    return checkpoint.load_variables(src)
  except checkpoint.CheckpointNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    first_line = (str(e).strip().splitlines() or [''])[0][:200]
    raise convert.CheckpointFileError(f'cannot read the variables in {src} (truncated or '
                                      f'corrupt?): {type(e).__name__}: {first_line}') from None
