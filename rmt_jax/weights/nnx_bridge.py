"""RMT for flax.nnx users: the Linen model wrapped by flax's own bridge, `nnx.bridge.ToNNX`.

    import rmt_jax
    from rmt_jax.weights import nnx_bridge

    model, variables = rmt_jax.load('weights/rmt_s')                  # or create_model(...)
    net = nnx_bridge.to_nnx(model, images[:1], variables=variables)   # an nnx.Module
    logits = net(images)                                              # eval mode
    logits = net(images, train=True, mutable=['batch_stats'])   # training: the BatchNorm
        # statistics update in place; drop path draws from the module's 'dropout' stream

The wrapper holds the Linen variables as NNX state: `params` as `nnx.Param` and `batch_stats`
as `nnx.BatchStat`, at the same paths, so `nnx.grad`, `nnx.Optimizer(net, tx, wrt=nnx.Param)`
and `nnx.jit` work on it; `from_nnx` hands the variables back for `model.apply` or
`rmt_jax.weights.checkpoint.save_variables`. Nothing is re-implemented: the computation is the Linen
model's, so every parity test of the model holds.
"""

from typing import Any, Mapping

from flax import nnx
from flax import traverse_util
import jax

from rmt_jax.models import RMT

# NNX variable types of the Linen collections the model has.
_COLLECTIONS = {nnx.Param: 'params', nnx.BatchStat: 'batch_stats'}


def to_nnx(model: RMT, sample_input: jax.Array, *, variables: Mapping[str, Any] | None = None,
           seed: int = 0) -> nnx.Module:
  """The model as an NNX module, initialised, with `variables` in it when given.

  Args:
    model: an RMT from `create_model` or `rmt_jax.load`.
    sample_input: an NHWC batch (one image is enough): it fixes the variables' shapes.
    variables: {'params', 'batch_stats'} to put in (e.g. loaded weights); None keeps the
      fresh initialisation.
    seed: of the initialisation and of the 'dropout' stream (drop path in training).

  Returns:
    `nnx.bridge.ToNNX(model)`: call it as the model, `net(images, train=False)`.

  Raises:
    ValueError: `variables` lack one of the module's variables or hold it in another shape.
  """
  @nnx.jit
  def create(images):
    # Under jit: the bridge initialises by running the model, which eagerly costs seconds.
    net = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(seed, dropout=seed + 1))
    nnx.bridge.lazy_init(net, images)
    return net

  net = create(sample_input)
  if variables is not None:
    flat = {collection: traverse_util.flatten_dict(dict(variables.get(collection, {})))
            for collection in _COLLECTIONS.values()}
    state = nnx.state(net, nnx.Any(*_COLLECTIONS))
    for path, leaf in state.flat_state():
      collection = _collection(leaf)
      value = flat[collection].get(tuple(path))
      if value is None or tuple(value.shape) != tuple(leaf.get_value().shape):
        got = 'missing' if value is None else f'shape {tuple(value.shape)}'
        raise ValueError(f"{collection}/{'/'.join(map(str, path))}: {got}, the model has "
                         f'shape {tuple(leaf.get_value().shape)}')
      leaf.set_value(jax.numpy.asarray(value, leaf.get_value().dtype))
    nnx.update(net, state)
  return net


def from_nnx(net: nnx.Module) -> dict[str, Any]:
  """The Linen variables {'params', 'batch_stats'} of a `to_nnx` module (e.g. after training
  it with NNX), for `model.apply` or `checkpoint.save_variables`."""
  out: dict[str, dict] = {collection: {} for collection in _COLLECTIONS.values()}
  for path, leaf in nnx.state(net, nnx.Any(*_COLLECTIONS)).flat_state():
    out[_collection(leaf)][tuple(path)] = leaf.get_value()
  return {k: traverse_util.unflatten_dict(v) for k, v in out.items()}


def _collection(leaf: Any) -> str:
  """The Linen collection of an NNX state leaf (a Variable or its state)."""
  kind = getattr(leaf, 'type', type(leaf))
  return next(name for cls, name in _COLLECTIONS.items() if issubclass(kind, cls))
