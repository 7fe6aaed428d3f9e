"""The Flax RMT against the official PyTorch outputs, and the model's own contracts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmt_jax
from conftest import CASES, official_case, official_manifest, relative_error
from rmt_jax.analysis.counting import count_macs, count_params
from rmt_jax.models import RMT, Stage, from_official_kwargs, layers
from rmt_jax.weights import pytorch

VARIANTS = ('rmt_t', 'rmt_s', 'rmt_b', 'rmt_l')


@functools.lru_cache(maxsize=None)
def _converted(case: str, kernels: str = 'auto', dtype=jnp.float32):
  ref = official_case(case)
  model = from_official_kwargs(**ref['kwargs'], kernels=kernels, dtype=dtype)
  return ref, model, pytorch.torch_to_flax(ref['state_dict'], model)


@pytest.mark.parametrize('kernels', ['xla', 'cpu', 'tpu', 'auto'])
@pytest.mark.parametrize('case', CASES)
def test_logits_and_features_match_official(case, kernels):
  ref, model, variables = _converted(case, kernels)
  logits = jax.jit(model.apply)(variables, ref['images'])
  assert logits.shape == ref['logits'].shape
  assert relative_error(logits, ref['logits']) < 1e-5
  features = jax.jit(functools.partial(model.apply, method=model.features))(variables,
                                                                            ref['images'])
  assert set(features) == set(ref['features'])
  for name, want in ref['features'].items():
    assert features[name].shape == want.shape, name
    assert relative_error(features[name], want) < 1e-5, name


def test_token_label_output_is_head_plus_half_max_of_aux_head():
  ref, model, variables = _converted('tokenlabel')
  cls, aux = jax.jit(functools.partial(model.apply, method=model.token_logits))(
      variables, ref['images'])
  assert aux.shape == (2, 2 * 3, 10)  # 64x96 input -> 2x3 tokens in the last stage
  np.testing.assert_allclose(cls + 0.5 * aux.max(axis=1), ref['logits'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('case', ['a', 'b'])
def test_bfloat16_agrees_with_float32(case):
  ref, model, variables = _converted(case)
  bf16 = model.clone(dtype=jnp.bfloat16)
  logits = np.asarray(jax.jit(bf16.apply)(variables, ref['images']))
  assert logits.dtype == np.float32
  np.testing.assert_array_equal(logits.argmax(-1), ref['logits'].argmax(-1))
  assert relative_error(logits, ref['logits']) < 2e-2


def test_bfloat16_residual_stream_is_an_option_of_the_same_weights():
  ref, model, variables = _converted('a')
  features = functools.partial(model.apply, method=model.features)
  assert {f.dtype for f in jax.jit(features)(variables, ref['images']).values()} == {
      jnp.dtype('float32')}  # the official mixed-precision recipe's stream, by default
  bf16 = model.clone(dtype=jnp.bfloat16, residual_dtype=jnp.bfloat16)
  maps = jax.jit(functools.partial(bf16.apply, method=bf16.features))(variables, ref['images'])
  assert {f.dtype for f in maps.values()} == {jnp.dtype('bfloat16')}
  logits = np.asarray(jax.jit(bf16.apply)(variables, ref['images']))
  assert logits.dtype == np.float32
  np.testing.assert_array_equal(logits.argmax(-1), ref['logits'].argmax(-1))
  # Each residual add rounds to bfloat16; the logits stay within bfloat16's relative rounding
  # (2^-8) of the float32 model, as those of bfloat16 compute with a float32 stream do (both
  # about 1.3e-3 on this case).
  assert relative_error(logits, ref['logits']) < 2 ** -8


@pytest.mark.parametrize('name', VARIANTS)
def test_parameter_count_equals_official(name):
  assert count_params(rmt_jax.create_model(name)) == official_manifest()[name]['trainable_params']


@pytest.mark.parametrize('name', VARIANTS)
def test_macs_within_3_percent_of_fvcore(name):
  macs = count_macs(rmt_jax.create_model(name), 224)
  want = official_manifest()[name]['fvcore_macs_224']
  assert abs(macs / want - 1) < 0.03, (macs, want)


@pytest.mark.parametrize('alias,name', [('RMT_T3', 'rmt_t'), ('RMT_T', 'rmt_t'), ('RMT_S', 'rmt_s'),
                                        ('RMT_M2', 'rmt_b'), ('RMT_B', 'rmt_b'),
                                        ('RMT_L6', 'rmt_l'), ('RMT_L', 'rmt_l')])
def test_official_names_are_aliases(alias, name):
  assert rmt_jax.create_model(alias) == rmt_jax.create_model(name)


def test_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match='rmt_s'):
    rmt_jax.create_model('rmt_xl')


def test_official_kwargs_reject_unknown_arguments():
  with pytest.raises(ValueError, match='window_size'):
    from_official_kwargs(window_size=7)


def _tiny(**kw) -> RMT:
  return rmt_jax.create_model('rmt_tiny', num_classes=7, **kw)


@functools.lru_cache(maxsize=None)
def _tiny_variables():
  """One initialisation shared by the tests below (initialising compiles for ~10 s on CPU)."""
  return _tiny().init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))


def test_any_input_size_under_jit():
  model, variables = _tiny(), _tiny_variables()
  apply = jax.jit(model.apply)
  for shape in [(2, 64, 64, 3), (1, 96, 160, 3), (1, 72, 40, 3)]:
    out = apply(variables, jax.random.normal(jax.random.PRNGKey(1), shape))
    assert out.shape == (shape[0], 7) and bool(jnp.isfinite(out).all())


def test_train_mode_updates_batch_stats_and_drop_path_uses_dropout_rng():
  model = _tiny(drop_path_rate=0.5)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = _tiny_variables()

  @jax.jit
  def run(seed):
    return model.apply(variables, images, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.PRNGKey(seed)})

  (out_a, state), (out_b, _), (out_c, _) = run(0), run(0), run(1)
  np.testing.assert_array_equal(out_a, out_b)
  assert not np.allclose(out_a, out_c)  # different blocks dropped
  before = jax.tree.leaves(variables['batch_stats'])
  after = jax.tree.leaves(state['batch_stats'])
  assert all(not np.allclose(b, a) for b, a in zip(before, after))
  eval_a, eval_b = (jax.jit(model.apply)(variables, images) for _ in range(2))
  np.testing.assert_array_equal(eval_a, eval_b)  # eval: deterministic, no rng needed


def test_drop_path_rate_rises_linearly_over_blocks():
  model = rmt_jax.create_model('rmt_s')
  bound = model.bind({})
  bound.setup()
  rates = [r for stage in bound.layers for r in stage.drop_path]
  np.testing.assert_allclose(rates, np.linspace(0, 0.15, 29))


def test_remat_changes_memory_not_values():
  # One stage of two blocks: the remat wrapper is per stage, and a stage compiles quickly.
  stage_kw = dict(depth=2, num_heads=2, initial_value=2, heads_range=4, mlp_ratio=2, axial=True,
                  drop_path=(0.0, 0.2), layerscale=True, layer_init_values=0.5, out_dim=None)
  plain, remat = Stage(**stage_kw), Stage(**stage_kw, remat=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 8))
  variables = plain.init(jax.random.PRNGKey(1), x)

  def loss(stage, params):
    out, _ = stage.apply({'params': params}, x, True, rngs={'dropout': jax.random.PRNGKey(2)})
    return (out ** 2).mean()

  grads = [jax.jit(jax.grad(functools.partial(loss, m)))(variables['params'])
           for m in (plain, remat)]
  for want, got in zip(*map(jax.tree.leaves, grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_headless_model_returns_pooled_features():
  model = rmt_jax.create_model('rmt_tiny', num_classes=0)
  variables = dict(_tiny_variables())
  variables['params'] = {k: v for k, v in variables['params'].items() if k != 'head'}
  out = jax.jit(model.apply)(variables, jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, 96)


def test_depthwise_forms_agree():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 7, 6))
  conv = layers.DepthwiseConv(5, 'xla')
  variables = conv.init(jax.random.PRNGKey(1), x)
  shifted = jax.jit(layers.DepthwiseConv(5, 'cpu').apply)(variables, x)
  np.testing.assert_allclose(shifted, jax.jit(conv.apply)(variables, x), rtol=1e-5, atol=1e-6)


def test_param_dtype_and_compute_dtype_are_separate():
  model = _tiny(dtype=jnp.bfloat16)
  images = jnp.ones((1, 32, 32, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype('float32')}
  assert jax.jit(model.apply)(_tiny_variables(), images).dtype == jnp.float32
