"""The detection / segmentation backbone against the official one, its training modes, and the
conversion of mmdetection, backbone and classification checkpoints."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmt_jax
from conftest import official_case, official_det_case, official_manifest, relative_error
from rmt_jax import convert
from rmt_jax.models import backbone_from_official_kwargs, create_backbone, create_model
from rmt_jax.weights import checkpoint
from rmt_jax.weights import pytorch
from rmt_jax.weights import pytorch_backbone

NEEDS_TORCH = 'reading and writing .pth files needs torch (pip install -r requirements-test.txt)'


@functools.lru_cache(maxsize=None)
def _converted():
  ref = official_det_case()
  backbone = backbone_from_official_kwargs(**ref['kwargs'])
  return ref, backbone, pytorch.torch_to_flax(ref['state_dict'], backbone)


@functools.partial(jax.jit, static_argnames=('backbone', 'train'))
def _apply(backbone, variables, images, train=False, seed=0):
  """One jitted forward pass per (backbone, train), shared by the tests."""
  return backbone.apply(variables, images, train=train,
                        rngs={'dropout': jax.random.PRNGKey(seed)})


def _model_variables(variables):
  return {k: variables[k] for k in ('params', 'batch_stats')}


def test_every_map_matches_the_official_backbone():
  ref, backbone, variables = _converted()
  outs = _apply(backbone, _model_variables(variables), ref['images'])
  assert len(outs) == len(ref['outputs']) == len(backbone.feature_info)
  for out, want, info in zip(outs, ref['outputs'], backbone.feature_info):
    assert out.shape == want.shape and out.dtype == jnp.float32
    assert out.shape[-1] == info.channels
    assert ref['images'].shape[1] // out.shape[1] == info.stride
    assert relative_error(out, want) < 1e-5, info


def test_out_indices_select_maps_and_keep_every_official_key():
  ref, _, variables = _converted()
  backbone = backbone_from_official_kwargs(**{**ref['kwargs'], 'out_indices': (1, 3)})
  assert [(i.stage, i.channels, i.stride) for i in backbone.feature_info] == [(1, 32, 8),
                                                                              (3, 64, 32)]
  outs = _apply(backbone, _model_variables(variables), ref['images'])
  assert len(outs) == 2
  for out, want in zip(outs, (ref['outputs'][1], ref['outputs'][3])):
    assert relative_error(out, want) < 1e-5
  # The official class builds all four extra norms whatever out_indices says: so does init
  # (flax_to_torch checks the variables against the tree that `backbone.init` makes).
  fresh = pytorch.flax_to_torch(
      jax.tree.map(np.zeros_like, _model_variables(variables)), backbone)
  assert sorted(fresh) == sorted(ref['state_dict'])


def test_conversion_round_trip_is_bit_exact():
  ref, backbone, variables = _converted()
  back = pytorch.flax_to_torch(variables, backbone)
  assert sorted(back) == sorted(ref['state_dict'])
  for key, want in ref['state_dict'].items():
    assert back[key].dtype == want.dtype, key
    np.testing.assert_array_equal(back[key], want, err_msg=key)


def test_norm_eval_freezes_batch_norm_statistics_in_a_training_step():
  ref, backbone, variables = _converted()
  assert backbone.norm_eval  # the official default
  variables = _model_variables(variables)

  def loss(params):
    outs, updates = backbone.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                   ref['images'], train=True, mutable=['batch_stats'],
                                   rngs={'dropout': jax.random.PRNGKey(0)})
    # A loss of the first map only: its backward pass (stem and stage 0) compiles in a
    # fraction of the whole network's time, and reaches the stem's BatchNorms.
    return jnp.mean(jnp.square(outs[0])), updates['batch_stats']

  grads, batch_stats = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  params = jax.tree.map(lambda p, g: p - 0.1 * g, variables['params'], grads)
  jax.tree.map(np.testing.assert_array_equal, batch_stats, variables['batch_stats'])
  # Frozen statistics, trained affine parameters (PyTorch's BatchNorm in eval mode).
  assert float(jnp.abs(grads['patch_embed']['proj_1']['scale']).max()) > 0
  assert not np.array_equal(params['patch_embed']['proj_1']['scale'],
                            variables['params']['patch_embed']['proj_1']['scale'])
  # Without norm_eval, training mode updates every running statistic.
  unfrozen = backbone.clone(norm_eval=False)
  _, updates = jax.jit(functools.partial(unfrozen.apply, train=True, mutable=['batch_stats']))(
      variables, ref['images'])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), updates['batch_stats'],
                         variables['batch_stats'])
  assert all(jax.tree.leaves(changed))


def test_drop_path_is_random_in_training_only_and_reproducible_per_rng():
  ref, _, variables = _converted()
  variables = _model_variables(variables)

  def run(drop_path_rate, train, seed=0):
    backbone = backbone_from_official_kwargs(**{**ref['kwargs'],
                                                'drop_path_rate': drop_path_rate})
    return _apply(backbone, variables, ref['images'], train=train, seed=seed)

  evaluated = run(0.0, False)
  for a, b in zip(run(0.0, True), evaluated):  # norm_eval: training differs only by drop path
    np.testing.assert_array_equal(a, b)
  for a, b in zip(run(0.5, False), evaluated):
    np.testing.assert_array_equal(a, b)
  dropped, again, other = run(0.5, True, 0), run(0.5, True, 0), run(0.5, True, 1)
  for a, b in zip(dropped, again):
    np.testing.assert_array_equal(a, b)
  assert any(relative_error(a, b) > 1e-3 for a, b in zip(dropped, evaluated))
  assert any(relative_error(a, b) > 1e-3 for a, b in zip(dropped, other))


def test_variant_defaults_are_the_official_detection_configs():
  # detect/configs/RMT/maskrcnn_{t,s,m,l}_1x.py
  for name, axial, rate in (('rmt_t', (True, True, False, False), 0.1),
                            ('rmt_s', (True, True, True, False), 0.15),
                            ('rmt_b', (True, True, True, False), 0.4),
                            ('RMT_L6', (True, True, True, False), 0.5)):
    backbone = rmt_jax.create_backbone(name)
    assert (backbone.axial, backbone.drop_path_rate, backbone.out_indices) == (
        axial, rate, (0, 1, 2, 3)), name
    assert backbone.norm_eval
  assert create_backbone('rmt_s', out_indices=(2, 3), norm_eval=False).feature_info[0].stride == 16
  with pytest.raises(ValueError, match="'num_classes' is not an argument"):
    backbone_from_official_kwargs(num_classes=10)
  with pytest.raises(ValueError, match='out_indices'):
    create_backbone('rmt_tiny', out_indices=(4,)).init(jax.random.PRNGKey(0),
                                                       jnp.zeros((1, 32, 32, 3)))


def test_rmt_b_backbone_keys_are_the_classifiers_without_head_plus_extra_norms():
  manifest = {key: tuple(shape) for key, shape, _ in official_manifest()['rmt_b']['state_dict']}
  want = {k: v for k, v in manifest.items() if k.split('.')[0] not in ('proj', 'norm', 'head')}
  want.update({f'extra_norms.{i}.{p}': (d,) for i, d in enumerate((80, 160, 320, 512))
               for p in ('weight', 'bias')})
  backbone = create_backbone('rmt_b')
  zeros = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape),
                       pytorch.abstract_variables(backbone))
  assert {k: v.shape for k, v in pytorch.flax_to_torch(zeros, backbone).items()} == want


def test_classification_weights_start_a_backbone_with_fresh_extra_norms():
  ref = official_case('b')  # the classifier with rmt_tiny's shapes
  backbone = create_backbone('rmt_tiny')
  weights, report = pytorch_backbone.backbone_state_dict(ref['state_dict'], backbone)
  assert report['layout'] == 'classifier'
  assert report['not_converted'] == {'head': 2, 'norm': 5, 'proj': 2}
  assert len(report['initialised']) == 8
  variables = pytorch.torch_to_flax(weights, backbone)
  outs = _apply(backbone, _model_variables(variables), ref['images'])
  # Extra norms at their init (weight 1, bias 0): each map is the classifier's stage output,
  # layer-normed with eps 1e-5.
  for i, out in enumerate(outs):
    feature = ref['features'][f'stage{i}'].astype(np.float64)
    mean = feature.mean(-1, keepdims=True)
    want = (feature - mean) / np.sqrt(feature.var(-1, keepdims=True) + 1e-5)
    assert relative_error(out, want) < 1e-5, i


@functools.lru_cache(maxsize=None)
def _tiny_backbone_state_dict() -> dict:
  """A backbone state_dict with rmt_tiny's shapes (the detection fixture has no layer scale):
  the classifier fixture 'b' without its head, with random extra norms."""
  rng = np.random.default_rng(0)
  state_dict = {k: v for k, v in official_case('b')['state_dict'].items()
                if k.split('.')[0] not in ('proj', 'norm', 'head')}
  for i, dim in enumerate((16, 32, 48, 64)):
    state_dict[f'extra_norms.{i}.weight'] = rng.normal(1, 0.1, dim).astype(np.float32)
    state_dict[f'extra_norms.{i}.bias'] = rng.normal(0, 0.1, dim).astype(np.float32)
  return state_dict


def _mmdet_checkpoint(torch, path, state_dict):
  """What mmdetection saves: meta, state_dict with backbone./neck./*_head. keys, optimizer."""
  tensors = {f'backbone.{k}': torch.from_numpy(v.copy()) for k, v in state_dict.items()}
  tensors.update({'neck.lateral_convs.0.conv.weight': torch.zeros(8, 16, 1, 1),
                  'neck.lateral_convs.0.conv.bias': torch.zeros(8),
                  'rpn_head.rpn_conv.weight': torch.zeros(8, 8, 3, 3),
                  'roi_head.bbox_head.fc_cls.weight': torch.zeros(81, 16)})
  torch.save({'meta': {'mmdet_version': '2.28.2', 'CLASSES': ('person', 'bicycle'),
                       'epoch': 12, 'iter': 88000, 'config': "model = dict(type='MaskRCNN')"},
              'state_dict': tensors,
              'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4}]}}, path)


def test_command_line_converts_an_mmdet_checkpoint_both_ways(tmp_path, capsys):
  torch = pytest.importorskip('torch', reason=NEEDS_TORCH)
  state_dict = _tiny_backbone_state_dict()
  src = tmp_path / 'mask_rcnn.pth'
  _mmdet_checkpoint(torch, src, state_dict)
  assert convert.main(['torch2flax', '--backbone', '--model', 'rmt_tiny', '--src', str(src),
                       '--dst', str(tmp_path / 'vars')]) == 0
  out = capsys.readouterr().out
  assert "entry 'state_dict' of" in out and 'mmdetection / mmsegmentation checkpoint' in out
  assert 'not converted (not part of the backbone): neck.* (2), roi_head.* (1), rpn_head.* (1)' \
      in out
  variables, metadata = checkpoint.load_variables(tmp_path / 'vars')
  assert metadata['backbone'] and metadata['source']['layout'] == 'mmdet'
  np.testing.assert_array_equal(variables['params']['extra_norms_1']['bias'],
                                state_dict['extra_norms.1.bias'])
  # Back to mmdet's layout, which the official backbone loads strictly without the prefix.
  assert convert.main(['flax2torch', '--backbone', '--model', 'rmt_tiny',
                       '--src', str(tmp_path / 'vars'), '--dst', str(tmp_path / 'back.pth')]) == 0
  assert "as entry 'state_dict', prefix 'backbone.'" in capsys.readouterr().out
  saved = torch.load(tmp_path / 'back.pth', weights_only=True)
  assert list(saved) == ['state_dict']
  assert all(k.startswith('backbone.') for k in saved['state_dict'])
  back = {k.removeprefix('backbone.'): v.numpy() for k, v in saved['state_dict'].items()}
  assert sorted(back) == sorted(state_dict)
  for key, want in state_dict.items():
    assert back[key].dtype == want.dtype, key
    np.testing.assert_array_equal(back[key], want, err_msg=key)


def test_command_line_turns_a_classification_checkpoint_into_a_backbone(tmp_path, capsys):
  torch = pytest.importorskip('torch', reason=NEEDS_TORCH)
  src = tmp_path / 'rmt_tiny_cls.pth'
  torch.save({'model': {f'module.{k}': torch.from_numpy(v) for k, v in
                        official_case('b')['state_dict'].items()}, 'epoch': 299}, src)
  assert convert.main(['torch2flax', '--backbone', '--model', 'rmt_tiny', '--src', str(src),
                       '--dst', str(tmp_path / 'vars')]) == 0
  out = capsys.readouterr().out
  assert 'as classification checkpoint' in out
  assert 'not converted (the classification head): head.* (2), norm.* (5), proj.* (2)' in out
  assert ('initialised fresh (weight 1, bias 0): extra_norms.0, extra_norms.1, extra_norms.2, '
          'extra_norms.3') in out
  variables, _ = checkpoint.load_variables(tmp_path / 'vars')
  np.testing.assert_array_equal(variables['params']['extra_norms_2']['scale'], np.ones(48))


def test_bad_input_fails_with_one_message_and_writes_nothing(tmp_path, capsys):
  torch = pytest.importorskip('torch', reason=NEEDS_TORCH)
  mmdet = tmp_path / 'mask_rcnn.pth'
  _mmdet_checkpoint(torch, mmdet, _tiny_backbone_state_dict())
  data = mmdet.read_bytes()
  (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
  classifier = create_model('rmt_tiny', num_classes=10)
  checkpoint.save_variables(
      tmp_path / 'cls_vars', jax.tree.map(np.zeros_like, _model_variables(
          pytorch.torch_to_flax(official_case('b')['state_dict'], classifier))),
      {'model': 'rmt_tiny', 'model_overrides': {'num_classes': 10}})
  checkpoint.save_variables(
      tmp_path / 'det_vars',
      pytorch.torch_to_flax(_tiny_backbone_state_dict(), create_backbone('rmt_tiny')),
      {'model': 'rmt_tiny', 'model_overrides': {}, 'backbone': True})
  before = sorted(p.name for p in tmp_path.iterdir())
  cases = (
      (['torch2flax', '--backbone', '--model', 'rmt_t', '--src', mmdet],
       "read as mmdetection / mmsegmentation checkpoint (prefix 'backbone.'), does not fit the "
       'rmt_t backbone (its shapes are those of --model rmt_tiny)'),
      (['torch2flax', '--backbone', '--model', 'rmt_tiny', '--src', tmp_path / 'truncated.pth'],
       'is truncated or corrupt'),
      (['torch2flax', '--backbone', '--model', 'rmt_tiny', '--num_classes', '10', '--src', mmdet],
       'the backbone has none'),
      (['torch2flax', '--model', 'rmt_tiny', '--src', mmdet],
       'does not fit rmt_tiny (num_classes=0, token_label=False) (it holds a detection / '
       'segmentation backbone: pass --backbone)'),
      (['flax2torch', '--backbone', '--model', 'rmt_tiny', '--src', tmp_path / 'cls_vars'],
       'holds classifier variables (per its metadata), not a backbone: drop --backbone'),
      (['flax2torch', '--model', 'rmt_tiny', '--src', tmp_path / 'det_vars'],
       'holds backbone variables (per its metadata): pass --backbone'),
      (['flax2torch', '--backbone', '--model', 'rmt_s', '--src', tmp_path / 'det_vars'],
       'holds rmt_tiny backbone variables'),
  )
  for args, says in cases:
    assert convert.main([str(a) for a in args] + ['--dst', str(tmp_path / 'out')]) == 1, args
    err = capsys.readouterr().err
    assert err.startswith('error: ') and says in err and err.count('\n') == 1, err
  assert sorted(p.name for p in tmp_path.iterdir()) == before
