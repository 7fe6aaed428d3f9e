"""The entry points that RMT's classifier and detection backbone share: `init` and `apply`
fast on first use.

Called eagerly, flax's `init` and `apply` trace the network and run it one operation at a
time, each operation compiled on its own the first time it meets a shape; `init` also draws each
parameter tensor with its own generator. `Network.init` draws every parameter in one call
(`initializers.init_in_one_draw`); `Network.apply`, called eagerly, runs as one compiled program,
cached per module, argument shapes and settings, as `jax.jit(model.apply)` would. Inside a
trace (a user's `jax.jit`, `jax.grad`) both are flax's own. Under `jax.disable_jit()` `apply`
runs operation by operation, for stepping through the model in a debugger.
"""

import functools
from typing import Any

import flax.linen as nn
import jax

from rmt_jax.models import initializers


@functools.partial(jax.jit, static_argnums=(0, 2))
def _compiled_apply(module: nn.Module, arrays: list, settings: tuple) -> Any:
  """`nn.Module.apply(module, *args, **kwargs)`, its array leaves traced, the rest static."""
  treedef, static = settings
  leaves = [a if s is _ARRAY else s for a, s in zip(arrays, static)]
  variables, args, kwargs = jax.tree.unflatten(treedef, leaves)
  return nn.Module.apply(module, variables, *args, **kwargs)


# Stands in `settings` for an array leaf (arrays go through `arrays`).
_ARRAY = object()


class Network(nn.Module):
  """A flax module whose `init` and `apply` are fast on first use (see the module docstring)."""

  @nn.nowrap
  def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
    """`nn.Module.init`, every parameter drawn by one random call and no forward pass
    computed; array arguments matter by shape and dtype only."""
    return initializers.init_in_one_draw(super().init, rngs, *args, **kwargs)

  @nn.nowrap
  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """`nn.Module.apply`; called eagerly, as one compiled program (see the module docstring)."""
    leaves, treedef = jax.tree.flatten((variables, args, kwargs),
                                       is_leaf=initializers.is_array)
    static = tuple(_ARRAY if initializers.is_array(a) else a for a in leaves)
    traced = any(isinstance(a, jax.core.Tracer) for a in leaves)
    try:
      hash((self, static))
    except TypeError:  # a setting without a hash (a list-valued field): flax's own
      traced = True
    if traced or jax.config.jax_disable_jit:
      return super().apply(variables, *args, **kwargs)
    arrays = [a if initializers.is_array(a) else None for a in leaves]
    return _compiled_apply(self, arrays, (treedef, static))
