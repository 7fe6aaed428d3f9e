"""What the Pallas kernels' tests (tests/test_tpu_*.py) check alike.

- A kernel's values and gradients against its plain form (`assert_equals_plain`), in bfloat16
  within its rounding of the plain form (`assert_bfloat16_within_its_rounding`), and a model's
  module under `kernels='tpu'` against `'xla'` (`assert_tpu_form_equals_plain`).
- The split over a mesh of 4 CPU devices (`assert_split_over_a_mesh_equals_one_device`) and
  Mosaic's compile for a v5p and a v4 with libtpu (`assert_kernels_compile_for_a_v5p_and_a_v4`),
  each in a fresh interpreter (`run_script`).
- The kernels' calls in a traced program (`pallas_calls`, `kernel_calls`, `blocks`) and in the
  official fixtures' model (`assert_the_official_fixtures_run_a_kernel_in_every_block`).
- The stages of RMT-T, -S, -B and -L at 224 px, where the memory plans are checked (`STAGES`).
"""

import functools
import subprocess
import sys
import textwrap
from typing import Any, Callable, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from conftest import REPO, libtpu_env, official_case, relative_error

# (height, width, dim, hidden): the stages of RMT-T, -S, -B and -L at 224 px, in that order.
STAGES_WITH_HIDDEN = [
    (56, 56, 64, 192), (28, 28, 128, 384), (14, 14, 256, 768), (7, 7, 512, 1536),
    (56, 56, 64, 256), (28, 28, 128, 512),
    (56, 56, 80, 320), (28, 28, 160, 640), (14, 14, 320, 960), (7, 7, 512, 1536),
    (56, 56, 112, 448), (28, 28, 224, 896), (14, 14, 448, 1344), (7, 7, 640, 1920)]
# (height, width, dim): the same stages, each once.
STAGES = list(dict.fromkeys(stage[:3] for stage in STAGES_WITH_HIDDEN))


def values_and_gradients(f: Callable[..., Any], args: Sequence[Any],
                         cotangent: Any) -> list[jax.Array]:
  """f(*args) and the gradients of every argument for `cotangent`, as one list of arrays."""
  out, vjp = jax.vjp(f, *args)
  return jax.tree.leaves((out, vjp(cotangent)))


def assert_equals_plain(kernel: Callable[..., Any], plain: Callable[..., Any],
                        args: Sequence[Any], cotangent: Any,
                        names: Sequence[str] = ()) -> list[jax.Array]:
  """`kernel`'s values and the gradients of every argument (`values_and_gradients`) against
  `plain`'s: as many, each of one shape and dtype, within 1e-5 relative error.

  Args:
    kernel, plain: functions of `args`.
    args: arrays (or pytrees of them).
    cotangent: of the outputs.
    names: of the values and gradients in order, for the messages (else their index).

  Returns:
    The kernel's values and gradients.
  """
  got, want = (values_and_gradients(f, args, cotangent) for f in (kernel, plain))
  assert len(got) == len(want)
  for i, (g, w) in enumerate(zip(got, want)):
    name = names[i] if i < len(names) else i
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert relative_error(g, w) < 1e-5, name
  return got


def assert_bfloat16_within_its_rounding(run: Callable[[Any], tuple[Sequence[jax.Array],
                                                                  Sequence[jax.Array]]],
                                        names: Sequence[str] = (), *,
                                        of_plain: float | None = None,
                                        of_float32: float | None = None) -> list[jax.Array]:
  """A kernel in bfloat16 against its plain form in bfloat16 and the plain form's float32
  values: every value as far from those as the plain form's, 1.5x and 2^-9 allowed, in the
  plain form's dtype; and within `of_plain` of the plain form's, or `of_float32` of the float32
  values.

  Args:
    run: dtype -> (the kernel's values, the plain form's), e.g. `values_and_gradients` of each,
      from inputs in that dtype where the kernel takes them in the compute dtype.
    names: of the values, for the messages (else their index).
    of_plain, of_float32: the bounds, in relative error.

  Returns:
    The kernel's bfloat16 values.
  """
  exact, _ = run(jnp.float32)
  got, want = run(jnp.bfloat16)
  assert len(got) == len(want) == len(exact)
  for i, (g, w, e) in enumerate(zip(got, want, exact)):
    name = names[i] if i < len(names) else i
    assert g.dtype == w.dtype, name
    assert relative_error(g, e) < 1.5 * relative_error(w, e) + 2 ** -9, name
    if of_plain is not None:
      assert relative_error(g, w) < of_plain, name
    if of_float32 is not None:
      assert relative_error(g, e) < of_float32, name
  return list(got)


def assert_tpu_form_equals_plain(module, x) -> None:
  """A module under `kernels='tpu'` (Pallas's interpreter on this host) against `'xla'`: the
  value of sum(sin(module(x))) and its gradients in every parameter and in x, under 1e-5.
  The parameters are drawn at O(0.3), so that no form hides behind a near-zero init."""
  variables = module.init(jax.random.key(0), x)
  rng = np.random.default_rng(3)
  variables = jax.tree.map(lambda a: jax.numpy.asarray(rng.normal(size=a.shape) * 0.3, a.dtype),
                           variables)

  def loss(variables, x, kernels):
    return jax.numpy.sum(jax.numpy.sin(module.clone(kernels=kernels).apply(variables, x)))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  (got_loss, got), (want_loss, want) = grad(variables, x, 'tpu'), grad(variables, x, 'xla')
  assert abs(float(got_loss - want_loss)) < 1e-5 * abs(float(want_loss))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert relative_error(g, w) < 1e-5


def pallas_calls(jaxpr):
  """The `pallas_call` equations of a jaxpr and of its sub-jaxprs (a kernel's declared cost and
  grid are in their params)."""
  yield from (eqn for eqn in jaxpr.eqns if eqn.primitive.name == 'pallas_call')
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from pallas_calls(sub)


@functools.cache
def official_model_kernels() -> tuple[list[tuple[int, int, int]], int]:
  """The Pallas calls of the fixtures' case-'b' model under `kernels='tpu'` (layerscale in
  stages 3 and 4), each as (scalar-prefetch operands, blocks, rank of the first block), and the
  model's block count. Traced once for the kernel modules' tests."""
  from rmt_jax.weights import pytorch  # pylint: disable=g-import-not-at-top
  from rmt_jax.models import from_official_kwargs  # pylint: disable=g-import-not-at-top
  ref = official_case('b')
  model = from_official_kwargs(**ref['kwargs'], kernels='tpu')
  variables = pytorch.torch_to_flax(ref['state_dict'], model)
  jaxpr = jax.make_jaxpr(model.apply)(variables, ref['images'])
  calls = [(eqn.params['grid_mapping'].num_index_operands,
            len(eqn.params['grid_mapping'].block_mappings),
            len(eqn.params['grid_mapping'].block_mappings[0].block_shape))
           for eqn in pallas_calls(jaxpr.jaxpr)]
  return calls, sum(ref['kwargs']['depths'])


def kernel_calls(jaxpr) -> tuple[Any, Any]:
  """The forward and the backward kernel's equations of a jaxpr that holds one of each (the
  backward has more blocks)."""
  forward, backward = sorted(pallas_calls(jaxpr.jaxpr),
                             key=lambda eqn: len(eqn.params['grid_mapping'].block_mappings))
  return forward, backward


def blocks(eqn) -> list[tuple[int, ...]]:
  """The block shape of each operand and output of a `pallas_call` equation."""
  return [tuple(getattr(size, 'block_size', size) for size in mapping.block_shape)
          for mapping in eqn.params['grid_mapping'].block_mappings]


def assert_the_official_fixtures_run_a_kernel_in_every_block(prefetched: int,
                                                            blocks: int) -> None:
  """test_model.py's parity with the official outputs under `kernels='tpu'` goes through a
  kernel: its forward call, known by its scalar-prefetch operands and its number of blocks,
  appears twice per block of the fixtures' model (`platform_dependent` stages Mosaic and the
  interpreter): every block has a plan."""
  calls, depth = official_model_kernels()
  assert [call[:2] for call in calls].count((prefetched, blocks)) == 2 * depth


def run_script(script: str, with_libtpu: bool) -> list[str]:
  """The lines that Python `script` prints, run in a fresh interpreter (the device count and
  the platforms are fixed when JAX starts) with libtpu on its path or not."""
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=libtpu_env(with_libtpu),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.split('\n')


# The head and tail of `assert_split_over_a_mesh_equals_one_device`'s script. It runs in a fresh
# interpreter: the device count is fixed when JAX starts.
_MESH_HEAD = """
import os
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + (
    ' --xla_force_host_platform_device_count=4')
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
rng = np.random.default_rng(0)
"""
_MESH_TAIL = """
want = jax.jit(step)(*args)
mesh = Mesh(np.array(jax.devices()), ('data',))
with jax.set_mesh(mesh):
  sharded = [jax.device_put(args[0], NamedSharding(mesh, PartitionSpec('data')))]
  sharded += [jax.device_put(a, NamedSharding(mesh, PartitionSpec())) for a in args[1:]]
  jitted = jax.jit(step)
  text = jitted.lower(*sharded).as_text()
  got = jitted(*sharded)
errors = [float(np.linalg.norm(np.asarray(g) - np.asarray(w)) / np.linalg.norm(np.asarray(w)))
          for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
print(len(errors), max(errors) < 1e-5, 'shard_map' in text or 'sdy.manual_computation' in text)
"""


def assert_split_over_a_mesh_equals_one_device(setup: str, outputs: int) -> None:
  """A kernel's values and gradients under a mesh of 4 CPU devices (the first argument split
  over them, the rest replicated) against one device, under 1e-5, and the call a `shard_map`.

  Args:
    setup: Python defining `args` (arrays; numpy's `rng` is there) and `step(*args)` (the
      kernel's outputs and gradients), in Pallas's interpreter.
    outputs: how many arrays `step` returns.
  """
  lines = run_script(_MESH_HEAD + textwrap.dedent(setup) + _MESH_TAIL, with_libtpu=False)
  assert lines[0] == f'{outputs} True True'


# Python for the compile scripts: `in_hbm(text)` counts the kernels of a compiled TPU program whose
# every operand carries memory-space color 0, HBM (`common.in_hbm` of rmt_jax.kernels.tpu).
KERNELS_IN_HBM = """
import re
def in_hbm(text):
  calls = [l for l in text.split('\\n') if 'custom_call_target="tpu_custom_call"' in l]
  operands = lambda l: len(l.split(' custom-call(', 1)[1].split(')', 1)[0].split(', '))
  return sum(sorted(int(i) for i in re.findall(r'"operand_index":"(\\d+)","color":"0"', l))
             == list(range(operands(l))) for l in calls)
"""
# The head of a script that compiles for TPUs on this host (libtpu on the path), and the tail of
# `assert_kernels_compile_for_a_v5p_and_a_v4`'s.
COMPILE_HEAD = """
import os
os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD'] = '1'
import jax, jax.numpy as jnp, numpy as np
jax.config.update('jax_platforms', 'cpu')
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec
"""
_COMPILE_TAIL = KERNELS_IN_HBM + """
devices = topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x1').devices
v4 = topologies.get_topology_desc(platform='tpu', topology_name='v4:2x2x1').devices
for chip in (devices[0], v4[0]):
  one = Mesh(np.array([chip]), ('d',))
  for shape in SHAPES:
    text = jax.jit(step).lower(*args(one, PartitionSpec(), *shape)).compile().as_text()
    print(chip.device_kind, in_hbm(text), text.count('custom_call_target="tpu_custom_call"'))
mesh = Mesh(np.array(devices), ('data',))
def traced(*a):
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return step(*a)
text = jax.jit(traced).lower(*args(mesh, PartitionSpec('data'), *MESH_SHAPE)).compile().as_text()
print('sharded', text.count('custom_call_target="tpu_custom_call"'), 'all-gather' in text,
      LOCAL in text)
"""


def assert_kernels_compile_for_a_v5p_and_a_v4(setup: str, shapes, mesh_shape,
                                              local_array: str) -> None:
  """Mosaic compiles a kernel's forward and backward for one v5p chip and one v4 chip (16 MiB
  of VMEM) at each of `shapes`, every operand constrained to HBM (`common.in_hbm`), and for
  a 4-chip v5p mesh at `mesh_shape`, where each chip runs them on its share (`local_array`, e.g.
  'f32[56,14,64]', in the program) with no gathering.

  Args:
    setup: Python defining `step(*args)` (the kernel's outputs and gradients) and
      `args(mesh, x_spec, *shape)` (abstract arrays with shardings: x by `x_spec`).
    shapes: the one-chip shapes, each passed to `args`.
    mesh_shape: the mesh's shape, passed to `args`.
    local_array: an array of one chip's share, as the compiled program prints it.
  """
  lines = run_script(COMPILE_HEAD + textwrap.dedent(setup)
                     + f'SHAPES, MESH_SHAPE, LOCAL = {tuple(shapes)!r}, {tuple(mesh_shape)!r}, '
                       f'{local_array!r}\n' + _COMPILE_TAIL, with_libtpu=True)
  count = len(shapes)
  # Forward and backward kernel, for every shape on each chip, their operands kept in HBM.
  assert [line.split()[-2:] for line in lines[:2 * count]] == [['2', '2']] * 2 * count, lines
  assert 'v4' in lines[count] and 'v4' not in lines[0], lines
  assert lines[2 * count] == 'sharded 2 False True', lines
