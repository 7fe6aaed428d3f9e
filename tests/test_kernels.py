"""The `kernels` field: how it resolves, and that every form computes the same network.

The single operations' CPU forms are tested against their definitions in test_cpu_forms.py and
each form's parity with the official outputs in test_model.py; here the whole network's
gradients under each form are compared, and 'auto' (and the TPU kernels' VMEM budget) is shown
to follow the devices in context (the context mesh's, else the default backend's).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import needs_libtpu
from conftest import relative_error
from kernel_checks import COMPILE_HEAD
from kernel_checks import run_script
from rmt_jax.models import create_model
from rmt_jax.kernels import selection as kernels


def test_auto_takes_the_form_of_the_devices_in_context():
  def forms(x):
    return kernels.select('auto', x, xla=lambda x: 2 * x, cpu=lambda x: 3 * x,
                          tpu=lambda x: 5 * x)

  assert float(jax.jit(forms)(jnp.float32(1.0))) == 3.0  # this host's CPU
  # Only the resolved form is traced: 'auto' costs no more tracing than naming the form.
  assert str(jax.make_jaxpr(forms)(1.0)).count('mul') == 1
  # Under a mesh of other devices (as when compiling ahead of time for a TPU slice), theirs.
  for platform, factor in (('tpu', 5.0), ('cuda', 2.0)):
    device = jax.sharding.AbstractDevice(device_kind=platform, num_cores=None,
                                         platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ('data',), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
      assert kernels.for_context() == kernels.for_platform(platform)
      text = str(jax.make_jaxpr(forms)(1.0))
    assert f'{factor}' in text and '3.0' not in text, text


def test_the_vmem_budget_follows_the_chip_traced_for():
  from rmt_jax.kernels.tpu import block_tail, common  # pylint: disable=g-import-not-at-top
  mib = 1024 * 1024

  def on(device_kind):
    mesh = jax.sharding.AbstractMesh((1,), ('d',), abstract_device=jax.sharding.AbstractDevice(
        device_kind, 2, 'tpu'))
    with jax.sharding.use_abstract_mesh(mesh):
      # RMT-S's stage-4 second half at 64 images a chip: its weights and their float32
      # gradients fit a v5p's budget, not a v4's.
      return common.limit(), common.budget(), block_tail.fits_vmem((64, 7, 7, 512), 1536, 2, 4)

  assert on('TPU v4') == (16 * mib, 14 * mib, False)
  assert on('TPU v5') == (48 * mib, 46 * mib, True)
  assert on('TPU v6 lite')[:2] == (64 * mib, 62 * mib)
  assert on('a chip not named') == (16 * mib, 14 * mib, False)
  assert common.chip() is None and common.limit() == 16 * mib  # the interpreter (a CPU host)


def test_explicit_forms_and_resolution():
  assert kernels.select('xla', 1.0, xla=lambda x: 'plain', cpu=lambda x: 'cpu') == 'plain'
  assert kernels.select('cpu', 1.0, xla=lambda x: 'plain', cpu=lambda x: 'cpu') == 'cpu'
  assert kernels.select('tpu', 1.0, xla=lambda x: 'plain', cpu=lambda x: 'cpu',
                        tpu=lambda x: 'tpu') == 'tpu'
  # An operation without a TPU form takes the plain one.
  assert kernels.select('tpu', 1.0, xla=lambda x: 'plain', cpu=lambda x: 'cpu') == 'plain'
  assert kernels.for_platform('cpu') == 'cpu'
  assert kernels.for_platform('tpu') == 'tpu'
  assert kernels.for_platform('cuda') == kernels.for_platform('rocm') == 'xla'
  assert kernels.for_devices(jax.devices()) == 'cpu'
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  assert kernels.for_devices(mesh) == 'cpu'
  with pytest.raises(ValueError, match="kernels must be one of 'auto', 'xla', 'cpu', 'tpu'; got 'gpu'"):
    kernels.select('gpu', 1.0, xla=lambda x: x, cpu=lambda x: x)
  with pytest.raises(ValueError, match='kernels must be one of'):
    create_model('rmt_tiny', kernels='fast').init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_every_form_gives_the_same_training_gradients():
  # 'auto' on this CPU host is the CPU forms; whole-network gradients are what this adds to
  # test_cpu_forms.py.
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  base = create_model('rmt_tiny', num_classes=10)
  variables = base.init(jax.random.key(0), images)
  # Weights of O(1/sqrt(fan in)) everywhere, so that no path of the network is near zero at
  # init (q and k are, with the official init: their gradients would be ~1e-8).
  leaves, treedef = jax.tree.flatten(variables['params'])
  rng = np.random.default_rng(1)
  variables = {**variables, 'params': jax.tree.unflatten(treedef, [
      jnp.asarray(rng.normal(size=x.shape) / np.sqrt(max(x.shape[0] if x.ndim > 1 else 4, 4)),
                  jnp.float32) for x in leaves])}

  def loss(params, model):
    logits, _ = model.apply({**variables, 'params': params}, images, train=True,
                            mutable=['batch_stats'])
    return jnp.sum(logits * jnp.arange(10.0))  # a cotangent that is not all ones

  grads = {form: jax.jit(jax.grad(loss), static_argnums=1)(variables['params'],
                                                          base.clone(kernels=form))
           for form in ('xla', 'auto')}
  flat = {form: {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(g)}
          for form, g in grads.items()}
  # Per tensor, errors are relative to the tensor's gradient floored at 1e-2 of the largest
  # one: some true gradients are zero or sums of terms that nearly cancel (a conv bias feeding
  # a BatchNorm, k's bias under the softmax's shift invariance broken only by the rotary
  # shift, last-stage biases whose shift the head's BatchNorm removes), where float32 leaves
  # noise set by the size of the terms rather than of their sum.
  scale = max(float(jnp.linalg.norm(g)) for g in flat['xla'].values())
  for form in grads.keys() - {'xla'}:
    assert flat[form].keys() == flat['xla'].keys()
    assert relative_error(np.concatenate([np.ravel(g) for g in flat[form].values()]),
                          np.concatenate([np.ravel(g) for g in flat['xla'].values()])) < 1e-6
    for path, want in flat['xla'].items():
      error = float(jnp.linalg.norm(flat[form][path] - want))
      assert error < 1e-5 * max(float(jnp.linalg.norm(want)), 1e-2 * scale), (form, path)


# A plain `jax.jit` of arrays with NamedShardings over several devices and no context mesh (how
# most JAX code shards a batch): the TPU forms' kernels, which XLA cannot partition, take the
# mesh from their operands' types (`kernels.tpu.common.mesh_of`).
_FOUR_CPUS = '''
import os
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
'''
_NO_CONTEXT_MESH = '''
from configs import tiny_test
from rmt_jax.train import steps
config = tiny_test.get_config()
config.kernels = 'tpu'
model = steps.build_model(config)
images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 3)), jnp.float32)
variables = model.init(jax.random.key(0), images[:1], train=False)
def loss(params, images):
  logits = model.apply({**variables, 'params': params}, images, train=False)
  return jnp.sum(logits * jnp.arange(logits.shape[-1])), logits
step = jax.jit(jax.value_and_grad(loss, has_aux=True))
'''


def test_tpu_forms_under_a_plain_jit_of_sharded_arrays_equal_one_device():
  # The interpreter stands in for the chip: four CPU devices, the batch's NamedSharding on the
  # arrays, no `jax.set_mesh`; each kernel runs in a shard_map over the operands' mesh.
  lines = run_script(_FOUR_CPUS + _NO_CONTEXT_MESH + '''
(_, want_logits), want_grads = step(variables['params'], images)
mesh = Mesh(np.array(jax.devices()), ('data',))
sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec('data')))
params = jax.device_put(variables['params'], NamedSharding(mesh, PartitionSpec()))
assert jax.sharding.get_abstract_mesh().empty
text = step.lower(params, sharded).as_text()
(_, logits), grads = step(params, sharded)
errors = [float(np.linalg.norm(np.asarray(g) - np.asarray(w)) / np.linalg.norm(np.asarray(w)))
          for g, w in zip(jax.tree.leaves((logits, grads)), jax.tree.leaves((want_logits, want_grads)))]
print(max(errors) < 1e-5, text.count('sdy.manual_computation') > 0)
''', with_libtpu=False)
  assert lines[0] == 'True True', lines


@needs_libtpu
def test_a_plain_jit_over_a_v5p_slice_compiles_or_names_the_fix():
  # Ahead of time for v5p:2x2x1 (Mosaic, not the interpreter): a jit of ShapeDtypeStructs with
  # NamedShardings compiles, forward and backward, the kernels per chip; a jit whose inputs
  # carry no sharding and get it from `in_shardings` leaves the kernels no mesh to read and
  # stops with the project's one line, before Mosaic's own error.
  lines = run_script(COMPILE_HEAD + _NO_CONTEXT_MESH.replace(
      "config.kernels = 'tpu'", "config.kernels = 'tpu'\nconfig.dtype = 'bfloat16'") + '''
from rmt_jax.kernels.tpu import common
mesh = Mesh(np.array(topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x1')
                     .devices), ('data',))
batch, whole = NamedSharding(mesh, PartitionSpec('data')), NamedSharding(mesh, PartitionSpec())
struct = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
params = jax.tree.map(lambda a: struct(a, whole), variables['params'])
text = step.lower(params, struct(images, batch)).compile().as_text()
print(text.count('custom_call_target="tpu_custom_call"') > 0, 'all-gather' in text)
in_shardings = jax.jit(jax.value_and_grad(loss, has_aux=True), in_shardings=(whole, batch))
try:
  in_shardings.lower(jax.tree.map(lambda a: struct(a, None), variables['params']),
                     struct(images, None)).compile()
  print('compiled')
except ValueError as e:
  print(str(e) == common.SHARDING_UNKNOWN.format(devices=4), '\\n' not in str(e))
''', with_libtpu=True)
  assert lines[:2] == ['True False', 'True True'], lines
