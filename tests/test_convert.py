"""rmt_jax.weights.pytorch (official state_dict <-> Flax variables, the .pth reader and writer) and
the command over it, `python -m rmt_jax.convert`."""

import argparse
import decimal
import functools
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import CASES, official_case, official_manifest, relative_error
from rmt_jax import convert
from rmt_jax.data import eval_preprocessing
from rmt_jax.models import create_model, from_official_kwargs
from rmt_jax.weights import checkpoint
from rmt_jax.weights import pytorch

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ('rmt_t', 'rmt_s', 'rmt_b', 'rmt_l')
NEEDS_TORCH = 'reading and writing .pth files needs torch (pip install -r requirements-test.txt)'


@functools.lru_cache(maxsize=None)
def _converted(case: str):
  ref = official_case(case)
  model = from_official_kwargs(**ref['kwargs'])
  return ref, model, pytorch.torch_to_flax(ref['state_dict'], model)


def _zeros_like(tree):
  """Zero arrays of a tree of shapes that occupy no memory (broadcast views)."""
  return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), tree)


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'rmt_jax.convert', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def _assert_exact(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    assert got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


# --- the mapping, on the official reference fixtures ------------------------------------------


@pytest.mark.parametrize('case', CASES)
def test_official_to_flax_to_official_is_bit_exact_and_reproduces_logits(case):
  ref, model, variables = _converted(case)
  _assert_exact(pytorch.flax_to_torch(variables, model), ref['state_dict'])
  logits = jax.jit(model.apply)(
      {k: v for k, v in variables.items() if k != pytorch.BUFFERS}, ref['images'])
  assert relative_error(logits, ref['logits']) < 1e-5


@pytest.mark.parametrize('case', CASES)
def test_flax_trained_variables_give_the_official_keys_shapes_and_dtypes(case):
  # Variables that never came from PyTorch carry no official_buffers: they are regenerated.
  ref, model, _ = _converted(case)
  fresh = _zeros_like(pytorch.abstract_variables(model))
  state_dict = pytorch.flax_to_torch(fresh, model)
  assert sorted(state_dict) == sorted(ref['state_dict'])
  for key, want in ref['state_dict'].items():
    assert (state_dict[key].shape, state_dict[key].dtype) == (want.shape, want.dtype), key
    if '.Relpos.' in key:
      np.testing.assert_allclose(state_dict[key], want, rtol=2e-6, err_msg=key)


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
  ref, model, _ = _converted('b')
  state_dict = dict(ref['state_dict'])
  del state_dict['head.bias']
  state_dict['head.extra'] = np.zeros(3, np.float32)
  state_dict['proj.weight'] = state_dict['proj.weight'][:, :-1]
  with pytest.raises(pytorch.ConversionError) as info:
    pytorch.torch_to_flax(state_dict, model)
  message = str(info.value)
  assert '1 missing: head.bias (10,)' in message
  assert '1 unexpected: head.extra (3,)' in message
  assert 'proj.weight: checkpoint (96, 63), model expects (96, 64)' in message


@pytest.mark.parametrize('name', VARIANTS)
def test_mapping_covers_the_official_manifest_both_ways(name):
  entry = official_manifest()[name]
  manifest = {key: (tuple(shape), dtype) for key, shape, dtype in entry['state_dict']}
  model = create_model(name)
  abstract = pytorch.abstract_variables(model)
  # Flax -> official: exactly the manifest's keys, shapes and dtypes.
  state_dict = pytorch.flax_to_torch(_zeros_like(abstract), model)
  assert {k: (v.shape, str(v.dtype)) for k, v in state_dict.items()} == manifest
  # Official -> Flax: every entry used, every leaf filled with its shape.
  official = {key: np.broadcast_to(np.zeros((), dtype), shape)
              for key, (shape, dtype) in manifest.items()}
  official.update(pytorch.official_buffers(model))
  variables = pytorch.torch_to_flax(official, model)
  assert jax.tree.map(np.shape, {k: variables[k] for k in abstract}) == jax.tree.map(
      lambda s: s.shape, abstract)
  assert sorted(variables[pytorch.BUFFERS]) == sorted(
      k for k in manifest if '.Relpos.' in k or k.endswith('num_batches_tracked'))
  assert sum(np.size(x) for x in jax.tree.leaves(variables['params'])) == entry['trainable_params']
  assert pytorch.guess_variants(official) == [name]


def test_inferred_overrides():
  assert pytorch.infer_overrides(official_case('b')['state_dict']) == {
      'num_classes': 10, 'token_label': False}
  assert pytorch.infer_overrides(official_case('tokenlabel')['state_dict']) == {
      'num_classes': 10, 'token_label': True}


def test_importing_and_running_the_model_does_not_import_torch():
  # Variables from the abstract tree and a jitted apply: an eager init/apply compiles op by op
  # (~30 s on a loaded CI core instead of ~5 s).
  code = ("import sys, jax, jax.numpy as jnp, rmt_jax, rmt_jax.convert\n"
          "from rmt_jax.weights import pytorch\n"
          "model = rmt_jax.create_model('rmt_tiny', num_classes=10)\n"
          "variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype),\n"
          "                         pytorch.abstract_variables(model))\n"
          "y = jax.jit(model.apply)(variables, jnp.ones((1, 32, 32, 3)))\n"
          "assert y.shape == (1, 10) and bool(jnp.isfinite(y).all())\n"
          "assert 'torch' not in sys.modules, 'torch was imported'\n")
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr


# --- .pth files and the command line ----------------------------------------------------------


def _training_checkpoint(torch, path: pathlib.Path) -> tuple[dict, dict]:
  """A DDP training checkpoint of the token-label fixture: 'model' and (different) 'model_ema'."""
  plain = official_case('tokenlabel')['state_dict']
  ema = {k: v if '.Relpos.' in k else np.asarray(v + 1 if v.dtype == np.int64 else v * 0.5 + 0.25)
         for k, v in plain.items()}
  ddp = lambda sd: {f'module.{k}': torch.from_numpy(v.copy()) for k, v in sd.items()}
  torch.save({'model': ddp(plain), 'model_ema': ddp(ema), 'epoch': 299, 'max_accuracy': 82.4,
              'optimizer': {'state': {0: {'exp_avg': torch.ones(3)}}, 'param_groups': [{'lr': 1.0}]},
              'lr_scheduler': {'last_epoch': 299}, 'scaler': {'scale': 65536.0},
              'args': argparse.Namespace(model='RMT_S', lr=1e-3)}, path)
  return plain, ema


def test_command_line_round_trips_a_training_checkpoint_and_picks_the_entry(tmp_path):
  torch = pytest.importorskip('torch', reason=NEEDS_TORCH)
  src = tmp_path / 'checkpoint.pth'
  plain, ema = _training_checkpoint(torch, src)
  model = from_official_kwargs(**official_case('tokenlabel')['kwargs'])
  for flag, entry, want in (([], 'model', plain), (['--ema'], 'model_ema', ema)):
    dst = tmp_path / f'vars_{entry}'
    result = _run('torch2flax', '--model', 'rmt_tiny', '--src', str(src), '--dst', str(dst), *flag)
    assert result.returncode == 0, result.stderr
    assert f"entry '{entry}' (prefix 'module.' removed)" in result.stdout
    assert 'rmt_tiny (num_classes=10, token_label=True): 147,164 parameters' in result.stdout
    variables, metadata = checkpoint.load_variables(dst)
    assert metadata['model'] == 'rmt_tiny'
    assert metadata['model_overrides'] == {'num_classes': 10, 'token_label': True}
    assert metadata['source']['entry'] == entry and metadata['parameter_count'] == 147164
    expected = pytorch.torch_to_flax(want, model)
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
  out = tmp_path / 'back.pth'
  result = _run('flax2torch', '--model', 'RMT_TINY', '--src', str(tmp_path / 'vars_model_ema'),
                '--dst', str(out))
  assert result.returncode == 0, result.stderr
  assert "entry 'model'" in result.stdout
  assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as open() would have made it
  saved = torch.load(out, weights_only=True)
  assert list(saved) == ['model']
  back = {k: v.numpy() for k, v in saved['model'].items()}
  _assert_exact(back, ema)
  assert {str(v.dtype) for v in saved['model'].values()} == {'torch.float32', 'torch.int64'}
  assert not list(tmp_path.glob('.*partial*'))


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
  torch = pytest.importorskip('torch', reason=NEEDS_TORCH)
  folder = tmp_path_factory.mktemp('bad')
  good = folder / 'rmt_tiny.pth'
  torch.save({'model': {k: torch.from_numpy(v) for k, v in
                        official_case('b')['state_dict'].items()}}, good)
  data = good.read_bytes()
  (folder / 'truncated.pth').write_bytes(data[:len(data) // 2])
  (folder / 'notes.txt').write_text('these are not weights\n' * 20)
  (folder / 'random.bin').write_bytes(np.random.default_rng(0).bytes(4096))
  return folder


@pytest.mark.parametrize('src,model,says', [
    ('truncated.pth', 'rmt_tiny', 'is truncated or corrupt'),
    ('notes.txt', 'rmt_tiny', 'is not a PyTorch checkpoint'),
    ('random.bin', 'rmt_tiny', 'is not a PyTorch checkpoint'),
    ('rmt_tiny.pth', 'rmt_t', "entry 'model' of {src} does not fit rmt_t (num_classes=10, "
                              'token_label=False) (its shapes are those of --model rmt_tiny): '
                              '198 missing: layers.0.blocks.1.'),
])
def test_bad_input_fails_with_one_message_and_writes_nothing(bad_files, tmp_path, src, model,
                                                             says):
  dst = tmp_path / 'out'
  result = _run('torch2flax', '--model', model, '--src', str(bad_files / src), '--dst', str(dst))
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert says.format(src=bad_files / src) in lines[0]
  assert not dst.exists() and not list(tmp_path.iterdir())


def test_flags_override_what_the_file_says(bad_files, tmp_path, capsys):
  tokenlabel = tmp_path / 'tokenlabel.pth'
  torch = pytest.importorskip('torch', reason=NEEDS_TORCH)
  torch.save({k: torch.from_numpy(v) for k, v in official_case('tokenlabel')['state_dict'].items()},
             tokenlabel)
  for src, flags, says in (
      (bad_files / 'rmt_tiny.pth', ['--num_classes', '1000'],
       'head.weight: checkpoint (10, 96), model expects (1000, 96)'),
      (tokenlabel, ['--notoken_label'], '2 unexpected: aux_head.weight (10, 64); aux_head.bias (10,)')):
    assert convert.main(['torch2flax', '--model', 'rmt_tiny', '--src', str(src),
                         '--dst', str(tmp_path / 'out'), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and says in err and err.count('\n') == 1, err
  assert not (tmp_path / 'out').exists()


def test_usage_errors_are_one_line_with_status_2(capsys):
  for args, says in (
      (['flax2torch', '--ema', '--notoken_label'], '--ema, --token_label only apply to torch2flax'),
      (['torchtoflax'], "unknown command 'torchtoflax'; expected torch2flax or flax2torch"),
      (['torch2flax', '--num-classes=3'], "Unknown command line flag 'num-classes'"),
      (['torch2flax', 'extra'], 'expected <command>; got torch2flax extra'),
  ):
    try:
      status = convert.main(args + ['--model=rmt_tiny', '--src=a.pth', '--dst=b'])
    except SystemExit as e:
      status = e.code
    assert status == 2, args
    err = capsys.readouterr().err
    assert err.startswith('error: ') and says in err and err.count('\n') == 1, err


def test_converted_weights_store_the_official_eval_preprocessing(bad_files, tmp_path, capsys):
  assert convert.main(['torch2flax', '--model', 'rmt_tiny', '--src',
                       str(bad_files / 'rmt_tiny.pth'), '--dst', str(tmp_path / 'out')]) == 0
  capsys.readouterr()
  metadata = checkpoint.read_metadata(tmp_path / 'out')
  # predict then prepares images as the official evaluation did (224, 0.875, bicubic).
  assert metadata['eval_preprocessing'] == eval_preprocessing.OFFICIAL.to_metadata()
  assert eval_preprocessing.from_metadata(metadata) == (eval_preprocessing.OFFICIAL,
                                                        eval_preprocessing.STORED)


def test_flax2torch_refuses_another_variant_an_existing_file_and_a_corrupt_directory(
    bad_files, tmp_path, capsys):
  model = create_model('rmt_tiny', num_classes=10)
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype),
                           pytorch.abstract_variables(model))
  checkpoint.save_variables(tmp_path / 'vars', variables,
                            {'model': 'rmt_tiny', 'model_overrides': {'num_classes': 10}})
  shutil.copytree(tmp_path / 'vars', tmp_path / 'corrupt')
  largest = max((p for p in (tmp_path / 'corrupt').rglob('*') if p.is_file()),
                key=lambda p: p.stat().st_size)
  os.truncate(largest, 100)
  for model_name, src, dst, says in (
      ('rmt_s', 'vars', tmp_path / 'x.pth', 'holds rmt_tiny variables'),
      ('rmt_tiny', 'vars', bad_files / 'notes.txt', 'notes.txt exists'),
      ('rmt_tiny', 'corrupt', tmp_path / 'x.pth', 'cannot read the variables in'),
      ('rmt_tiny', 'nothing', tmp_path / 'x.pth', 'is not an rmt_jax variables directory')):
    assert convert.main(['flax2torch', '--model', model_name, '--src', str(tmp_path / src),
                         '--dst', str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and says in err and err.count('\n') == 1, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['corrupt', 'vars']


def test_flax2torch_hands_a_training_run_back_with_its_ema_weights(tmp_path, capsys):
  torch = pytest.importorskip('torch', reason=NEEDS_TORCH)
  model = create_model('rmt_tiny', num_classes=10)
  abstract = pytorch.abstract_variables(model)
  fill = lambda value: jax.tree.map(lambda s: np.full(s.shape, value, s.dtype), abstract)
  raw, ema = fill(1.0), fill(2.0)
  ckpt = checkpoint.TrainCheckpointer(str(tmp_path / 'run'))
  ckpt.save(7, {'params': raw['params'], 'batch_stats': raw['batch_stats'],
                'ema_params': ema['params'], 'ema_batch_stats': ema['batch_stats']},
            {'epoch': 0}, {'model': 'rmt_tiny', 'model_overrides': {'num_classes': 10}})
  ckpt.close()
  assert convert.main(['flax2torch', '--model', 'rmt_tiny', '--src', str(tmp_path / 'run'),
                       '--dst', str(tmp_path / 'run.pth')]) == 0
  assert 'from step 7 (ema weights)' in capsys.readouterr().out
  state_dict = torch.load(tmp_path / 'run.pth', weights_only=True)['model']
  _assert_exact({k: v.numpy() for k, v in state_dict.items()},
                pytorch.flax_to_torch(ema, model))


def test_reader_entries_prefixes_and_pickle_policy(tmp_path):
  torch = pytest.importorskip('torch', reason=NEEDS_TORCH)
  weights = {'a.weight': torch.ones(2), 'b.num_batches_tracked': torch.tensor(3),
             'c.weight': torch.full((2,), 1.5, dtype=torch.bfloat16)}
  cases = {
      'bare.pth': weights,
      'state_dict.pth': {'state_dict': weights, 'state_dict_ema': {'a.weight': torch.zeros(2)}},
      'partial_prefix.pth': {'module.a.weight': torch.ones(2), 'b': torch.ones(1)},
      'decimal.pth': {'model': weights, 'best': decimal.Decimal('82.4')},
  }
  for name, obj in cases.items():
    torch.save(obj, tmp_path / name)
  sd, source = pytorch.read_torch_checkpoint(tmp_path / 'bare.pth')
  assert source == {'entry': None, 'prefix_removed': False, 'unpickled': False}
  assert sd['b.num_batches_tracked'].dtype == np.int64 and sd['b.num_batches_tracked'].shape == ()
  np.testing.assert_array_equal(sd['c.weight'], np.full(2, 1.5, np.float32))  # bfloat16 -> f32
  sd, source = pytorch.read_torch_checkpoint(tmp_path / 'state_dict.pth', ema=True)
  assert source['entry'] == 'state_dict_ema' and sorted(sd) == ['a.weight']
  sd, _ = pytorch.read_torch_checkpoint(tmp_path / 'partial_prefix.pth')
  assert sorted(sd) == ['b', 'module.a.weight']  # stripped only when every key has it
  with pytest.raises(pytorch.CheckpointFileError, match='without EMA weights; drop --ema'):
    pytorch.read_torch_checkpoint(tmp_path / 'bare.pth', ema=True)
  with pytest.raises(pytorch.CheckpointFileError, match=r'decimal\.Decimal.*--allow_pickle'):
    pytorch.read_torch_checkpoint(tmp_path / 'decimal.pth')
  sd, source = pytorch.read_torch_checkpoint(tmp_path / 'decimal.pth', allow_pickle=True)
  assert source['unpickled'] and sorted(sd) == sorted(weights)
  with pytest.raises(pytorch.CheckpointFileError, match='does not exist'):
    pytorch.read_torch_checkpoint(tmp_path / 'missing.pth')


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
  torch = pytest.importorskip('torch', reason=NEEDS_TORCH)

  def save_half_then_fail(obj, f):
    f.write(b'PK\x03\x04 half a zip')
    raise KeyboardInterrupt

  monkeypatch.setattr(torch, 'save', save_half_then_fail)
  with pytest.raises(KeyboardInterrupt):
    pytorch.write_torch_checkpoint(tmp_path / 'out.pth', {'a.weight': np.ones(2)})
  assert not list(tmp_path.iterdir())


def test_missing_torch_says_how_to_install_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` raise ImportError
  (tmp_path / 'x.pth').write_bytes(b'')
  with pytest.raises(pytorch.CheckpointFileError, match=r'pip install torch==2\.13\.0'):
    pytorch.read_torch_checkpoint(tmp_path / 'x.pth')
  with pytest.raises(pytorch.CheckpointFileError, match='requirements-test.txt'):
    pytorch.write_torch_checkpoint(tmp_path / 'y.pth', {})
