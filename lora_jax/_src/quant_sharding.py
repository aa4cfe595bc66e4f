"""A QuantizedWeight keeps its kernel's sharding.

Codes and block scales are laid out ``stack + (out, in // k)``: they take the
kernel's specs of its stacked axes, its (first sharded) output axis and its
input axis; the double-quantization statistics take the stacked axes' specs.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def _spec_of(w):
  s = getattr(w, "sharding", None)
  if not isinstance(s, NamedSharding):
    return None, None
  spec = tuple(s.spec) + (None,) * (w.ndim - len(s.spec))
  return s.mesh, spec


def _group(spec, roles: str, role: str):
  """The mesh axes of a flattened group of kernel axes (the first sharded one)."""
  found = [spec[d] for d, r in enumerate(roles) if r == role and spec[d] is not None]
  return found[0] if found else None


def _put(x, mesh, spec):
  if x is None:
    return None
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  fixed = []
  for n, s in zip(x.shape, spec):
    names = (s,) if isinstance(s, str) else tuple(s or ())
    ways = int(np.prod([sizes[a] for a in names])) if names else 1
    fixed.append(s if n % ways == 0 else None)  # indivisible: replicate that axis
  return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*fixed)))


def specs(q, spec):
  """PartitionSpecs of (codes, absmax, absmax2, offset) for a kernel's ``spec``."""
  roles = q.roles
  stack = [spec[d] for d, r in enumerate(roles) if r == "s"]
  out, ins = _group(spec, roles, "o"), _group(spec, roles, "i")
  mat = tuple(stack) + (out, ins)
  return mat, mat, tuple(stack) + (None,), tuple(stack)


def place_like(q, w):
  """``q`` with its arrays sharded like the kernel ``w`` (if ``w`` is sharded)."""
  mesh, spec = _spec_of(w)
  if mesh is None or isinstance(w, jax.core.Tracer):
    return q
  s = specs(q, spec)
  leaves = (q.codes, q.absmax, q.absmax2, q.offset)
  placed = [_put(x, mesh, sp) for x, sp in zip(leaves, s)]
  return type(q)(*placed, kind=q.kind, block_size=q.block_size,
                 inner_shape=q.inner_shape, inner_roles=q.inner_roles, dtype=q.dtype)


def kernel_spec(codes_spec, codes_ndim: int, roles: str) -> PartitionSpec:
  """The kernel's spec from its codes' (codes are ``stack + (out, in // k)``:
  the kernel's stacked axes keep their specs, its first output and first input
  axis get the codes' out and in specs, its other axes none)."""
  spec = tuple(codes_spec) + (None,) * (codes_ndim - len(codes_spec))
  firsts = {r: roles.index(r) for r in "io" if r in roles}
  return PartitionSpec(*[spec[d] if r == "s" else spec[-2 if r == "o" else -1]
                         if d == firsts[r] else None for d, r in enumerate(roles)])


def kernel_sharding(q):
  """The NamedSharding of the kernel ``q`` stands for, read from its codes."""
  s = getattr(q.codes, "sharding", None)
  if isinstance(q.codes, jax.core.Tracer) or not isinstance(s, NamedSharding):
    return None
  return NamedSharding(s.mesh, kernel_spec(s.spec, q.codes.ndim, q.roles))
