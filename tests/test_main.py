"""End-to-end tests of `main.py` in subprocesses: the missing-data message, one-line data errors,
a console free of start-up notices, exact resumption after SIGKILL, saving on SIGTERM,
eval-only, and two processes training together.

They train `configs/tiny_test.py` (a two-stage miniature on 16x16 digits) for a few steps. All
subprocesses share one persistent compilation cache, so a program compiles once per session.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from rmt_jax.weights import checkpoint
from conftest import main_env, write_image_folder  # pylint: disable=g-bad-import-order

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300


@pytest.fixture(scope='session')
def env(tmp_path_factory):
  return main_env(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('data') / 'digits')


def _main_args(workdir, digits_dir, *overrides):
  return [sys.executable, str(REPO / 'main.py'), '--config', str(REPO / 'configs/tiny_test.py'),
          '--workdir', str(workdir), f'--config.data.digits_dir={digits_dir}', *overrides]


def _run(args, env, **kwargs):
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT, **kwargs)


def test_missing_imagenet_prints_instructions_not_a_traceback(tmp_path, env):
  proc = _run([sys.executable, str(REPO / 'main.py'), '--config',
               str(REPO / 'configs/rmt_s.py'), '--workdir', str(tmp_path / 'run'),
               f'--config.data.data_dir={tmp_path / "tfds"}'], env)
  assert proc.returncode != 0
  assert 'python -m rmt_jax.prepare_imagenet' in proc.stderr
  assert 'ILSVRC2012_img_train.tar' in proc.stderr
  assert 'Traceback' not in proc.stderr


def _break_folder(root: pathlib.Path, case: str) -> None:
  if case == 'val class missing from train':
    write_image_folder(root / 'extra', {'val': 1})
    (root / 'extra/val/cat').rename(root / 'val/bird')
  elif case == 'empty class folder':
    for image in (root / 'train/dog').iterdir():
      image.unlink()
  elif case == 'unreadable image':
    # Most of the training images, so that the first batch holds one whatever the order.
    for name in ('cat', 'dog'):
      for i in range(8):
        (root / f'train/{name}/{i}.png').unlink()
        (root / f'train/{name}/broken{i}.jpg').write_text('not an image')
  elif case == 'missing split':
    for image in (root / 'val').glob('*/*'):
      image.unlink()
    for folder in (root / 'val').iterdir():
      folder.rmdir()
    (root / 'val').rmdir()


@pytest.mark.parametrize('case,message', [
    ('val class missing from train', r"val/bird: class 'bird' has no folder in .*/train.*add "
                                     r'train/bird/'),
    ('empty class folder', r'/train/dog holds no images .*add its images or remove the folder'),
    ('unreadable image', r'/train/(cat|dog)/broken\d\.jpg is not a JPEG or PNG image .*remove '
                         r'it'),
    ('missing split', r"image folder split not found: '.*/val' does not exist; put the val "
                      r'images in .*/val/<class name>/'),
])
def test_data_errors_are_one_line_naming_the_path(tmp_path, env, case, message):
  root = tmp_path / 'data'
  write_image_folder(root, {'train': 8, 'val': 2})
  _break_folder(root, case)
  proc = _run([sys.executable, str(REPO / 'main.py'), '--config',
               str(REPO / 'configs/tiny_test.py'), '--workdir', str(tmp_path / 'run'),
               '--config.data.dataset=folder', f'--config.data.folder_root={root}',
               '--config.num_classes=3'], env)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert re.search(message, errors[0]), errors[0]


# Runs main.py, but SIGKILLs itself when asked for the 4th batch (steps 1-3 dispatched), once
# the step-2 checkpoint is complete on disk: a crash between two checkpoints.
_KILL_AFTER_3 = textwrap.dedent('''
    import os, runpy, signal, sys, time
    from rmt_jax.data import input_pipeline
    workdir = sys.argv[sys.argv.index('--workdir') + 1]
    original = input_pipeline.TrainIterator.__next__

    def next_or_die(self):
      position = self.get_state()
      if position['epoch'] * position['steps_per_epoch'] + position['step_in_epoch'] == 3:
        deadline = time.time() + 120
        while not os.path.isdir(os.path.join(workdir, 'checkpoints', '2')):
          assert time.time() < deadline, 'checkpoint 2 never appeared'
          time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)
      return original(self)

    input_pipeline.TrainIterator.__next__ = next_or_die
    sys.argv = sys.argv[2:]  # Drop '-c' and the interpreter: main.py and its flags.
    runpy.run_path(sys.argv[0], run_name='__main__')
''')


def test_killed_run_resumes_to_the_uninterrupted_parameters(tmp_path, env, digits_dir):
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  proc = _run(_main_args(straight, digits_dir), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The console starts with the run, not with TensorFlow's and XLA's start-up notices.
  for notice in ('oneDNN', "Unable to initialize backend 'tpu'", 'absl::InitializeLog'):
    assert notice not in proc.stderr

  proc = _run([sys.executable, '-c', _KILL_AFTER_3] + _main_args(killed, digits_dir), env)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  steps = sorted(int(p.name) for p in (killed / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [2]

  proc = _run(_main_args(killed, digits_dir), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'from checkpoint 2' in proc.stderr

  want, want_meta = checkpoint.load_train_state(straight)
  got, got_meta = checkpoint.load_train_state(killed)
  assert want_meta['step'] == got_meta['step'] == 4
  for name in ('params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats', 'rng'):
    for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name])):
      np.testing.assert_array_equal(a, b, err_msg=name)  # Bit for bit.
  # Training did change the weights (the comparison is not of two initialisations).
  first = jax.tree.leaves(want['params'])
  assert any(not np.array_equal(a, b) for a, b in
             zip(first, jax.tree.leaves(checkpoint.load_train_state(straight, 2)[0]['params'])))

  # TensorBoard got the same events, as scalars.
  tags = set()
  for path in (straight / 'tensorboard').iterdir():
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        assert value.metadata.plugin_data.plugin_name == 'scalars'
        tags.add(value.tag)
  assert {'train/loss', 'train/learning_rate', 'eval/top1', 'eval_ema/top5'} <= tags

  # Eval-only on the finished run: the whole held-out split (360 digits), each counted once,
  # with an eval batch of 112 that leaves the last batch padded.
  evaluation = tmp_path / 'eval'
  proc = _run(_main_args(evaluation, digits_dir, '--config.eval_only=True',
                         '--config.eval_batch_size=112',
                         f'--config.init_from={straight}'), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  events = [json.loads(l) for l in (evaluation / 'metrics.jsonl').read_text().splitlines()]
  assert [e['split'] for e in events] == ['eval_only'] and events[0]['step'] == 4
  assert events[0]['num_images'] == 360  # 4 batches of 112 = 448 rows, 88 of them padding.
  assert 0 <= events[0]['top1'] <= events[0]['top5'] <= 1
  # The train run's own final EMA evaluation saw the same weights and images.
  train_events = [json.loads(l) for l in (straight / 'metrics.jsonl').read_text().splitlines()]
  final_ema = [e for e in train_events if e['split'] == 'eval_ema'][-1]
  assert events[0]['top1'] == pytest.approx(final_ema['top1'])
  assert events[0]['loss'] == pytest.approx(final_ema['loss'], rel=1e-4)


def test_sigterm_saves_then_exits_cleanly(tmp_path, env, digits_dir):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(
      _main_args(workdir, digits_dir, '--config.total_steps=100000',
                 '--config.checkpoint_every_steps=100000'),
      cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  lines = []
  deadline = time.time() + TIMEOUT
  for line in proc.stderr:
    lines.append(line)
    if '[train] step 2/' in line:
      proc.send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline
  lines.extend(proc.stderr)
  assert proc.wait(timeout=TIMEOUT) == 0, ''.join(lines[-40:])
  log = ''.join(lines)
  assert 'Preempted (SIGTERM): saved step' in log
  steps = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 2 <= steps[0] < 100000


_WORKER = textwrap.dedent('''
    import json, os, sys
    port, process_id, workdir, digits_dir, out = sys.argv[1:]
    os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=2'
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.config.update('jax_default_prng_impl', 'rbg')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                               process_id=int(process_id))
    from jax.experimental import multihost_utils
    import numpy as np
    from configs import tiny_test
    from rmt_jax.train import loop

    config = tiny_test.get_config()
    config.data.digits_dir = digits_dir
    config.total_steps = 3
    config.checkpoint_every_steps = 1000  # One checkpoint: the final one.
    result = loop.train_and_evaluate(config, workdir)
    state = result['state']
    local = {name: jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                                getattr(state, name)) for name in ('params', 'ema_params')}
    multihost_utils.assert_equal(local, 'the processes disagree on the parameters')
    sums = {k: float(sum(np.abs(x).astype(np.float64).sum() for x in jax.tree.leaves(v)))
            for k, v in local.items()}
    with open(out, 'w') as f:
      json.dump({'devices': jax.device_count(), 'processes': jax.process_count(),
                 'step': result['step'], **sums}, f)
''')


def test_two_processes_train_agree_and_write_one_checkpoint(tmp_path, env, digits_dir):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'run'
  procs = [subprocess.Popen(
      [sys.executable, '-c', _WORKER, str(port), str(i), str(workdir), digits_dir,
       str(tmp_path / f'out{i}.json')], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  results = [json.loads((tmp_path / f'out{i}.json').read_text()) for i in range(2)]
  assert results[0] == results[1]
  assert results[0]['devices'] == 4 and results[0]['processes'] == 2 and results[0]['step'] == 3
  steps = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert steps == [3]
  # This (single) process restores what the two wrote.
  state, meta = checkpoint.load_train_state(workdir)
  assert meta['step'] == 3 and int(state['step']) == 3
  for name in ('params', 'ema_params'):
    total = sum(np.abs(x).astype(np.float64).sum() for x in jax.tree.leaves(state[name]))
    assert total == pytest.approx(results[0][name], rel=1e-12)
