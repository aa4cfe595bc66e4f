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

* ``take``: a stack's per-example factors, gathered sharded like the batch.
* ``quantized_kernel_sharding`` / ``in_auto_axes``: a QuantizedWeight's
  blockwise (de)quantization runs in automatic axes, typed like its kernel.
* ``dot_general``, ``lookup``, ``reshape``, ``typed_like``, ``rows_like``,
  ``replicated``, ``rows_by_cols``: what the bundled Llama and Mixtral name
  on explicit axes (each is the plain op elsewhere).
* ``check_divides``: a mesh that does not divide a kernel axis, named.

Off an explicit mesh (auto axes, or none) every helper returns ``None`` or
runs the plain op: the compiler chooses, as before, and the programs are
unchanged.
"""

import jax
import jax.numpy as jnp
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
  if hasattr(w, "codes"):  # a QuantizedWeight (this module imports no lora_jax type)
    return stand_in_quantized(w)
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


def take(x, idx, axis: int = 0, mode: str = "clip"):
  """``jnp.take(x, idx, axis)`` for a 1-D ``idx``; on an explicit mesh the
  gathered axis takes ``idx``'s sharding (a stack's per-example rows follow the
  batch) and ``x``'s other axes keep theirs, less any mesh axis ``idx`` uses."""
  xs = spec_of(x)
  if xs is None:
    return jnp.take(x, idx, axis=axis, mode=mode)
  ids = spec_of(idx)
  row = None if ids is None else ids[0]
  taken = used_axes(PartitionSpec(row))
  keep = [None if used_axes(PartitionSpec(e)) & taken else e for e in xs]
  keep[axis] = row
  index = (slice(None),) * axis + (idx,)
  return x.at[index].get(mode=mode, out_sharding=like(x, keep))


# ------------------------------------------------------- quantized kernels

def quantized_kernel_sharding(q):
  """The explicit ``NamedSharding`` of the kernel a QuantizedWeight stands for,
  read from its codes' type (codes are ``stack + (out, in // k)``: the kernel
  gets the stacked axes' specs, and its first output and first input axis the
  codes' out and in specs); None off an explicit mesh."""
  from lora_jax._src.quant_sharding import kernel_spec
  s = explicit_sharding(q.codes)
  if s is None:
    return None
  return NamedSharding(s.mesh, kernel_spec(s.spec, q.codes.ndim, q.roles))


def in_auto_axes(f, out_sharding, like_array=None):
  """``f`` run with the mesh's axes automatic (the compiler shards its
  gathers and reshapes), its result typed ``out_sharding``.

  Outside any mesh context (an eager call on committed arrays) the mesh of
  ``like_array``'s ``NamedSharding`` is entered for the call.
  """
  g = jax.sharding.auto_axes(f, out_sharding=out_sharding)
  mesh = getattr(getattr(like_array, "sharding", None), "mesh", None)
  if not jax.sharding.get_abstract_mesh().empty or not isinstance(mesh, jax.sharding.Mesh):
    return g

  def entered(*args):
    with jax.set_mesh(mesh):
      return g(*args)
  return entered


def stand_in_quantized(q) -> jax.ShapeDtypeStruct:
  """The abstract kernel a QuantizedWeight stands for, with its explicit sharding."""
  s = quantized_kernel_sharding(q)
  if s is None or not used_axes(s.spec):
    return jax.ShapeDtypeStruct(q.shape, q.dtype)
  return jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=s)


# ------------------------------------------------------------- bad input

def check_divides(where: str, shape, sharding) -> None:
  """Raise if ``sharding`` (a NamedSharding) splits an axis of ``shape``
  unevenly: the error names the kernel, its shape, the axis and the mesh size."""
  if not isinstance(sharding, NamedSharding) or shape is None:
    return
  sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes))
  for d, (n, e) in enumerate(zip(shape, _padded(sharding.spec, len(shape)))):
    names = used_axes(PartitionSpec(e))
    ways = 1
    for name in names:
      ways *= sizes.get(name, 1)
    if n % ways:
      raise ValueError(
          f"{where}: kernel of shape {tuple(shape)} has axis {d} (size {n}) split over "
          f"mesh axes {tuple(sorted(names))} of total size {ways}, which does not divide "
          f"{n} (mesh {dict(sizes)}). Use a mesh whose {tuple(sorted(names))} size "
          f"divides {n}, or replicate that axis (None at position {d} of its "
          "PartitionSpec).")


# --------------------------------------------- a model's ops on explicit axes

def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None):
  """``lax.dot_general`` that names its output sharding on an explicit mesh.

  For Flax ``Dense(dot_general=...)``: the output keeps ``lhs``'s specs on its
  free axes and ``rhs``'s on its own (a mesh axis used by both goes to
  ``lhs``), so a row-parallel kernel's contraction over a sharded axis is
  reduced into the batch-sharded output. Elsewhere it is ``lax.dot_general``.
  """
  if out_sharding is None:
    ls, rs = spec_of(lhs), spec_of(rhs)
    if ls is not None or rs is not None:
      ls = ls or (None,) * lhs.ndim
      rs = rs or (None,) * rhs.ndim
      (lc, rc), (lb, rb) = dimension_numbers
      batch = [ls[d] for d in lb]
      free_l = [ls[d] for d in range(lhs.ndim) if d not in lc and d not in lb]
      free_r = [rs[d] for d in range(rhs.ndim) if d not in rc and d not in rb]
      taken = used_axes(PartitionSpec(*batch, *free_l))
      free_r = [None if used_axes(PartitionSpec(e)) & taken else e for e in free_r]
      out_sharding = like(lhs if spec_of(lhs) is not None else rhs,
                          batch + free_l + free_r)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type,
                             out_sharding=out_sharding)


def lookup(table, ids):
  """``table[ids]`` (an embedding lookup): on an explicit mesh the rows come
  out sharded like ``ids`` (the batch), the feature axis replicated."""
  s = spec_of(ids)
  if s is None:
    return jnp.take(table, ids, axis=0)
  return table.at[ids].get(out_sharding=like(ids, s + (None,) * (table.ndim - 1)))


def reshape(x, shape):
  """``x.reshape(shape)``; on an explicit mesh the axes the reshape leaves
  alone at both ends keep their specs, and of the regrouped axes the first new
  one takes the first old one's spec if its mesh size divides it (heads over
  'model'), the rest replicated. Elsewhere a plain reshape."""
  s = explicit_sharding(x)
  shape = tuple(shape)
  if s is None:
    return x.reshape(shape)
  spec = _padded(s.spec, x.ndim)
  old = tuple(x.shape)
  k = 0
  while k < min(len(old), len(shape)) and old[k] == shape[k]:
    k += 1
  m = 0
  while m < min(len(old), len(shape)) - k and old[-1 - m] == shape[-1 - m]:
    m += 1
  new = [None] * len(shape)
  new[:k] = spec[:k]
  if m:
    new[len(shape) - m:] = spec[len(old) - m:]
  if k < len(shape) - m and k < len(old) - m:
    sizes = dict(zip(s.mesh.axis_names, s.mesh.axis_sizes))
    ways = 1
    for n in used_axes(PartitionSpec(spec[k])):
      ways *= sizes[n]
    new[k] = spec[k] if shape[k] % ways == 0 else None
  return jax.lax.reshape(x, shape, out_sharding=NamedSharding(s.mesh, PartitionSpec(*new)))


def typed_like(f, *like):
  """``f`` run in auto axes with its outputs typed like the arrays ``like``
  (an in-place update of a cache keeps the cache's sharding, whatever its
  updates'); off an explicit mesh, ``f`` itself."""
  specs = [spec_of(x) for x in like]
  if any(s is None for s in specs):
    return f
  return in_auto_axes(f, tuple(PartitionSpec(*s) for s in specs))


def rows_like(x, ref):
  """``x`` resharded so its leading (batch) axis is split like ``ref``'s, on
  an explicit mesh (a loop carry that meets per-row values); else ``x``."""
  s = spec_of(ref)
  if s is None:
    return x
  return jax.sharding.reshard(x, like(ref, (s[0],) + (None,) * (x.ndim - 1)))


def replicated(x):
  """``x`` resharded whole onto every device on an explicit mesh (a global
  sort or scatter over the token axis: a mixture of experts' routing); else ``x``."""
  if spec_of(x) is None:
    return x
  return jax.sharding.reshard(x, like(x, (None,) * x.ndim))


def rows_by_cols(x, w, out_axis: int):
  """The explicit sharding of ``x (m, in) · w`` with ``w``'s output axis
  ``out_axis``: ``x``'s rows' spec by ``w``'s output spec (a mesh axis both
  use stays with the rows); None off an explicit mesh."""
  xs, ws = spec_of(x), spec_of(w)
  if xs is None and ws is None:
    return None
  row = None if xs is None else xs[0]
  col = None if ws is None else ws[out_axis]
  if used_axes(PartitionSpec(col)) & used_axes(PartitionSpec(row)):
    col = None
  return like(x if xs is not None else w, (row, col))
