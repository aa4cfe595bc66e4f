"""Rules for user-written derivative rules, barriers and names.

A ``jax.custom_jvp`` / ``jax.custom_vjp`` function that reads an adapted
kernel runs on ``W + ΔW`` with its own rule: the rule's JVP (or VJP) of
``W + ΔW`` is carried to ``A`` and ``B`` by autodiff of ``s·A·B``, so the
gradient is the one the user's rule defines (a scaled JVP stays scaled, a
straight-through estimator passes straight through). It is warned about,
or refused with ``strict=True``, like any fallback: the rule may read the
kernel in any way, so it cannot be factored. Inlining the function's body
instead would silently drop the user's rule.

A custom function that takes no kernel (a custom activation applied to
``x·W``, whose product is factored outside it) is bound as it is by the
interpreter and never reaches this module. A kernel the function only
passes through (returned unchanged, as module state is) comes out lazy.

``optimization_barrier`` and ``checkpoint_name`` (the ``name`` primitive)
apply to the factors and keep the kernel lazy.
"""

from jax import lax
from jax.extend import core as jex_core

from lora_jax._src import interpreter
from lora_jax._src.interpreter import bind, flatten_lazy, is_lazy, warn_or_refuse


def _body(eqn):
  closed = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
  return getattr(closed, "jaxpr", closed)


def function_name(eqn) -> str:
  """The custom function's name and definition site, as JAX records it."""
  dbg = getattr(_body(eqn), "debug_info", None)
  return getattr(dbg, "func_src_info", None) or "<unknown function>"


def _custom(ctx, eqn, invals):
  """Bind the custom function on ``W + ΔW``, keeping the user's rule."""
  jaxpr = _body(eqn)
  used = {v for e in jaxpr.eqns for v in e.invars if isinstance(v, jex_core.Var)}
  read = [x.path for x, v in zip(invals, jaxpr.invars) if is_lazy(x) and v in used]
  for x in invals:
    if is_lazy(x) and x.stacked:
      x.materialize()  # raises: a stack has no single W + ΔW
  if read:
    warn_or_refuse(
        ctx, eqn, read,
        f"the custom-derivative function `{function_name(eqn)}` "
        f"(`{eqn.primitive.name}`) reads an adapted kernel, so it runs on W + ΔW "
        "with its own rule",
        "Values and gradients follow the function's rule (A and B get theirs "
        "through it), but the merged kernel spends the memory and FLOPs LoRA "
        "saves; to keep it factored, apply the custom function to x @ W instead "
        "of to W.")
  # A kernel the body never reads (only passes on) is bound as W + ΔW too:
  # the rule may still read it; if it does not, XLA drops the product.
  outs = bind(eqn, [x.materialize() if is_lazy(x) else x for x in invals])
  pos = {v: k for k, v in enumerate(jaxpr.invars)}
  for i, v in enumerate(jaxpr.outvars):  # passed through unchanged: stays lazy
    k = pos.get(v) if isinstance(v, jex_core.Var) else None
    if k is not None and is_lazy(invals[k]):
      outs[i] = invals[k]
  return outs


def _barrier(ctx, eqn, invals):
  """``optimization_barrier`` over the factors: the kernel stays lazy."""
  flat, unflatten = flatten_lazy(invals)
  return unflatten(lax.optimization_barrier(flat))


def _named(ctx, eqn, invals):
  """``checkpoint_name``: the kernel and its factors carry the name."""
  v = invals[0]
  return [v.replace(w=bind(eqn, [v.w])[0], a=bind(eqn, [v.a])[0], b=bind(eqn, [v.b])[0])]


for _name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
  interpreter.register(_name, _custom, dora=True)  # materialize() forms W' exactly
interpreter.register("optimization_barrier", _barrier, dora=True)
interpreter.register("name", _named, dora=True)

