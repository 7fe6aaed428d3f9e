"""Converts RMT weights between official PyTorch `.pth` files and rmt_jax variables directories.

    python -m rmt_jax.convert torch2flax --model=rmt_s --src=RMT-S.pth --dst=weights/rmt_s [--ema]
    python -m rmt_jax.convert flax2torch --model=rmt_s --src=weights/rmt_s --dst=rmt_s.pth

With `--backbone`, both convert the detection / segmentation backbone instead
(`rmt_jax.models.RMTBackbone`): torch2flax reads an mmdetection / mmsegmentation checkpoint
(`backbone.*`), a backbone state_dict or a classification checkpoint (its head dropped, the
extra norms fresh); flax2torch writes `{'state_dict': {'backbone.' + key: ...}}`.

`torch2flax` reads a bare state_dict or a training checkpoint (`model` / `state_dict`, or with
`--ema` `model_ema` / `state_dict_ema`; a DDP `module.` prefix is removed; optimizer, args, epoch
... are ignored) with `torch.load(weights_only=True)`, unpickling fully only with
`--allow_pickle`. `num_classes` and `token_label` are read off the file (rows of `head.weight`,
presence of `aux_head.*`) unless `--num_classes` / `--[no]token_label` say otherwise; the
variant is never guessed: `--model` is checked strictly against every key and shape. It writes
a variables directory (`rmt_jax.weights.checkpoint.save_variables`: orbax + JSON description).
`--ema`, `--num_classes`, `--token_label` and `--allow_pickle` are torch2flax's only.
`flax2torch` reads such a directory (or what `checkpoint.load_variables` reads: a training
workdir) and writes `{'model': state_dict}` for the official code's `load_state_dict(...,
strict=True)`.

Both write atomically and fail with one line on stderr and exit status 1 (usage errors: status
2). `--src` and `--dst` may be local or on an object store (gs://...). A 1000-class model's
directory stores ImageNet's class names (`rmt_jax.data.class_names`), which `python -m
rmt_jax.predict` prints, and every classifier's the official evaluation preprocessing
(`rmt_jax.data.eval_preprocessing.OFFICIAL`), which it applies.

The mapping and the files are `rmt_jax.weights.pytorch` (and `pytorch_backbone` for the
backbone's files); this module is the command line over them. torch is imported only to read or
write `.pth` files.
"""

import hashlib
import os
import sys
from typing import Any, Mapping, Sequence

from absl import flags
from etils import epath
import jax
import numpy as np

from rmt_jax.data import class_names
from rmt_jax.data import eval_preprocessing
from rmt_jax.models import canonical_name, create_backbone, create_model
from rmt_jax.runtime import command_line
from rmt_jax.weights import checkpoint
from rmt_jax.weights import loading
from rmt_jax.weights import pytorch
from rmt_jax.weights import pytorch_backbone

PROGRAM = 'python -m rmt_jax.convert'
COMMANDS = ('torch2flax', 'flax2torch')
# Flags that describe the .pth file being read, or the classifier built from it.
_TORCH2FLAX_ONLY = ('ema', 'num_classes', 'token_label', 'allow_pickle')


def _define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the command's flags on `flag_values` (a fresh one per `main` call)."""
  flags.DEFINE_string('model', None, 'variant: rmt_t, rmt_s, rmt_b, rmt_l, rmt_tiny or an '
                      'official name (RMT_T3, RMT_S, RMT_M2, RMT_L6)', flag_values=flag_values,
                      required=True)
  flags.DEFINE_string('src', None, 'torch2flax: a .pth file; flax2torch: a variables directory '
                      'or a training workdir; local or gs://...', flag_values=flag_values,
                      required=True)
  flags.DEFINE_string('dst', None, 'must not exist; local or gs://...', flag_values=flag_values,
                      required=True)
  flags.DEFINE_boolean('backbone', False,
                       'the detection / segmentation backbone (rmt_jax.models.RMTBackbone): '
                       'torch2flax reads mmdet/mmseg checkpoints (backbone.*), backbone and '
                       "classification state_dicts; flax2torch writes {'state_dict': "
                       "{'backbone.' + key: ...}}", flag_values=flag_values)
  flags.DEFINE_boolean('ema', False, "torch2flax: take 'model_ema' / 'state_dict_ema' of a "
                       'training checkpoint', flag_values=flag_values)
  flags.DEFINE_integer('num_classes', None, "torch2flax: default: the rows of the file's "
                       'head.weight (0 if it has no head)', lower_bound=0,
                       flag_values=flag_values)
  flags.DEFINE_boolean('token_label', None, 'torch2flax: token-labeling aux_head; default: '
                       'whether the file has aux_head.*', flag_values=flag_values)
  flags.DEFINE_boolean('allow_pickle', False,
                       'torch2flax: unpickle the file fully if torch.load(weights_only=True) '
                       'refuses it (runs code from the file: trusted files only)',
                       flag_values=flag_values)


def _describe(name: str, overrides: Mapping[str, Any], backbone: bool) -> str:
  """'rmt_s (num_classes=1000, token_label=False)' or 'rmt_s backbone', for messages."""
  if backbone:
    return f'{name} backbone'
  return f"{name} ({', '.join(f'{k}={v}' for k, v in sorted(overrides.items()))})"


def _the(what: str, backbone: bool) -> str:
  """'the rmt_s backbone', as messages name it after 'does not fit'; a classifier as it is."""
  return f'the {what}' if backbone else what


def _new_path(path: str, kind: str) -> epath.Path:
  """`path` resolved (local or gs://...), refused if it exists: nothing is ever overwritten."""
  resolved = checkpoint.resolve_path(path)
  if resolved.exists():
    raise FileExistsError(f'{resolved} exists; choose a new {kind} or remove it first')
  return resolved


def _torch2flax(options: flags.FlagValues) -> str:
  """`torch2flax`: a .pth file -> a variables directory; returns the summary to print."""
  name = canonical_name(options.model)
  if options.backbone and (options.num_classes is not None or options.token_label is not None):
    raise ValueError('--num_classes and --token_label describe a classification head; the '
                     'backbone has none (drop them, or drop --backbone)')
  dst = _new_path(options.dst, 'directory')
  print(f'torch2flax: reading {options.src} ...', flush=True)
  state_dict, source = pytorch.read_torch_checkpoint(options.src, options.ema,
                                                     options.allow_pickle)
  entry = pytorch.describe_source(source)
  if options.backbone:
    overrides: dict[str, Any] = {}
    model = create_backbone(name)
    weights, report = pytorch_backbone.backbone_state_dict(state_dict, model)
    read_as = f', read {pytorch_backbone.describe_report(report).splitlines()[0]},'
  else:
    overrides = pytorch.infer_overrides(state_dict)
    if options.num_classes is not None:
      overrides['num_classes'] = options.num_classes
    if options.token_label is not None:
      overrides['token_label'] = options.token_label
    model = create_model(name, **overrides)
    weights, report, read_as = state_dict, None, ''
  what = _describe(name, overrides, options.backbone)
  print(f'torch2flax: {len(state_dict)} tensors of {entry} -> {what}, writing {dst} ...',
        flush=True)
  try:
    variables = pytorch.torch_to_flax(weights, model)
  except pytorch.ConversionError as e:
    guesses = [g for g in pytorch.guess_variants(weights) if g != name]
    hint = f' (its shapes are those of --model {" or ".join(guesses)})' if guesses else ''
    if not options.backbone and any(k.startswith(('backbone.', 'extra_norms.'))
                                    for k in weights):
      hint = ' (it holds a detection / segmentation backbone: pass --backbone)'
    raise pytorch.ConversionError(
        f'{entry} of {options.src}{read_as} does not fit {_the(what, options.backbone)}{hint}: '
        f'{str(e).removeprefix("checkpoint does not fit the model: ")}') from None
  count = _parameter_count(variables)
  metadata = {
      'model': name, 'model_overrides': overrides, 'parameter_count': count,
      'source': {'file': str(checkpoint.resolve_path(options.src)), **source, **(report or {}),
                 'sha256': _sha256(options.src)},
      'converted_by': f'{PROGRAM} torch2flax' + (' --backbone' if options.backbone else '')}
  if options.backbone:
    # No 'eval_preprocessing': detection and segmentation resize whole images, without the
    # classifier's centre crop, so there is no crop recipe to store.
    metadata['backbone'] = True
  else:
    # The official evaluation (timm's 224 crop at 0.875, bicubic, ImageNet mean/std).
    metadata[eval_preprocessing.METADATA_KEY] = eval_preprocessing.OFFICIAL.to_metadata()
    if overrides['num_classes'] == class_names.IMAGENET_NUM_CLASSES:
      metadata['class_names'] = class_names.imagenet_class_names()
  checkpoint.save_variables(dst, variables, metadata)
  used = len(state_dict) - sum(report['not_converted'].values()) if report else len(state_dict)
  described = f' {pytorch_backbone.describe_report(report)}' if report else ''
  return (f'{what}: {count:,} parameters, {used} tensors from {entry} of {options.src}'
          f'{described}\nwrote {dst}')


def _flax2torch(options: flags.FlagValues) -> str:
  """`flax2torch`: a variables directory or training workdir -> a .pth file; returns the
  summary to print."""
  name = canonical_name(options.model)
  dst = _new_path(options.dst, 'file')
  print(f'flax2torch: reading {options.src} ...', flush=True)
  try:  # a converted variables directory, or a training workdir (its latest checkpoint)
    variables, metadata = checkpoint.load_variables(options.src)
  except checkpoint.CheckpointNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    first_line = (str(e).strip().splitlines() or [''])[0][:200]
    raise pytorch.CheckpointFileError(f'cannot read the variables in {options.src} (truncated '
                                      f'or corrupt?): {type(e).__name__}: {first_line}') from None
  if metadata.get('backbone') and not options.backbone:
    raise pytorch.ConversionError(f'{options.src} holds backbone variables (per its metadata): '
                                  'pass --backbone')
  if options.backbone and not metadata.get('backbone'):
    raise pytorch.ConversionError(f'{options.src} holds classifier variables (per its '
                                  'metadata), not a backbone: drop --backbone')
  if canonical_name(metadata['model']) != name:
    raise pytorch.ConversionError(
        f"{options.src} holds {metadata['model']}{' backbone' if options.backbone else ''} "
        f'variables (per its metadata), not {name}')
  overrides = dict(metadata.get('model_overrides', {}))
  what = _describe(name, overrides, options.backbone)
  try:
    model = loading.model_from_metadata(metadata)
  except ValueError as e:
    raise pytorch.ConversionError(f'{options.src}: {e}') from None
  try:
    state_dict = pytorch.flax_to_torch(variables, model)
  except pytorch.ConversionError as e:
    raise pytorch.ConversionError(
        f'{options.src} does not fit {_the(what, options.backbone)}: {e}') from None
  if options.backbone:
    pytorch_backbone.write_mmdet_checkpoint(dst, state_dict)
    layout = "entry 'state_dict', prefix 'backbone.'"
  else:
    pytorch.write_torch_checkpoint(dst, state_dict)
    layout = "entry 'model'"
  origin = (f" from step {metadata['step']} ({metadata.get('weights', 'raw')} weights)"
            if 'step' in metadata else '')
  return (f'{what}: {_parameter_count(variables):,} parameters{origin}, {len(state_dict)} '
          f'tensors as {layout}\nwrote {dst}')


def _parameter_count(variables: Mapping[str, Any]) -> int:
  """Trainable parameters (the `params` collection), for the summary and the metadata."""
  return int(sum(np.size(x) for x in jax.tree.leaves(variables['params'])))


def _sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with checkpoint.resolve_path(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status (errors: one line on stderr, status 1;
  usage errors: status 2).

  Args:
    argv: the arguments after the program name: the command (torch2flax or flax2torch) and its
      flags; None takes `sys.argv[1:]`.
  """
  options = flags.FlagValues()
  _define_flags(options)
  command, = command_line.parse(options, argv, program=PROGRAM, doc=__doc__,
                                positional=('command',))
  misplaced = [f'--{name}' for name in _TORCH2FLAX_ONLY if options[name].present]
  usage = None
  if command not in COMMANDS:
    usage = f"unknown command {command!r}; expected {' or '.join(COMMANDS)}"
  elif command == 'flax2torch' and misplaced:
    usage = f"{', '.join(misplaced)} only apply to torch2flax"
  if usage:
    command_line.usage_error(PROGRAM, usage)
  try:
    summary = _torch2flax(options) if command == 'torch2flax' else _flax2torch(options)
  except (ValueError, OSError, checkpoint.CheckpointNotFoundError) as e:
    # ConversionError, CheckpointFileError, unknown variants, existing or unreadable paths.
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(summary)
  return 0


if __name__ == '__main__':
  sys.exit(main())
