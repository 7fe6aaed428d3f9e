"""`rmt_jax.load`: a converted directory and a training workdir to (model, variables), locally
and on an object store (an in-memory bucket stands in for gs://), with the converter and
predict reading and writing the bucket too."""

import io
import json
import os

from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmt_jax
from rmt_jax.data import class_names
from rmt_jax.weights import checkpoint
from rmt_jax.weights import loading
from rmt_jax.weights import pytorch
from rmt_jax.weights import pytorch_backbone
from conftest import FOLDER_CLASSES  # pylint: disable=g-bad-import-order

# A 10-class head: the model must come back from the stored description, not the default.
OVERRIDES = {'num_classes': 10}


@pytest.fixture(scope='module')
def tiny():
  model = rmt_jax.create_model('rmt_tiny', **OVERRIDES)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  return model, jax.tree.map(np.asarray, variables), images


def test_load_a_converted_directory(tiny, tmp_path):
  model, variables, images = tiny
  checkpoint.save_variables(tmp_path / 'w', variables,
                            {'model': 'rmt_tiny', 'model_overrides': OVERRIDES})
  loaded_model, loaded = rmt_jax.load(tmp_path / 'w')
  assert loaded_model == model
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  np.testing.assert_array_equal(loaded_model.apply(loaded, images), model.apply(variables, images))
  # dtype and other attributes that leave the variables alone may be overridden.
  assert rmt_jax.load(tmp_path / 'w', dtype=jnp.bfloat16)[0].dtype == jnp.bfloat16


@pytest.mark.slow  # A training run by main.py (folder_workdir): ~45 s on two CPU cores.
def test_load_a_training_workdir_takes_the_ema_weights(folder_workdir):
  model, variables, metadata = loading.load_with_metadata(folder_workdir)
  state, meta = checkpoint.load_train_state(folder_workdir)
  assert metadata['weights'] == 'ema' and metadata['step'] == meta['step'] == 2
  assert metadata['class_names'] == list(FOLDER_CLASSES)
  assert model.num_classes == 3
  jax.tree.map(np.testing.assert_array_equal, variables['params'], state['ema_params'])
  logits = model.apply(variables, jnp.zeros((1, 16, 16, 3)))
  assert logits.shape == (1, 3) and bool(jnp.isfinite(logits).all())
  model_only, variables_only = rmt_jax.load(folder_workdir)
  assert model_only == model and set(variables_only) == {'params', 'batch_stats'}


def test_load_variables_returns_a_pair_and_says_so(tmp_path):
  with pytest.raises(checkpoint.CheckpointNotFoundError, match='rmt_jax.json'):
    rmt_jax.load(tmp_path)
  assert 'Returns a pair' in checkpoint.load_variables.__doc__


# ---------------------------------------------------------------------------------------
# gs:// as a user gives it. No bucket is reachable from a test, so gs:// is served from memory:
# epath (what rmt_jax reads and writes through) gets an fsspec in-memory file system for gs://,
# and orbax's array store, which talks to GCS through tensorstore's own driver, is replaced by
# one that keeps each tree as an .npz in that file system, recording the URL it was given.


class _OrbaxOnTheBucket:
  """Stands in for `ocp.StandardCheckpointer` on gs:// paths."""

  urls: list[str] = []

  def save(self, path, tree):
    self.urls.append(os.fspath(path))
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep='/')
    data = io.BytesIO()
    np.savez(data, **flat)
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / 'tree.npz').write_bytes(data.getvalue())

  def wait_until_finished(self):
    pass

  def restore(self, path):
    self.urls.append(os.fspath(path))
    with np.load(io.BytesIO((epath.Path(path) / 'tree.npz').read_bytes())) as f:
      return traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep='/')


@pytest.fixture
def bucket(monkeypatch, tmp_path):
  fsspec_memory = pytest.importorskip('fsspec.implementations.memory')
  from etils.epath import backend as epath_backend  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top

  class MemoryGcs(fsspec_memory.MemoryFileSystem):
    protocol = ('gs',)
    store = {}
    pseudo_dirs = ['']

  memory = MemoryGcs(skip_instance_cache=True)
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  monkeypatch.setattr(epath_backend.fsspec_backend, 'fs', lambda path: memory)
  monkeypatch.setattr(checkpoint.ocp, 'StandardCheckpointer', _OrbaxOnTheBucket)
  _OrbaxOnTheBucket.urls = []
  monkeypatch.chdir(tmp_path)  # A URL mistaken for a local path would land here.
  yield memory
  assert not list(tmp_path.iterdir()), 'wrote to local disk instead of the bucket'


def test_variables_on_a_bucket(tiny, bucket):
  model, variables, images = tiny
  checkpoint.save_variables('gs://bucket/runs/w', variables,
                            {'model': 'rmt_tiny', 'model_overrides': OVERRIDES})
  assert bucket.exists('gs://bucket/runs/w/rmt_jax.json')
  assert _OrbaxOnTheBucket.urls == ['gs://bucket/runs/w/variables']
  loaded_model, loaded = rmt_jax.load('gs://bucket/runs/w')
  assert loaded_model == model
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  with pytest.raises(FileExistsError):
    checkpoint.save_variables('gs://bucket/runs/w', variables, {'model': 'rmt_tiny'})


def test_a_failed_save_on_a_bucket_leaves_nothing(tiny, bucket, monkeypatch):
  def fail(self, path, tree):
    (epath.Path(path) / 'half').write_bytes(b'x')
    raise KeyboardInterrupt

  monkeypatch.setattr(_OrbaxOnTheBucket, 'save', fail)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save_variables('gs://bucket/w', tiny[1], {'model': 'rmt_tiny'})
  assert not bucket.exists('gs://bucket/w')


def test_converter_and_predict_on_a_bucket(bucket, capsys, tmp_path_factory):
  torch = pytest.importorskip('torch', reason='the converter reads .pth files with PyTorch')
  tf = pytest.importorskip('tensorflow', reason='predict decodes images with TensorFlow')
  from rmt_jax import convert, predict  # pylint: disable=g-import-not-at-top
  model = rmt_jax.create_model('rmt_tiny')  # 1000 classes: the converter stores ImageNet's names
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  state_dict = pytorch.flax_to_torch(variables, model)
  pytorch.write_torch_checkpoint('gs://bucket/official.pth', state_dict)

  assert convert.main(['torch2flax', '--model', 'rmt_tiny', '--src', 'gs://bucket/official.pth',
                       '--dst', 'gs://bucket/converted']) == 0, capsys.readouterr().err
  _, metadata = checkpoint.load_variables('gs://bucket/converted')
  assert metadata['class_names'] == class_names.imagenet_class_names()
  assert metadata['source']['file'] == 'gs://bucket/official.pth'
  assert convert.main(['flax2torch', '--model', 'rmt_tiny', '--src', 'gs://bucket/converted',
                       '--dst', 'gs://bucket/back.pth']) == 0, capsys.readouterr().err
  with bucket.open('gs://bucket/back.pth', 'rb') as f:
    back = torch.load(f, weights_only=True)['model']
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key].numpy(), value, err_msg=key)

  # Images are read by TensorFlow's own file systems (gs:// natively), not through epath.
  image = tmp_path_factory.mktemp('images') / 'a.png'
  image.write_bytes(tf.io.encode_png(np.zeros((40, 40, 3), np.uint8)).numpy())
  capsys.readouterr()
  assert predict.main(['--weights', 'gs://bucket/converted', '--json', '--image_size', '32',
                       str(image)]) == 0
  rows = json.loads(capsys.readouterr().out)
  names = class_names.imagenet_class_names()
  assert [e['name'] for e in rows[0]['top']] == [names[e['label']] for e in rows[0]['top']]


def test_backbone_converter_on_a_bucket(bucket, capsys):
  # `--backbone` resolves its paths as the classifier's do: a gs:// --dst is the bucket, not a
  # local folder ./gs:/bucket/... (the fixture fails the test on anything written locally).
  torch = pytest.importorskip('torch', reason='the converter reads .pth files with PyTorch')
  from rmt_jax import convert  # pylint: disable=g-import-not-at-top
  backbone = rmt_jax.create_backbone('rmt_tiny')
  rng = np.random.default_rng(0)
  # Random values from the abstract tree: an eager init of even the tiny backbone takes seconds.
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                           pytorch.abstract_variables(backbone))
  state_dict = pytorch.flax_to_torch(variables, backbone)
  pytorch_backbone.write_mmdet_checkpoint('gs://bucket/mask_rcnn.pth', state_dict)

  assert convert.main(['torch2flax', '--backbone', '--model=rmt_tiny',
                       '--src=gs://bucket/mask_rcnn.pth', '--dst=gs://bucket/det']) == 0, \
      capsys.readouterr().err
  assert 'wrote gs://bucket/det' in capsys.readouterr().out
  loaded, metadata = checkpoint.load_variables('gs://bucket/det')
  assert metadata['backbone'] and metadata['source']['file'] == 'gs://bucket/mask_rcnn.pth'
  jax.tree.map(np.testing.assert_array_equal,
               {k: loaded[k] for k in ('params', 'batch_stats')}, variables)

  assert convert.main(['flax2torch', '--backbone', '--model=rmt_tiny', '--src=gs://bucket/det',
                       '--dst=gs://bucket/back.pth']) == 0, capsys.readouterr().err
  with bucket.open('gs://bucket/back.pth', 'rb') as f:
    back = torch.load(f, weights_only=True)['state_dict']
  assert sorted(back) == sorted(f'backbone.{k}' for k in state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[f'backbone.{key}'].numpy(), value, err_msg=key)
