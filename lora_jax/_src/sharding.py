"""Shardings for adapter factors, derived from their kernel's sharding.

A kernel ``w`` with axis roles (``s`` stacked, ``i`` in, ``o`` out) has
factors ``a: stack + in + (r,)`` and ``b: stack + (r,) + out``. Each factor
axis takes the sharding of the kernel axis it stands for; the rank axis is
replicated::

  w: P('layers', None, 'model')  roles "sio"
  a: P('layers', None, None)     b: P('layers', None, 'model')

So a tensor-parallel layer stays tensor-parallel: for a column-parallel
kernel (out axis sharded) ``x @ a`` needs no communication and ``(x a) @ b``
comes out sharded like ``x @ w``; for a row-parallel kernel (in axis sharded)
``x @ a`` is a partial sum reduced over a ``(tokens, r)`` array, small next
to the ``(tokens, out)`` reduction ``x @ w`` already does. No kernel-sized
array is gathered.

The mapping is positional, so it works on mesh ``PartitionSpec``s, on
``NamedSharding``s and on Flax *logical* specs alike.
"""

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from lora_jax._src import explicit, quant_sharding, tree
from lora_jax._src.types import Params
from lora_jax._src.weight import LoraWeight, Trainable, is_node


def factor_specs(spec: PartitionSpec, roles: str) -> tuple[PartitionSpec, PartitionSpec]:
  """The ``PartitionSpec``s of ``a`` and ``b`` for a kernel spec and roles.

  Args:
    spec: the kernel's spec (mesh axes or Flax logical axis names); a spec
      shorter than the kernel is padded with ``None`` (replicated).
    roles: one of ``s``/``i``/``o`` per kernel axis.

  Returns:
    ``(a_spec, b_spec)``: stack + in + (None,) and stack + (None,) + out.

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> from lora_jax._src.sharding import factor_specs
    >>> a, b = factor_specs(P('layers', None, 'model'), 'sio')
    >>> a == P('layers', None, None), b == P('layers', None, 'model')
    (True, True)
  """
  entries = tuple(spec)
  if len(entries) > len(roles):
    raise ValueError(f"factor_specs: spec {spec} has {len(entries)} entries but "
                     f"the kernel's layout {roles!r} has {len(roles)} axes")
  entries += (None,) * (len(roles) - len(entries))
  pick = lambda role: tuple(e for e, r in zip(entries, roles) if r == role)
  stack, ins, outs = pick("s"), pick("i"), pick("o")
  return PartitionSpec(*stack, *ins, None), PartitionSpec(*stack, None, *outs)


def factor_shardings(sharding: Any, roles: str) -> tuple[Any, Any]:
  """Shardings of ``a`` and ``b`` derived from the kernel's ``sharding``.

  Args:
    sharding: a ``NamedSharding``, a ``PartitionSpec`` (mesh or logical
      axes), a ``SingleDeviceSharding`` (kept as is), or ``None``.
    roles: the kernel's axis roles.

  Returns:
    ``(a_sharding, b_sharding)`` of the same kind as ``sharding``.

  Example:
    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> from lora_jax._src.sharding import factor_shardings
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> a, b = factor_shardings(NamedSharding(mesh, P(None, "model")), "io")
    >>> a.spec == P(None, None), b.spec == P(None, 'model')
    (True, True)
  """
  if sharding is None or isinstance(sharding, SingleDeviceSharding):
    return sharding, sharding
  if isinstance(sharding, PartitionSpec):
    return factor_specs(sharding, roles)
  if isinstance(sharding, NamedSharding):
    return tuple(NamedSharding(sharding.mesh, s, memory_kind=sharding.memory_kind)
                 for s in factor_specs(sharding.spec, roles))
  if isinstance(sharding, jax.sharding.Sharding) and sharding.is_fully_replicated:
    return sharding, sharding
  raise TypeError(
      f"factor_shardings: cannot derive adapter shardings from a "
      f"{type(sharding).__name__}; give the kernel a NamedSharding "
      "(jax.sharding.NamedSharding(mesh, PartitionSpec(...))) or a PartitionSpec")


def place_factors(w, a, b, roles: str):
  """``(a, b)`` placed to follow ``w``'s sharding (called by ``lora_init``).

  A QuantizedWeight's factors follow the kernel it stands for (its sharding
  read from the codes, ``quant_sharding.kernel_sharding``).

  A concrete ``w`` with a ``NamedSharding`` (or on a single device) gets its
  factors put with the derived shardings. Under a trace (``lora_init`` inside
  ``jax.jit``), a ``w`` typed with an explicit-axes sharding gets its factors
  resharded to match; otherwise the factors are left to the compiler and the
  caller's ``out_shardings`` (see ``lora_shardings``).
  """
  if hasattr(w, "codes"):  # a QuantizedWeight: the kernel's sharding, read from its codes
    sharding = quant_sharding.kernel_sharding(w)  # None for traced codes
  elif isinstance(w, jax.core.Tracer):
    return _reshard_traced(w, a, b, roles)
  else:
    sharding = getattr(w, "sharding", None) if isinstance(w, jax.Array) else None
    if isinstance(sharding, SingleDeviceSharding) and not w.committed:
      return a, b  # an uncommitted kernel leaves its factors free to move too
  if not isinstance(sharding, (NamedSharding, SingleDeviceSharding)):
    return a, b
  sa, sb = factor_shardings(sharding, roles)
  return jax.device_put(a, sa), jax.device_put(b, sb)


def _reshard_traced(w, a, b, roles: str):
  """Explicit-sharding mode: the traced ``w`` carries its spec in its type."""
  sharding = getattr(jax.typeof(w), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or all(e is None for e in sharding.spec):
    return a, b
  explicit = jax.sharding.AxisType.Explicit
  used = {n for e in sharding.spec if e is not None
          for n in (e if isinstance(e, tuple) else (e,))}
  if any(mesh._name_to_type[n] != explicit for n in used):
    return a, b
  sa, sb = factor_specs(sharding.spec, roles)
  return (jax.sharding.reshard(a, NamedSharding(mesh, sa)),
          jax.sharding.reshard(b, NamedSharding(mesh, sb)))


# ------------------------------------------------- sharding trees for jax.jit

def _is_box(x) -> bool:
  """A Flax metadata box: Linen ``nn.Partitioned`` or an NNX ``Variable``."""
  from flax import nnx
  from flax.core import meta
  return isinstance(x, (meta.AxisMetadata, nnx.Variable))


def _box_spec(box) -> PartitionSpec:
  from flax import nnx
  from flax.core import meta
  from flax.nnx import spmd
  if isinstance(box, nnx.Variable):
    return spmd.get_var_pspec(box)
  return meta.get_partition_spec(box)


def _box_value(box):
  from flax import nnx
  return box.get_raw_value() if isinstance(box, nnx.Variable) else box.unbox(
      apply_constraint=False)


def _rebox(box, value):
  from flax import nnx
  return box.replace(value) if isinstance(box, nnx.Variable) else box.replace_boxed(value)


def _own_sharding(x):
  """The sharding a leaf carries (arrays, ShapeDtypeStructs), else None."""
  if isinstance(x, (PartitionSpec, jax.sharding.Sharding)):
    return x
  if isinstance(x, jax.core.Tracer):
    return None
  if hasattr(x, "codes"):  # a QuantizedWeight: its kernel's sharding, read from the codes
    return quant_sharding.kernel_sharding(x)
  return getattr(x, "sharding", None)


def _is_sharding_leaf(x) -> bool:
  return (x is None or isinstance(x, (PartitionSpec, jax.sharding.Sharding))
          or is_node(x))


def _node_shardings(path: str, x, given: dict, default):
  """The sharding tree for one leaf / LoraWeight / Trainable of the params.

  ``default`` is the box's spec, ``PartitionSpec()`` for an unannotated leaf
  of a spec tree, or None: then the leaf's own ``.sharding``.
  """
  own = lambda leaf: given.get(path, default if default is not None else
                               _own_sharding(leaf))
  if isinstance(x, LoraWeight):
    ws = own(x.w)
    try:
      explicit.check_divides(f"lora_shardings: at {path}", getattr(x.w, "shape", None), ws)
      sa, sb = factor_shardings(ws, x.roles)
    except (TypeError, ValueError) as e:
      if str(e).startswith("lora_shardings"):
        raise
      raise type(e)(f"lora_shardings: at {path}: {e}") from None
    return x.replace(w=ws, a=sa, b=sb)
  if isinstance(x, Trainable):
    s = own(x.value)
    return Trainable(s, s)
  return own(x)


def lora_shardings(lora_params: Params, base: Any = None) -> Params:
  """The sharding tree of LoRA params, for ``jax.jit(in_/out_shardings=...)``.

  Every ``LoraWeight(w, a, b)`` becomes ``LoraWeight(w=s_w, a=s_a, b=s_b)``
  where ``s_a`` / ``s_b`` are derived from the kernel's ``s_w`` (see
  ``factor_specs``); ``Trainable`` leaves get their base leaf's sharding
  twice, other leaves their own. The kind of each leaf is kept: give
  ``NamedSharding`` leaves and get ``NamedSharding`` leaves, give (mesh or Flax
  logical) ``PartitionSpec`` leaves and get ``PartitionSpec`` leaves.

  Where the kernels' shardings come from, first match wins:

  1. ``base``: a tree shaped like the *original* params (before
     ``lora_init``) of shardings, ``PartitionSpec``s, arrays or
     ``ShapeDtypeStruct``s, e.g. ``nn.get_partition_spec(boxed_params)``,
     ``nnx.get_partition_spec(state)`` or ``jax.tree.map(lambda x:
     x.sharding, params)``; matched by '/'-joined path.
  2. Flax metadata boxes in ``lora_params`` (Linen ``nn.Partitioned`` around
     a kernel, an NNX ``Variable`` with ``sharding_names``): their spec is the
     kernel's. Use this, not ``nn.get_partition_spec(lora_params)``, which
     gives ``a`` and ``b`` the kernel's spec unchanged.
  3. The leaves' own ``.sharding`` (concrete arrays, ``ShapeDtypeStruct``).

  Args:
    lora_params: the output of ``lora_init``, concrete or abstract (e.g.
      ``jax.eval_shape(lambda: lj.lora_init(key, params, config))``).
    base: optional shardings of the original params, as above.

  Returns:
    A tree with ``lora_params``' structure (boxes kept) holding shardings.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from jax.sharding import PartitionSpec as P
    >>> from lora_jax._src.sharding import lora_shardings
    >>> params = {"up": {"kernel": jnp.ones((8, 16))}}
    >>> lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=2))
    >>> s = lora_shardings(lp, base={"up": {"kernel": P(None, "model")}})
    >>> s["up"]["kernel"].a == P(None, None), s["up"]["kernel"].b == P(None, "model")
    (True, True)
  """
  given = {}
  if base is not None:
    given = {path: _own_sharding(x)
             for path, x in tree.flatten(base, is_leaf=_is_sharding_leaf)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      lora_params, is_leaf=lambda x: is_node(x) or _is_box(x))
  # A tree of specs (Flax boxes, or a base of PartitionSpecs): leaves with no
  # annotation are replicated, P(), as in Flax's get_partition_spec.
  specs = (any(_is_box(x) for _, x in leaves)
           or any(isinstance(s, PartitionSpec) for s in given.values()))
  plain = PartitionSpec() if specs else None
  out = []
  for key_path, x in leaves:
    path = tree.path_str(key_path)
    if _is_box(x):
      spec = _box_spec(x)
      out.append(_rebox(x, _node_shardings(path, _box_value(x), given, spec)))
    else:
      out.append(_node_shardings(path, x, given, plain))
  return jax.tree_util.tree_unflatten(treedef, out)
