"""The predict command: readable class names (ImageNet's, a folder's), agreement with the model
in fixed-size batches, the evaluation preprocessing stored with the weights (flags override it;
weights without it get the official one; a trained digits model is right with the default
flags), JSON output, a quiet console and clear errors."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmt_jax
from rmt_jax.weights import checkpoint
from rmt_jax.data import class_names
from rmt_jax.data import eval_preprocessing

tf = pytest.importorskip('tensorflow', reason='predict decodes images with TensorFlow')
from rmt_jax import predict  # pylint: disable=g-import-not-at-top
from rmt_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
from conftest import FOLDER_CLASSES, main_env  # pylint: disable=g-import-not-at-top,g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def weights_and_images(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict')
  model = rmt_jax.create_model('rmt_tiny')  # 1000 classes: ImageNet's names
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  # Class 0 (tench) wins on every image, by a margin no input can undo.
  head = variables['params']['head']
  variables = {**variables, 'params': {**variables['params'], 'head': {
      'kernel': head['kernel'] * 1e-3, 'bias': head['bias'].at[0].set(20.0)}}}
  # Stored: 32 px crops, the rest official (crop_pct 0.875, bicubic).
  stored = eval_preprocessing.EvalPreprocessing(image_size=32)
  checkpoint.save_variables(root / 'weights', variables, {
      'model': 'rmt_tiny', eval_preprocessing.METADATA_KEY: stored.to_metadata()})
  # Written before the preprocessing was stored: no 'eval_preprocessing'.
  checkpoint.save_variables(root / 'old_weights', variables, {'model': 'rmt_tiny'})
  rng = np.random.default_rng(0)
  images = []
  for name, shape, encode in [('a.jpg', (40, 52, 3), tf.io.encode_jpeg),
                              ('b.png', (33, 30, 3), tf.io.encode_png),
                              ('c.jpg', (64, 48, 3), tf.io.encode_jpeg)]:
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    (root / name).write_bytes(encode(pixels).numpy())
    images.append(str(root / name))
  return model, variables, str(root / 'weights'), images


def _run(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'rmt_jax.predict', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300, env=env)


def test_imagenet_model_prints_readable_names_without_model_flag(weights_and_images):
  _, _, weights, images = weights_and_images
  result = _run('--weights', weights, '--batch_size', '2', *images)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3 * 6
  for block in (lines[:6], lines[6:12], lines[12:]):
    assert block[0] in images
    ranked = [re.fullmatch(r'  (\d)\. (.+?) +(0\.\d{4}|1\.0000)', line) for line in block[1:]]
    assert all(ranked), block
    assert [int(m.group(1)) for m in ranked] == [1, 2, 3, 4, 5]
    assert ranked[0].group(2) == 'tench'
    assert all(m.group(2) in class_names.imagenet_class_names() for m in ranked)
    probs = [float(m.group(3)) for m in ranked]
    assert probs == sorted(probs, reverse=True)
  # The console holds the answer only: no TensorFlow or XLA start-up notices.
  for notice in ('oneDNN', "Unable to initialize backend 'tpu'", 'absl::InitializeLog'):
    assert notice not in result.stderr


def _inputs(images, **preprocessing):
  """`images` prepared by the input pipeline's evaluation with `preprocessing`'s fields (the
  others: the pipeline's defaults, the official ones)."""
  cfg = input_pipeline.default_config()
  cfg.update(preprocessing)
  return np.stack([
      input_pipeline.eval_preprocess({'image': tf.io.read_file(p), 'label': 0}, cfg)['image']
      for p in images])


def _softmax(model, variables, images, **preprocessing):
  """The model's probabilities on `_inputs(images, **preprocessing)`."""
  batch = _inputs(images, **preprocessing)
  return np.asarray(jax.nn.softmax(model.apply(variables, batch), axis=-1))


def _assert_rows_are(rows, want, images):
  names = class_names.imagenet_class_names()
  for row, p, path in zip(rows, want, images, strict=True):
    assert row['image'] == path
    got = np.zeros(1000)
    for entry in row['top']:
      assert entry['name'] == names[entry['label']]
      got[entry['label']] = entry['probability']
    np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-7)


def test_probabilities_are_the_models_softmax_in_padded_batches(weights_and_images, capsys):
  model, variables, weights, images = weights_and_images
  rows = predict.predict(weights, images, top=1000, batch_size=2)  # batches of 2 + 1 padded
  _assert_rows_are(rows, _softmax(model, variables, images, image_size=32), images)
  assert capsys.readouterr().err == ('preprocessing: 32 px centre crop at crop_pct 0.875, '
                                     'bicubic, ImageNet mean/std (stored with the weights)\n')


def test_flags_override_the_stored_preprocessing(weights_and_images, capsys):
  model, variables, weights, images = weights_and_images
  assert predict.main(['--weights', weights, '--json', '--top', '1000', '--crop_pct', '1',
                       '--interpolation', 'bilinear', *images]) == 0
  out, err = capsys.readouterr()
  want = _softmax(model, variables, images, image_size=32, crop_pct=1.0,
                  interpolation='bilinear')
  _assert_rows_are(json.loads(out), want, images)
  assert err == ('preprocessing: 32 px centre crop at crop_pct 1.0, bilinear, ImageNet mean/std '
                 '(crop_pct, interpolation from the flags; the rest stored with the weights)\n')
  # The flags did change the input (the model's class 0 wins whatever the input).
  assert not np.allclose(_inputs(images, image_size=32, crop_pct=1.0, interpolation='bilinear'),
                         _inputs(images, image_size=32), atol=1e-3)


def test_weights_without_stored_preprocessing_get_the_official_one(weights_and_images, capsys):
  model, variables, weights, images = weights_and_images
  old = os.path.join(os.path.dirname(weights), 'old_weights')
  assert 'eval_preprocessing' not in checkpoint.read_metadata(old)
  rows = predict.predict(old, images, top=1000, batch_size=4)
  _assert_rows_are(rows, _softmax(model, variables, images), images)  # 224, 0.875, bicubic
  assert capsys.readouterr().err == (
      'preprocessing: 224 px centre crop at crop_pct 0.875, bicubic, ImageNet mean/std '
      '(the default for weights that store none)\n')


def test_json_output(weights_and_images, capsys):
  _, _, weights, images = weights_and_images
  assert predict.main(['--weights', weights, '--json', '--top', '3', '--model', 'RMT_TINY',
                       *images[:2]]) == 0
  rows = json.loads(capsys.readouterr().out)
  assert [r['image'] for r in rows] == images[:2]
  for row in rows:
    assert [e['name'] for e in row['top']][0] == 'tench' and len(row['top']) == 3
    assert row['top'][0]['label'] == 0 and 0 < row['top'][0]['probability'] <= 1


@pytest.mark.slow  # A training run by main.py (the folder_workdir fixture).
def test_folder_model_prints_its_folder_names(folder_workdir, weights_and_images, capsys):
  _, _, _, images = weights_and_images
  assert predict.main(['--weights', str(folder_workdir), '--json', *images]) == 0
  rows = json.loads(capsys.readouterr().out)
  for row in rows:
    assert sorted(e['name'] for e in row['top']) == sorted(FOLDER_CLASSES)  # 3 classes only
    assert all(e['name'] == FOLDER_CLASSES[e['label']] for e in row['top'])
    assert sum(e['probability'] for e in row['top']) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize('args,message', [
    (['--model', 'rmt_s'], 'holds rmt_tiny weights, not rmt_s'),
    (['--model', 'rmt_q'], 'unknown RMT variant'),
    (['--weights-dir-missing'], 'is not an rmt_jax variables directory'),
    (['--missing-image'], 'no such image file'),
    (['--text-file'], 'cannot decode'),
    (['--crop_pct', '1.5'], 'crop_pct in (0, 1], got 32 and 1.5'),
])
def test_bad_input_is_one_clear_message(weights_and_images, tmp_path, capsys, args, message):
  _, _, weights, images = weights_and_images
  if '--weights-dir-missing' in args:
    args, weights = [], str(tmp_path)
  if '--missing-image' in args:
    args, images = [], [str(tmp_path / 'nope.jpg')]
  if '--text-file' in args:
    (tmp_path / 'x.jpg').write_text('not an image')
    args, images = [], [str(tmp_path / 'x.jpg')]
  assert predict.main([*args, '--weights', weights, *images]) == 1
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('args,message', [
    (['--weights', 'w'], 'expected <image> ...; got none'),
    (['a.jpg'], 'Flag --weights must have a value'),
    (['--weights', 'w', '--crop-pct', '1', 'a.jpg'], "Unknown command line flag 'crop-pct'"),
    (['--weights', 'w', '--interpolation', 'cubic', 'a.jpg'], 'value should be one of'),
])
def test_usage_errors_exit_2_with_one_line(capsys, args, message):
  with pytest.raises(SystemExit) as exit_:
    predict.main(args)
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.startswith('error: ') and message in err
  assert len(err.strip().splitlines()) == 1


def test_help_names_the_images_and_the_flags(capsys):
  with pytest.raises(SystemExit) as exit_:
    predict.main(['--help'])
  out = capsys.readouterr().out
  assert exit_.value.code == 0
  assert out.startswith('usage: python -m rmt_jax.predict <image> ... [flags]')
  assert all(f'--{name}' in out for name in ('weights', 'batch_size', 'crop_pct', 'image_size'))


@pytest.mark.slow  # A whole training run by main.py: ~65 s on two CPU cores.
def test_a_trained_digits_model_is_right_with_the_default_flags(tmp_path, capsys):
  """The digits demo's recipe at 16 px (configs/tiny_test.py), trained by main.py until it is
  right on ~90% of the held-out digits, predicts them right with no preprocessing flags: the
  run's own evaluation (16 px, crop_pct 1.0, bilinear) comes with its weights. At the official
  224 px crop, which predict applied whatever the weights before they stored theirs, it is
  wrong on most."""
  workdir, digits = tmp_path / 'run', tmp_path / 'digits'
  # A high flat learning rate and no EMA (predict reads the EMA weights): 150 steps of 32
  # digits learn what the demo's 30 epochs would, on two CPU cores in well under a minute.
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'main.py'), '--config',
       os.path.join(REPO, 'configs/tiny_test.py'), '--workdir', str(workdir),
       f'--config.data.digits_dir={digits}', '--config.total_steps=150',
       '--config.global_batch_size=32', '--config.base_lr=0.5', '--config.warmup_epochs=0',
       '--config.ema_decay=0', '--config.log_every_steps=150',
       '--config.checkpoint_every_steps=150'],
      cwd=REPO, env=main_env(tmp_path / 'jax_cache'), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  # The first held-out image of each digit (32x32 PNGs, as the demo writes them).
  images = [str(sorted((digits / 'val' / str(d)).glob('*.png'))[0]) for d in range(10)]

  def right(*flags):
    assert predict.main(['--weights', str(workdir), '--json', '--top', '1', *flags,
                         *images]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    return sum(r['top'][0]['name'] == str(d) for d, r in enumerate(rows)), err

  correct, err = right()
  assert err == ('preprocessing: 16 px centre crop at crop_pct 1.0, bilinear, ImageNet mean/std '
                 '(stored with the weights)\n')
  assert correct >= 8, f'{correct} of 10 digits right with the stored preprocessing'
  official, _ = right('--image_size', '224', '--crop_pct', '0.875', '--interpolation', 'bicubic')
  assert official <= 5, f'{official} of 10 right at 224 px: the check cannot tell the two apart'


@pytest.mark.parametrize('kernels', ['xla', 'cpu'])
def test_the_kernels_flag_reaches_the_model(weights_and_images, capsys, monkeypatch, kernels):
  from rmt_jax.weights import loading  # pylint: disable=g-import-not-at-top
  model, variables, weights, images = weights_and_images
  load, built = loading.load_with_metadata, []

  def spy(*args, **kwargs):
    built.append(load(*args, **kwargs)[0].kernels)
    return load(*args, **kwargs)

  monkeypatch.setattr(loading, 'load_with_metadata', spy)
  assert predict.main(['--weights', weights, '--json', '--top', '1000', '--kernels', kernels,
                       *images]) == 0
  assert built == [kernels]
  rows = json.loads(capsys.readouterr().out)
  _assert_rows_are(rows, _softmax(model, variables, images, image_size=32), images)
