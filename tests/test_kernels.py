"""The `kernels` field: how it resolves, and that every form computes the same network.

The single operations' CPU forms are tested against their definitions in test_cpu_forms.py and
each form's parity with the official outputs in test_model.py; here the whole network's
gradients under each form are compared, and 'auto' is shown to follow the devices in context
(the context mesh's, else the default backend's).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import relative_error
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
