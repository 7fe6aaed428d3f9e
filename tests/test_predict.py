"""The predict command: output format, agreement with the model, clear errors."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmt_jax
from rmt_jax import checkpoint

tf = pytest.importorskip('tensorflow', reason='predict decodes images with TensorFlow')
from rmt_jax import input_pipeline, predict  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def weights_and_images(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict')
  model = rmt_jax.create_model('rmt_tiny')  # 1000 classes: ImageNet label names
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  checkpoint.save_variables(root / 'weights', variables, {'model': 'rmt_tiny', 'image_size': 32})
  rng = np.random.default_rng(0)
  images = []
  for name, shape, encode in [('a.jpg', (40, 52, 3), tf.io.encode_jpeg),
                              ('b.png', (33, 30, 3), tf.io.encode_png)]:
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    (root / name).write_bytes(encode(pixels).numpy())
    images.append(str(root / name))
  return model, variables, str(root / 'weights'), images


def test_command_prints_top5_imagenet_labels_per_image(weights_and_images):
  _, _, weights, images = weights_and_images
  result = subprocess.run(
      [sys.executable, '-m', 'rmt_jax.predict', '--model', 'RMT_TINY', '--weights', weights,
       *images], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 2 * 6
  for block in (lines[:6], lines[6:]):
    assert block[0] in images
    ranked = [re.fullmatch(r'  (\d)\. (n\d{8}) +(0\.\d{4}|1\.0000)', line) for line in block[1:]]
    assert all(ranked), block
    assert [int(m.group(1)) for m in ranked] == [1, 2, 3, 4, 5]
    probs = [float(m.group(3)) for m in ranked]
    assert probs == sorted(probs, reverse=True)


def test_probabilities_are_the_models_softmax_on_eval_preprocessing(weights_and_images):
  model, variables, weights, images = weights_and_images
  rows = predict.predict('rmt_tiny', weights, images, top=1000)
  cfg = input_pipeline.default_config()
  cfg.image_size = 32
  batch = np.stack([
      input_pipeline.eval_preprocess({'image': tf.io.read_file(p), 'label': 0}, cfg)['image']
      for p in images])
  want = np.asarray(jax.nn.softmax(model.apply(variables, batch), axis=-1))
  names = predict.imagenet_class_names()
  for (path, ranked), p in zip(rows, want):
    got = np.zeros(1000)
    for name, prob in ranked:
      got[names.index(name)] = prob
    np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-7)
  assert len(names) == 1000 and names[0] == 'n01440764'


@pytest.mark.parametrize('args,message', [
    (['--model', 'rmt_s'], 'holds rmt_tiny weights, not rmt_s'),
    (['--model', 'rmt_q'], 'unknown RMT variant'),
    (['--model', 'rmt_tiny', '--weights-dir-missing'], 'is not an rmt_jax variables directory'),
    (['--model', 'rmt_tiny', '--missing-image'], 'no such image file'),
    (['--model', 'rmt_tiny', '--text-file'], 'cannot decode'),
])
def test_bad_input_is_one_clear_message(weights_and_images, tmp_path, capsys, args, message):
  _, _, weights, images = weights_and_images
  if '--weights-dir-missing' in args:
    args, weights = args[:2], str(tmp_path)
  if '--missing-image' in args:
    args, images = args[:2], [str(tmp_path / 'nope.jpg')]
  if '--text-file' in args:
    (tmp_path / 'x.jpg').write_text('not an image')
    args, images = args[:2], [str(tmp_path / 'x.jpg')]
  assert predict.main([*args, '--weights', weights, *images]) == 1
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err
