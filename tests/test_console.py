"""The console: TensorFlow's and XLA's start-up notices hidden by default, kept on request."""

import logging
import os
import pathlib
import subprocess
import sys

import pytest

from rmt_jax.runtime import console

REPO = pathlib.Path(__file__).resolve().parents[1]
_IMPORT = ('from rmt_jax.runtime import console; console.quiet_startup(); import tensorflow, jax; '
           'jax.devices()')


def test_importing_tensorflow_and_starting_jax_print_nothing():
  pytest.importorskip('tensorflow', reason='the notices are TensorFlow\'s')
  env = {k: v for k, v in os.environ.items()
         if k not in (console.VERBOSE_ENV, 'TF_CPP_MIN_LOG_LEVEL')}
  quiet = subprocess.run([sys.executable, '-c', _IMPORT], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=dict(env, PYTHONPATH=str(REPO)))
  assert quiet.returncode == 0, quiet.stderr
  assert quiet.stderr == ''


def test_verbose_startup_leaves_everything_on(monkeypatch):
  monkeypatch.setenv(console.VERBOSE_ENV, '1')
  monkeypatch.delenv('TF_CPP_MIN_LOG_LEVEL', raising=False)
  logger = logging.getLogger('jax._src.xla_bridge')
  monkeypatch.setattr(logger, 'level', logging.NOTSET)
  console.quiet_startup(import_tensorflow=False)
  assert 'TF_CPP_MIN_LOG_LEVEL' not in os.environ and logger.level == logging.NOTSET
  monkeypatch.setenv(console.VERBOSE_ENV, '0')
  console.quiet_startup(import_tensorflow=False)
  assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == '1' and logger.level == logging.WARNING
