"""Which malloc the process runs on, and why it matters for XLA on CPU.

XLA's CPU backend allocates a computation's temporaries afresh on every call (about 3 GiB for an
RMT-T train step at batch 16). glibc's malloc returns blocks that large to the kernel when they
are freed, so every step faults them in again, page by page: on a 2-core AMD EPYC VM, ~750k
page faults and ~1.2 CPU-s in the kernel per RMT-T train step. tcmalloc keeps freed memory
(with TCMALLOC_RELEASE_RATE=0): the same step ran 1.25x faster there, and 1.5x faster on a
2-core Intel Xeon VM (~910k page faults and ~3.2 CPU-s in the kernel per step on glibc).
"""

# The command line that fixes it (Debian / Ubuntu package: libtcmalloc-minimal4).
TCMALLOC_PRELOAD = 'LD_PRELOAD=libtcmalloc_minimal.so.4 TCMALLOC_RELEASE_RATE=0'


def host_allocator() -> str:
  """'tcmalloc', 'jemalloc' or 'mimalloc' when one is loaded (preloaded), else 'libc'."""
  try:
    with open('/proc/self/maps') as f:
      maps = f.read()
  except OSError:  # not Linux
    return 'libc'
  for name in ('tcmalloc', 'jemalloc', 'mimalloc'):
    if f'lib{name}' in maps:
      return name
  return 'libc'


def cpu_hint() -> str:
  """One line recommending tcmalloc for XLA CPU runs on the libc allocator."""
  return ('XLA CPU on glibc malloc faults every step\'s temporaries in again (RMT-T\'s train '
          'step ran 1.25-1.5x faster on tcmalloc on 2-core VMs); preload it: '
          f'{TCMALLOC_PRELOAD} python ...')
