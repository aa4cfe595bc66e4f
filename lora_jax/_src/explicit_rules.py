"""Interpreter rule for ``reshard`` (explicit axes): a kernel's factors follow it.

``jax.sharding.reshard`` and ``auto_axes`` (which reshards its inputs onto
the mesh's auto axes) appear in a jaxpr as ``reshard``. A LoraWeight's kernel
resharded stays lazy: ``a`` takes the new spec of the kernel axes it holds,
``b`` likewise, the rank axis replicated (as ``sharding_constraint``).
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax._src import interpreter
from lora_jax._src.interpreter import bind


def _reshard(ctx, eqn, invals):
  v = invals[0]
  w = bind(eqn, [v.w])[0]
  s = jax.typeof(w).sharding
  if not isinstance(s, NamedSharding):
    return interpreter.fallback(ctx, eqn, invals)
  spec = tuple(s.spec) + (None,) * (v.ndim - len(s.spec))

  def sub(dims):
    return NamedSharding(s.mesh, PartitionSpec(
        *[spec[d] if isinstance(d, int) else None for d in dims]))
  return [v.replace(w=w, a=jax.sharding.reshard(v.a, sub(v.a_dims)),
                    b=jax.sharding.reshard(v.b, sub(v.b_dims)))]


interpreter.register("reshard", _reshard, dora=True)
