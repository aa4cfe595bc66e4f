"""Explicit-axes sharding (``AxisType.Explicit``): the shardings lora_jax names.

On a mesh whose axes are explicit, every array's type carries its sharding
(``jax.typeof(x).sharding``) and an operation whose output sharding is
ambiguous (a matmul contracting a sharded axis, a gather, a reshape that
splits a sharded axis) must be told it. These helpers compute what lora_jax
tells it:

* ``stand_in``: the abstract value ``lora()`` traces the model with, in place
  of a LoraWeight's kernel, typed with the kernel's sharding, so the traced
  jaxpr is the one the model would have on the real kernel.
* ``factored_dot_shardings``: the output shardings of the two small matmuls
  of ``x·W + s·((x·A)·B)``: ``x·A`` keeps the base product's sharding on the
  axes it shares with it and the rank axis replicated; ``(x·A)·B`` gets the
  base product's sharding. So a row-parallel kernel (contraction over a
  sharded axis) reduces only a ``(tokens, r)`` array, and no kernel-sized
  array is ever gathered.

On an auto (or no) mesh both return ``None``: the compiler chooses, as before.
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec


def explicit_sharding(x):
  """``x``'s ``NamedSharding`` if its type names an explicit mesh axis, else None.

  Works on tracers and concrete arrays alike (``jax.typeof``).
  """
  try:
    s = getattr(jax.typeof(x), "sharding", None)
  except TypeError:
    return None
  mesh = getattr(s, "mesh", None)
  if not isinstance(s, NamedSharding) or mesh is None or mesh.empty:
    return None
  explicit = jax.sharding.AxisType.Explicit
  if not any(t == explicit for t in mesh.axis_types):
    return None
  return s


def used_axes(spec) -> set:
  """The mesh axis names a ``PartitionSpec`` uses."""
  return {n for e in spec if e is not None for n in (e if isinstance(e, tuple) else (e,))}


def stand_in(w) -> jax.ShapeDtypeStruct:
  """An abstract array of ``w``'s shape and dtype, typed with its explicit
  sharding when it has one (what ``lora()`` traces the model with)."""
  s = explicit_sharding(w)
  if s is None or not used_axes(s.spec):
    return jax.ShapeDtypeStruct(w.shape, w.dtype)
  return jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=s)


def _padded(spec, ndim: int) -> tuple:
  return tuple(spec) + (None,) * (ndim - len(spec))


def factored_dot_shardings(y, out: list, t_sub: list):
  """Output shardings of ``t = x·A`` (subscripts ``t_sub``) and ``z = t·B``.

  Args:
    y: the base product ``x·W`` (its type holds the output sharding).
    out: the base product's subscripts, one letter per axis.
    t_sub: ``t``'s subscripts: letters of ``out``, plus the rank and any
      axis contracted only in the second product.

  Returns:
    ``(t_sharding, z_sharding)``, or ``(None, None)`` off an explicit mesh.
  """
  s = explicit_sharding(y)
  if s is None:
    return None, None
  spec = _padded(s.spec, len(out))
  of = dict(zip(out, spec))
  t_spec = PartitionSpec(*[of.get(l) for l in t_sub])
  return NamedSharding(s.mesh, t_spec), s


def spec_of(x):
  """``x``'s explicit spec, one entry per axis, or None off an explicit mesh."""
  s = explicit_sharding(x)
  return None if s is None else _padded(s.spec, x.ndim)


def like(x, entries):
  """A ``NamedSharding`` on ``x``'s explicit mesh with spec ``entries``
  (None off an explicit mesh: let the compiler choose)."""
  s = explicit_sharding(x)
  return None if s is None else NamedSharding(s.mesh, PartitionSpec(*entries))
