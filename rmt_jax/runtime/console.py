"""A readable console: TensorFlow's and XLA's start-up notices off, unless asked for.

Without this, every run starts with TensorFlow's oneDNN notice (once per TensorFlow library
loaded, so twice, each after absl's "All log messages before absl::InitializeLog()") and JAX's
"Unable to initialize backend 'tpu'" on machines without a TPU: information, not warnings,
that hides the lines that matter. Set `RMT_JAX_VERBOSE_STARTUP=1` to see everything again.
"""

import contextlib
import logging
import os
import sys
from typing import Iterator

VERBOSE_ENV = 'RMT_JAX_VERBOSE_STARTUP'


def verbose_startup() -> bool:
  """Whether the user asked for the libraries' start-up notices ($RMT_JAX_VERBOSE_STARTUP)."""
  return os.environ.get(VERBOSE_ENV, '').strip().lower() not in ('', '0', 'false', 'no')


def quiet_startup(*, import_tensorflow: bool = True) -> None:
  """Hides the libraries' informational start-up notices; call before TensorFlow is imported.

  Args:
    import_tensorflow: import TensorFlow now, quietly (where it is installed). TensorFlow's
      C++ code prints its notices while its libraries load, before its logging is set up, so
      `TF_CPP_MIN_LOG_LEVEL` does not reach them: the import runs with the process's stderr
      pointed at /dev/null. A failed import still raises, with its message, afterwards.
  """
  if verbose_startup():
    return
  # What TensorFlow logs once running: INFO off, warnings and errors on (a user's setting wins).
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  # JAX reports each backend it could not start (no libtpu on a GPU or CPU host) at INFO.
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  if import_tensorflow and 'tensorflow' not in sys.modules:
    with _stderr_to_devnull():
      try:
        import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
      except ImportError:
        pass  # The model-only install has no TensorFlow; whoever needs it says so.


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
  """File descriptor 2 (what C++ libraries write to) goes to /dev/null inside the block."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
