"""The official model's parameter initialisers, and `init` drawing them all in one call.

Flax's `Module.init` gives every parameter tensor its own random-number call, and runs or
compiles the network's forward pass to find the shapes: eagerly, one small program compiled per
distinct shape; under `jax.jit`, one generator per tensor in one large program (RMT-S: ~360
random tensors). Either way the generators, not the network, are what `init` costs.

Every initialiser here is declared: a constant, or a scale times a fixed function (`standard`)
of uniform [0, 1) draws. `init_in_one_draw` traces the network once for shapes with a
placeholder for each declared tensor, makes all the draws with one call, applies each kind's
`standard` once to its share, and hands each tensor its scaled slice: the same distributions,
one generator, no forward pass. Called eagerly, the slices are cut on the host, so the only
compiled program is the generator's.
"""

import contextvars
import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# The placeholders of the trace in progress, or None outside `init_in_one_draw`.
_PLACEHOLDERS: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    'rmt_placeholders', default=None)


class _Declared:
  """An initialiser `(key, shape, dtype) -> array` that `init_in_one_draw` can fill in."""

  def value(self, key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    raise NotImplementedError

  def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
               ) -> jax.Array:
    shape = tuple(shape)
    placeholders = _PLACEHOLDERS.get()
    if placeholders is None:
      return self.value(key, shape, dtype)
    placeholder = jnp.zeros(shape, dtype)
    placeholders.append((placeholder, self, shape, jnp.dtype(dtype)))
    return placeholder


@dataclasses.dataclass(frozen=True)
class Constant(_Declared):
  """Every entry `fill` (zeros, ones, a layer scale's initial value)."""
  fill: float

  def value(self, key, shape, dtype):
    return jnp.full(shape, self.fill, dtype)

  def array(self, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """The initialiser without a key, for `Module.variable` (running statistics)."""
    return self(None, shape, dtype)


ZEROS, ONES = Constant(0.0), Constant(1.0)


class _FromUniform(_Declared):
  """`scale(shape)` times `standard(u)`, u drawn uniformly from [0, 1). Initialisers of one
  `kind` share one evaluation of `standard` in `init_in_one_draw`."""

  def standard(self, u: jax.Array) -> jax.Array:
    raise NotImplementedError

  def scale(self, shape: tuple[int, ...]) -> float:
    raise NotImplementedError

  def kind(self) -> tuple:
    """What decides `standard`."""
    return (type(self).standard,)

  def value(self, key, shape, dtype):
    u = jax.random.uniform(key, shape, jnp.float32)
    return (self.standard(u) * np.float32(self.scale(shape))).astype(dtype)


class _Symmetric(_FromUniform):
  """U(-scale, scale)."""

  def standard(self, u):
    return 2.0 * u - 1.0


@dataclasses.dataclass(frozen=True)
class Uniform(_Symmetric):
  """U(-bound, bound); PyTorch's default conv bias init is bound = 1 / sqrt(fan_in)."""
  bound: float

  def scale(self, shape):
    return self.bound


@dataclasses.dataclass(frozen=True)
class FanInUniform(_Symmetric):
  """PyTorch's default Conv2d / Linear weight init, kaiming_uniform(a=sqrt(5)):
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in the product of all but the last (output) axis
  of a flax kernel (HWIO or (in, out))."""

  def scale(self, shape):
    return 1.0 / math.sqrt(math.prod(shape[:-1]))


@dataclasses.dataclass(frozen=True)
class TruncatedNormal(_FromUniform):
  """`stddev` times a standard normal truncated to [lower, upper], by the inverse CDF, as
  `jax.random.truncated_normal` draws it (flax's `initializers.truncated_normal`)."""
  stddev: float
  lower: float = -2.0
  upper: float = 2.0

  def standard(self, u):
    a, b = (math.erf(t / math.sqrt(2.0)) for t in (self.lower, self.upper))
    x = math.sqrt(2.0) * jax.lax.erf_inv(a + (b - a) * u)
    return jnp.clip(x, np.nextafter(np.float32(self.lower), np.float32(np.inf)),
                    np.nextafter(np.float32(self.upper), np.float32(-np.inf)))

  def scale(self, shape):
    return self.stddev

  def kind(self):
    return (type(self).standard, self.lower, self.upper)


def _places(declared: list) -> tuple[list[list[int]], list[tuple | None]]:
  """Where each of `declared` ((initialiser, shape) pairs) lies in the draws: the entries of
  each kind of `_FromUniform`, and for each entry (segment, offset, size) or None (a
  constant)."""
  kinds: dict[tuple, list[int]] = {}
  for i, (initializer, _) in enumerate(declared):
    if isinstance(initializer, _FromUniform):
      kinds.setdefault(initializer.kind(), []).append(i)
  places = [None] * len(declared)
  for segment, members in enumerate(kinds.values()):
    offset = 0
    for i in members:
      size = math.prod(declared[i][1])
      places[i] = (segment, offset, size)
      offset += size
  return list(kinds.values()), places


def _standard_draws(key: jax.Array, declared: tuple) -> list[jax.Array]:
  """One uniform draw for every `_FromUniform` of `declared`, one segment per kind, each
  through its kind's `standard`."""
  groups, _ = _places(declared)
  sizes = [sum(math.prod(declared[i][1]) for i in members) for members in groups]
  u = jax.random.uniform(key, (sum(sizes),))
  starts = np.cumsum([0, *sizes]).tolist()
  return [declared[members[0]][0].standard(u[starts[j]:starts[j + 1]])
          for j, members in enumerate(groups)]


def _values(segments: list, declared: list, xp: Any) -> list:
  """Each declared tensor ((initialiser, shape, dtype) triples) from the segments, with `xp`
  (jax.numpy in a trace, numpy on the host)."""
  _, places = _places([d[:2] for d in declared])
  values = []
  for (initializer, shape, dtype), place in zip(declared, places):
    if place is None:
      values.append(xp.full(shape, initializer.fill, dtype))
      continue
    segment, offset, size = place
    block = segments[segment][offset:offset + size].reshape(shape)
    values.append((block * np.float32(initializer.scale(shape))).astype(dtype))
  return values


class _Traced:
  """`init` traced with a placeholder for each declared tensor, as a function of the rngs.

  Calling it returns the variables, each declared one a slice of one draw; afterwards `slots`
  holds, per variable leaf, its placeholder's index (None: not declared) and `declared` the
  declared leaves' (initialiser, shape, dtype).
  """

  def __init__(self, init: Callable[..., Any], args: tuple, kwargs: dict):
    leaves, self._treedef = jax.tree.flatten((args, kwargs), is_leaf=is_array)
    # Array arguments by shape only: their values never reach a variable.
    self._leaves = [jax.ShapeDtypeStruct(a.shape, a.dtype) if is_array(a) else a
                    for a in leaves]
    self._init = init
    self.treedef, self.slots, self.declared = None, [], []

  def __call__(self, rngs: Any) -> Any:
    placeholders = []
    token = _PLACEHOLDERS.set(placeholders)
    try:
      inputs = [jnp.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) else a
                for a in self._leaves]
      args, kwargs = jax.tree.unflatten(self._treedef, inputs)
      variables = self._init(rngs, *args, **kwargs)
    finally:
      _PLACEHOLDERS.reset(token)
    slot = {id(p[0]): i for i, p in enumerate(placeholders)}
    leaves, self.treedef = jax.tree.flatten(variables)
    self.slots = [slot.get(id(leaf)) for leaf in leaves]
    self.declared = [placeholders[i][1:] for i in self.slots if i is not None]
    values = iter(_values(_standard_draws(_draw_key(rngs, self.declared),
                                          [d[:2] for d in self.declared]), self.declared, jnp))
    return jax.tree.unflatten(self.treedef, [leaf if i is None else next(values)
                                             for leaf, i in zip(leaves, self.slots)])


def is_array(a: Any) -> bool:
  """An argument that matters by shape and dtype: a jax or numpy array, a tracer, or a
  `jax.ShapeDtypeStruct`."""
  return hasattr(a, 'shape') and hasattr(a, 'dtype')


def _draw_key(rngs: Any, declared: list) -> jax.Array:
  key = rngs['params'] if isinstance(rngs, Mapping) else rngs
  return jax.random.fold_in(key, len(declared))


def init_in_one_draw(init: Callable[..., Any], rngs: Any, *args: Any, **kwargs: Any) -> Any:
  """`init(rngs, *args, **kwargs)` (a flax `Module.init`) with every declared initialiser's
  tensor drawn from one random call and no forward pass computed.

  Array arguments matter only by shape and dtype (jax or numpy arrays, or
  `jax.ShapeDtypeStruct`s). Variables made by other initialisers (`undeclared_variables`: a
  module of the user's) are computed as flax computes them, in a compiled program; so are all
  of them inside a trace (`jax.jit(model.init)`).

  Args:
    init: the bound `nn.Module.init` of the module.
    rngs: a PRNG key, or a dict of them with a 'params' entry.
    *args: the init's positional arguments (images, flags).
    **kwargs: the init's keyword arguments (`method`, `mutable`, `train`, ...).

  Returns:
    The variables, as `init` returns them.
  """
  traced = _Traced(init, args, kwargs)
  if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((rngs, args, kwargs))):
    return traced(rngs)
  jax.eval_shape(traced, rngs)
  if None in traced.slots:
    return jax.jit(traced)(rngs)
  # Every variable is declared: the generator is the only program; the host cuts the slices.
  declared = [d[:2] for d in traced.declared]
  segments = jax.jit(_standard_draws, static_argnums=1)(_draw_key(rngs, declared),
                                                        tuple(declared))
  values = _values([np.asarray(s) for s in segments], traced.declared, np)
  return jax.tree.unflatten(traced.treedef, [jnp.asarray(v) for v in values])


def undeclared_variables(init: Callable[..., Any], rngs: Any, *args: Any, **kwargs: Any
                         ) -> list[str]:
  """The variables of `init(rngs, *args, **kwargs)` (a flax `Module.init`) that no declared
  initialiser made, which `init_in_one_draw` computes in a compiled program as flax does;
  paths as `jax.tree_util.keystr` writes them."""
  traced = _Traced(init, args, kwargs)
  variables = jax.eval_shape(traced, rngs)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables)]
  return [path for path, i in zip(paths, traced.slots) if i is None]
