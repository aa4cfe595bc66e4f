"""Where ``lora()`` dequantizes a QuantizedWeight: at the op that consumes it.

A quantized kernel (alone, or as a LoraWeight's ``w``) flows through the
interpreter as a lazy value whose ``w`` is the QuantizedWeight. Calls, remat,
cond and while pass it on unchanged, and ``scan`` slices its codes and scales
with the layer (they have the stacked axis first), so inside a scanned body
only the current layer is ever dequantized. Any other operation (the matmul,
a cast, a transpose...) first replaces ``w`` by its dequantized kernel (in
``compute_dtype``, under ``stop_gradient``) and then runs the usual rule. A
bare QuantizedWeight is a lazy value with rank-0 factors; once dequantized it
is a plain array.
"""

import jax
import jax.numpy as jnp

from lora_jax._src.quant import QuantizedWeight, is_quantized
from lora_jax._src import interpreter
from lora_jax._src.interpreter import bind, is_lazy
from lora_jax._src.weight import LoraWeight, factor_shapes

# Primitives that carry a lazy value into a sub-jaxpr unchanged.
PASS_THROUGH = frozenset({
    "jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
    "remat2", "checkpoint", "cond", "while", "scan"})


def rank0(q: QuantizedWeight) -> LoraWeight:
  """A LoraWeight with rank-0 factors around a bare QuantizedWeight."""
  sa, sb = factor_shapes(q.shape, q.roles, 0)
  return LoraWeight(q, jnp.zeros(sa, q.dtype), jnp.zeros(sb, q.dtype),
                    scale=1.0, roles=q.roles)


def _is_rank0(v) -> bool:
  return v.a.shape[v.a_dims.index(None)] == 0


def _densify(v):
  w = jax.lax.stop_gradient(v.w.dequantize())
  return w if _is_rank0(v) else v.replace(w=w)


def _keeps(eqn, v) -> bool:
  """Whether ``eqn`` can carry the quantized ``v`` as it is."""
  name = eqn.primitive.name
  if name not in PASS_THROUGH:
    return False
  # scan slices V's axis 0: it must be the codes' stacked axis
  return name != "scan" or bool(v.w.stack_shape)


def _quantized(x) -> bool:
  return is_lazy(x) and is_quantized(x.w)


def _cast(eqn, v):
  """A float cast of a quantized kernel: dequantize to the new dtype later."""
  dtype = eqn.params["new_dtype"]
  q = v.w
  q = type(q)(q.codes, q.absmax, q.absmax2, q.offset, kind=q.kind,
              block_size=q.block_size, inner_shape=q.inner_shape,
              inner_roles=q.inner_roles, dtype=dtype)
  return v.replace(w=q, a=v.a.astype(dtype), b=v.b.astype(dtype))


def run(rule, ctx, eqn, invals):
  """``rule(ctx, eqn, invals)``, dequantizing the quantized kernels it consumes.

  A consuming op (matmul, conv, gather, a fallback) runs under
  ``jax.checkpoint`` with the dequantization inside: the backward pass
  recomputes the dense kernel from the codes instead of keeping it, so a
  scanned model never holds more than one layer's dense kernels.
  """
  name = eqn.primitive.name
  if not any(_quantized(x) and not _keeps(eqn, x) for x in invals):
    return rule(ctx, eqn, invals)
  if name == "convert_element_type" and len(invals) == 1 and jnp.issubdtype(
      eqn.params["new_dtype"], jnp.floating):
    return [_cast(eqn, invals[0])]

  def dense(*xs):
    xs = [_densify(x) if _quantized(x) else x for x in xs]
    return rule(ctx, eqn, xs) if any(is_lazy(x) for x in xs) else bind(eqn, xs)
  if name in VIEWS:
    return dense(*invals)
  return list(jax.checkpoint(dense)(*invals))


# Ops that only re-label a kernel (their output is still a kernel).
VIEWS = frozenset({
    "copy", "copy_p", "sharding_constraint", "transpose", "reshape",
    "squeeze", "slice", "dynamic_slice", "rev", "convert_element_type"})

interpreter.WRAPPERS.append(run)
