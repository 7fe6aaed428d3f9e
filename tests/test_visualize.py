"""Seeing the attention: captured weights (rmt_jax.models.attention_maps) and the drawing
command (rmt_jax.visualize).

The weights are checked against what the block computes with them (its output rebuilt from the
captured weights, v, LePE and out_proj), not only for being distributions; capture must change no
logits and, off, leave the compiled program untouched.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmt_jax
from rmt_jax.models import attention_maps, decay, layers

pytest.importorskip('matplotlib', reason='rmt_jax.visualize draws with matplotlib')
pytest.importorskip('tensorflow', reason='rmt_jax.visualize decodes images with TensorFlow')
from matplotlib import figure, image as mpimg  # pylint: disable=g-import-not-at-top
from rmt_jax import visualize  # pylint: disable=g-import-not-at-top
from rmt_jax.data import eval_preprocessing  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """configs/tiny_test.py trained for 2 steps by main.py, and one of its digit images."""
  root = tmp_path_factory.mktemp('visualize')
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS='--xla_backend_optimization_level=0')  # ~3x faster XLA:CPU compiles
  proc = subprocess.run(
      [sys.executable, str(REPO / 'main.py'), '--config', str(REPO / 'configs/tiny_test.py'),
       '--workdir', str(root / 'run'), f'--config.data.digits_dir={root / "digits"}',
       '--config.total_steps=2'], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(root / 'run'), str(sorted((root / 'digits' / 'val').glob('*/*.png'))[0])


@pytest.fixture(scope='module')
def tiny(trained_workdir):
  """The trained model, two images and what `capture` returns for them."""
  model, variables, _ = visualize.load_model(trained_workdir[0])
  # Not square, so that a swapped height and width cannot pass: stage maps 8x6 and 4x3.
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 24, 3))
  return model, variables, images, attention_maps.capture(model, variables, images)


def _every_query(block, height, width):
  """query_attention of every query: (b, heads, query y, query x, key y, key x)."""
  one = lambda y, x: attention_maps.query_attention(block, y, x, height, width)
  return jax.vmap(jax.vmap(one, (None, 0), 2), (0, None), 2)(jnp.arange(height),
                                                              jnp.arange(width))


def test_captured_weights_are_distributions(tiny):
  model, _, _, (_, maps) = tiny
  assert model.axial == (True, False)
  shapes = attention_maps.map_shapes(32, 24, 2)
  assert shapes == [(8, 6), (4, 3)]
  assert sorted(maps) == [(0, 0), (1, 0)]
  assert maps[0, 0]['row_weights'].shape == (2, 8, 2, 6, 6)
  assert maps[0, 0]['column_weights'].shape == (2, 6, 2, 8, 8)
  assert maps[1, 0]['weights'].shape == (2, 2, 12, 12)
  for (stage, _), block in maps.items():
    for weights in block.values():
      assert float(weights.min()) >= 0.0
      np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    height, width = shapes[stage]
    every = _every_query(block, height, width)
    assert every.shape == (2, 2, height, width, height, width)
    assert float(every.min()) >= 0.0
    np.testing.assert_allclose(every.sum((4, 5)), 1.0, atol=1e-6)


@pytest.mark.parametrize('axial', [True, False])
def test_captured_weights_rebuild_the_blocks_output(axial):
  batch, height, width, dim, heads = 2, 5, 4, 8, 2
  masa = layers.ManhattanSelfAttention(heads, 2.0, 4.0, axial, capture_attention=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, height, width, dim))
  variables = jax.jit(masa.init)(jax.random.PRNGKey(1), x)
  out, state = jax.jit(lambda v, x: masa.apply(v, x, mutable=['intermediates']))(variables, x)
  block = {k: v[0] for k, v in state['intermediates'].items()}
  p = variables['params']

  v = x @ p['v_proj']['kernel'] + p['v_proj']['bias']
  lepe = layers.DepthwiseConv(5).apply({'params': p['lepe']}, v)
  v = v.reshape(batch, height, width, heads, dim // heads)
  # Every query's 2-d attention over every key, then applied to v: for an axial block this is
  # the effective attention of the column pass after the row pass.
  every = _every_query(block, height, width)
  attended = jnp.einsum('bnyxYX,bYXnd->byxnd', every, v).reshape(x.shape)
  want = (attended + lepe) @ p['out_proj']['kernel'] + p['out_proj']['bias']
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_capture_changes_no_logits(tiny):
  model, variables, images, (logits, _) = tiny
  np.testing.assert_array_equal(logits, jax.jit(model.apply)(variables, images))


def test_capture_off_compiles_the_same_program(tiny, monkeypatch):
  model, variables, images, _ = tiny

  def lowered(m):
    apply = lambda v, x: m.apply(v, x, mutable=['intermediates'])
    return jax.jit(apply).lower(variables, images).as_text()

  with_capture = lowered(model.clone(capture_attention=True))

  def never(*args, **kwargs):
    raise AssertionError('attention_maps traced with capture_attention=False')

  monkeypatch.setattr(attention_maps, 'sow', never)
  monkeypatch.setattr(attention_maps, 'block_weights', never)
  default = lowered(model)
  assert default == lowered(model.clone(capture_attention=False))
  assert default != with_capture  # the comparison can see a difference
  _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=['intermediates']),
                            variables, images)
  assert not state.get('intermediates')


def test_prior_is_gamma_to_the_manhattan_distance():
  rates = (4, 2.0, 6.0)
  height, width, y, x = 7, 5, 2, 4
  prior = attention_maps.decay_prior(height, width, y, x, rates)
  rows, cols = np.mgrid[:height, :width]
  distance = np.abs(rows - y) + np.abs(cols - x)
  want = np.exp(decay.log_gamma(*rates)[:, None, None] * distance[None])
  np.testing.assert_allclose(prior, want, rtol=1e-6)
  # The same row of the decay the attention adds to its logits.
  bias = decay.manhattan_decay(height, width, *rates)[:, y * width + x]
  np.testing.assert_allclose(prior, np.exp(bias).reshape(4, height, width), rtol=1e-6)


def _drawn(fig, label):
  """The last image drawn on the axes labelled `label` (the overlay, above the photo)."""
  (ax,) = [a for a in fig.axes if a.get_label() == label]
  return np.asarray(ax.images[-1].get_array())


def test_decay_only_command_draws_each_stages_priors(tmp_path, monkeypatch):
  figures = []
  save = figure.Figure.savefig
  monkeypatch.setattr(figure.Figure, 'savefig',
                      lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])
  out = tmp_path / 'priors.png'
  assert visualize.main(['--decay_only', '--model', 'rmt_tiny', '--image_size', '64',
                         '--query', '10,50', '--out', str(out)]) == 0
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  (fig,) = figures
  model = rmt_jax.create_model('rmt_tiny')
  labels = {f'prior/{s}/{h}' for s, n in enumerate(model.num_heads) for h in range(n)}
  assert {ax.get_label() for ax in fig.axes} == labels
  for s, (height, width) in enumerate(attention_maps.map_shapes(64, 64, 4)):
    y, x = 50 * height // 64, 10 * width // 64
    rows, cols = np.mgrid[:height, :width]
    gammas = decay.log_gamma(model.num_heads[s], model.init_values[s], model.heads_ranges[s])
    for h, log_gamma in enumerate(gammas):
      want = np.exp(log_gamma * (np.abs(rows - y) + np.abs(cols - x)).astype(np.float32))
      np.testing.assert_allclose(_drawn(fig, f'prior/{s}/{h}'), want, rtol=1e-6)


def test_command_draws_the_image_and_each_heads_prior_and_attention(trained_workdir, tmp_path,
                                                                    monkeypatch):
  workdir, digit = trained_workdir
  figures = []
  save = figure.Figure.savefig
  monkeypatch.setattr(figure.Figure, 'savefig',
                      lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])
  out = tmp_path / 'attention.png'
  assert visualize.main(['--weights', workdir, digit, '--out', str(out), '--image_size', '32',
                         '--crop_pct', '1', '--stage', '1', '--query', '3,30']) == 0
  (fig,) = figures
  pixels = mpimg.imread(out)
  assert pixels.shape[:2] == tuple(int(v) for v in fig.canvas.get_width_height()[::-1])
  assert sorted(ax.get_label() for ax in fig.axes) == [
      'attention/0', 'attention/1', 'image', 'prior/0', 'prior/1']

  # What is drawn is the trained model's attention of the query token on that digit.
  model, variables, metadata = visualize.load_model(workdir)
  # The run's stored preprocessing (bilinear), the flags' size and crop.
  preprocessing, _ = eval_preprocessing.resolve(metadata, image_size=32, crop_pct=1.0)
  assert preprocessing.interpolation == 'bilinear'
  crop, inputs = visualize.load_image(digit, preprocessing)
  _, maps = attention_maps.capture(model, variables, inputs[None])
  token = (30 * 4 // 32, 3 * 4 // 32)  # stage 1 of a 32x32 image is a 4x4 map
  want = attention_maps.query_attention(maps[1, 0], *token, 4, 4)[0]
  for h in range(2):
    np.testing.assert_allclose(_drawn(fig, f'attention/{h}'), want[h], rtol=1e-6)
    np.testing.assert_allclose(
        _drawn(fig, f'prior/{h}'),
        attention_maps.decay_prior(4, 4, *token, (2, 2.0, 4.0))[h], rtol=1e-6)
  np.testing.assert_array_equal(_drawn(fig, 'image'), crop)


@pytest.mark.parametrize('args,message', [
    (['--stage', '2'], 'the model has stages 0..1'),
    (['--block', '1'], 'stage 0 has blocks 0..0'),
    (['--query', '40,3'], 'outside the 32x32 image'),
    (['--query', 'centre'], '--query takes X,Y'),
    (['--missing-image'], 'no such image file'),
])
def test_bad_input_is_one_clear_message(trained_workdir, tmp_path, capsys, args, message):
  workdir, digit = trained_workdir
  if args == ['--missing-image']:
    args, digit = [], str(tmp_path / 'nope.png')
  assert visualize.main(['--weights', workdir, digit, '--out', str(tmp_path / 'a.png'),
                         '--image_size', '32', *args]) == 1
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err


@pytest.mark.parametrize('args,message', [
    (['--decay_only', '--model', 'rmt_tiny'], 'Flag --out must have a value'),
    (['--out', 'a.png', 'a.png', 'b.png'], 'expected [<image>]; got a.png b.png'),
    (['--out', 'a.png', '--decay-only'], "Unknown command line flag 'decay-only'"),
])
def test_usage_errors_exit_2_with_one_line(capsys, args, message):
  with pytest.raises(SystemExit) as exit_:
    visualize.main(args)
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.startswith('error: ') and message in err
  assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('kernels', ['auto', 'xla', 'cpu'])
def test_the_kernels_flag_reaches_the_model(tmp_path, kernels):
  from rmt_jax.weights import checkpoint  # pylint: disable=g-import-not-at-top
  model = rmt_jax.create_model('rmt_tiny', num_classes=3)
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.ones((1, 32, 32, 3)))
  variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), variables)
  checkpoint.save_variables(tmp_path / 'w', variables,
                            {'model': 'rmt_tiny', 'model_overrides': {'num_classes': 3}})
  assert visualize.load_model(str(tmp_path / 'w'), kernels)[0].kernels == kernels
