"""Trains or evaluates RMT: `python main.py --config configs/rmt_s.py --workdir DIR`.

Fields of the config can be overridden as `--config.global_batch_size=1024`. On a Cloud TPU pod
run the same command on every host (`gcloud compute tpus tpu-vm ssh ... --worker=all`); JAX
finds the other hosts itself. Elsewhere pass --coordinator_address, --num_processes and
--process_id to each process (e.g. several GPU hosts).
"""

import logging as std_logging
import sys

# Before TensorFlow and JAX start: their informational start-up notices off
# (RMT_JAX_VERBOSE_STARTUP=1 brings them back).
from rmt_jax.runtime import console  # pylint: disable=g-bad-import-order

console.quiet_startup()

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import tensorflow as tf

from rmt_jax.weights import checkpoint
from rmt_jax.runtime import host_allocator
from rmt_jax.data import input_pipeline
from rmt_jax.train import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl and TensorBoard go here.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for multi-process runs off Cloud TPU.')
flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process (0 .. num_processes - 1).')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter (dozens of lines per checkpoint) off the console."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _initialize_distributed() -> None:
  """Joins the other processes: from the flags, or as JAX's cluster detection finds them
  (Cloud TPU VMs, SLURM, Open MPI); a lone machine stays one process."""
  if FLAGS.coordinator_address:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError:
    pass  # No cluster detected (it then asks for a coordinator address): one process.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # tf.data runs on the host: keep TensorFlow off the accelerators that JAX uses.
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
  _initialize_distributed()
  logging.info('Process %d of %d; local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  if jax.default_backend() == 'cpu' and host_allocator.host_allocator() == 'libc':
    logging.warning(host_allocator.cpu_hint())
  try:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except input_pipeline.DataError as e:
    # The message names the path and the fix; a traceback would only hide it.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except checkpoint.CheckpointUnreadableError as e:
    # Every checkpoint is damaged: the message lists each step and why; the run stops rather
    # than silently start over from scratch.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except loop.NonFiniteLossError as e:
    print(str(e), file=sys.stderr)
    sys.exit(3)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)
