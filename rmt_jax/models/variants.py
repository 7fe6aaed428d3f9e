"""The variant table (official hyper-parameters of RMT-T/S/B/L), `create_model`, and
`from_official_kwargs` for networks described by the official `VisRetNet` arguments; the same
for the detection / segmentation backbone (`create_backbone`, `backbone_from_official_kwargs`).
"""

from typing import Any, Sequence

from rmt_jax.models.backbone import RMTBackbone
from rmt_jax.models.rmt import RMT

# Official factories in qhfan/RMT classfication_release/RMT.py. The paper's RMT-B is the code's
# RMT_M2 and RMT-L its RMT_L6; RMT-T is RMT_T3.
VARIANTS: dict[str, dict[str, Any]] = {
    'rmt_t': dict(
        embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
        init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3),
        drop_path_rate=0.1, axial=(True, True, False, False),
        layerscales=(False, False, False, False), layer_init_values=1e-6),
    'rmt_s': dict(
        embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
        init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3),
        drop_path_rate=0.15, axial=(True, True, True, False),
        layerscales=(False, False, False, False), layer_init_values=1e-6),
    'rmt_b': dict(
        embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
        init_values=(2, 2, 2, 2), heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3),
        drop_path_rate=0.4, axial=(True, True, True, False),
        layerscales=(False, False, True, True), layer_init_values=1e-6),
    'rmt_l': dict(
        embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
        init_values=(2, 2, 2, 2), heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3),
        drop_path_rate=0.5, axial=(True, True, True, False),
        layerscales=(False, False, True, True), layer_init_values=1e-6),
    # A few thousand parameters, every kind of stage (axial, whole, layer scale) present: for
    # tests and the CPU demo. Same shapes as the official reference fixture 'b'.
    'rmt_tiny': dict(
        embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4),
        init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 2, 2),
        drop_path_rate=0.0, projection=96, axial=(True, True, True, False),
        layerscales=(False, False, True, True), layer_init_values=0.5),
}

# Names used by the official code (factories, and the training script's --model choices).
ALIASES = {
    'rmt_t3': 'rmt_t', 'rmt_m2': 'rmt_b', 'rmt_l6': 'rmt_l',
}

# The defaults of the official constructors (classification `VisRetNet`, detection /
# segmentation `RMT`) for the arguments they share.
_OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
    init_values=(1, 1, 1, 1), heads_ranges=(3, 3, 3, 3), mlp_ratios=(3, 3, 3, 3),
    drop_path_rate=0.1, axial=(True, True, False, False),
    layerscales=(False, False, False, False), layer_init_values=1e-6)

# Official `VisRetNet` argument -> RMT attribute, where the name differs.
_OFFICIAL_RENAMES = {'chunkwise_recurrents': 'axial', 'use_checkpoints': 'remat'}
# Official arguments that do not change the function (or that every official model uses).
_OFFICIAL_IGNORED = {'in_chans': 3, 'norm_layer': None, 'patch_norm': True}


def canonical_name(name: str) -> str:
  """'rmt_s', 'RMT_S', 'RMT_T3', 'RMT_M2', 'RMT_L6', 'RMT-B' ... -> the table key.

  Raises:
    ValueError: the name is not a known variant; the message lists the known ones.
  """
  key = name.strip().lower().replace('-', '_')
  key = ALIASES.get(key, key)
  if key not in VARIANTS:
    known = sorted(VARIANTS) + sorted(n.upper() for n in ALIASES)
    raise ValueError(f'unknown RMT variant {name!r}; known: {", ".join(known)}')
  return key


def variant_kwargs(name: str) -> dict[str, Any]:
  """The RMT attributes of a variant (a copy)."""
  return dict(VARIANTS[canonical_name(name)])


def create_model(name: str, **overrides: Any) -> RMT:
  """Builds a variant, e.g. `create_model('rmt_s', num_classes=100, dtype=jnp.bfloat16)`.

  Args:
    name: 'rmt_t', 'rmt_s', 'rmt_b', 'rmt_l', 'rmt_tiny', or an official name ('RMT_T3', 'RMT_S',
      'RMT_M2', 'RMT_L6', 'RMT_T', 'RMT_B', 'RMT_L').
    **overrides: any `RMT` attribute (num_classes, drop_path_rate, dtype, remat, token_label, ...).

  Returns:
    The flax module; initialise it with `model.init(rngs, images)`.
  """
  kwargs = variant_kwargs(name)
  kwargs.update(overrides)
  return RMT(**_as_tuples(kwargs))


def from_official_kwargs(**kw: Any) -> RMT:
  """The network that the official `VisRetNet(**kw)` builds (its argument names and defaults).

  Besides the constructor's own arguments, `token_label` (from the token-labeling release) is
  accepted. `dtype`, `param_dtype` and `kernels` may be passed too.

  Raises:
    ValueError: an argument that the official constructor does not have, or an ignored argument
      set to a value that would change the network (e.g. in_chans != 3 is fine for convs, but
      patch_norm=False is not supported).
  """
  # The official constructor's defaults, for arguments the caller leaves out.
  args: dict[str, Any] = dict(_OFFICIAL_DEFAULTS, num_classes=1000, projection=1024,
                              remat=(False, False, False, False), token_label=False)
  allowed = set(args) | set(_OFFICIAL_RENAMES) | {'dtype', 'param_dtype', 'kernels'}
  for key, value in kw.items():
    if key in _OFFICIAL_IGNORED:
      if key == 'patch_norm' and not value:
        raise ValueError('patch_norm=False is not supported (no official model uses it)')
      continue
    if key not in allowed or key in ('axial', 'remat'):
      raise ValueError(f'{key!r} is not an argument of the official VisRetNet')
    args[_OFFICIAL_RENAMES.get(key, key)] = value
  return RMT(**_as_tuples(args))


# The official detection and segmentation configs (detect/configs/RMT/*_{t,s,m,l}_*.py,
# segmentation/configs/RMT/*.py) use each variant's classification layout: axial attention in
# stages 1-2 for T and 1-3 for S/B/L, drop path 0.1 / 0.15 / 0.4 / 0.5. The table serves both;
# only the classification head's `projection` has no place in the backbone.
_CLASSIFIER_ONLY = ('projection',)


def create_backbone(name: str, out_indices: Sequence[int] = (0, 1, 2, 3),
                    **overrides: Any) -> RMTBackbone:
  """Builds a variant's detection / segmentation backbone, e.g. `create_backbone('rmt_s')`.

  Args:
    name: as for `create_model` ('rmt_t', 'rmt_s', 'rmt_b', 'rmt_l', 'rmt_tiny', 'RMT_S', ...).
    out_indices: the stages whose (normed) outputs are returned, strides 4, 8, 16, 32.
    **overrides: any `RMTBackbone` attribute (norm_eval, drop_path_rate, remat, dtype, ...).

  Returns:
    The flax module, with the official detection configs' layout and drop path by default.
  """
  kwargs = {k: v for k, v in variant_kwargs(name).items() if k not in _CLASSIFIER_ONLY}
  kwargs.update(out_indices=out_indices, **overrides)
  return RMTBackbone(**_as_tuples(kwargs))


def backbone_from_official_kwargs(**kw: Any) -> RMTBackbone:
  """The backbone that the official detection / segmentation `RMT(**kw)` builds.

  Takes that class's argument names and defaults (`out_indices`, `norm_eval`, `use_checkpoint`,
  `chunkwise_recurrents`, ...); `dtype`, `param_dtype` and `kernels` may be passed too.
  `norm_eval` keeps its plain meaning here (see `rmt_jax.models.backbone` on how the official
  code applies it).

  Raises:
    ValueError: an argument that the official class does not have, or patch_norm=False.
  """
  args: dict[str, Any] = dict(_OFFICIAL_DEFAULTS, out_indices=(0, 1, 2, 3), norm_eval=True)
  use_checkpoint = False
  allowed = set(args) | {'chunkwise_recurrents', 'use_checkpoint', 'dtype', 'param_dtype',
                         'kernels'}
  for key, value in kw.items():
    if key in ('in_chans', 'norm_layer', 'patch_norm', 'projection'):
      # `projection` is an argument of the official class that it never uses.
      if key == 'patch_norm' and not value:
        raise ValueError('patch_norm=False is not supported (no official model uses it)')
      continue
    if key not in allowed or key == 'axial':
      raise ValueError(f'{key!r} is not an argument of the official detection RMT')
    if key == 'use_checkpoint':
      use_checkpoint = bool(value)
    else:
      args[_OFFICIAL_RENAMES.get(key, key)] = value
  args['remat'] = (use_checkpoint,) * len(args['depths'])
  return RMTBackbone(**_as_tuples(args))


def _as_tuples(kwargs: dict[str, Any]) -> dict[str, Any]:
  """Lists -> tuples, so that the module's attributes are hashable (flax requires it)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
