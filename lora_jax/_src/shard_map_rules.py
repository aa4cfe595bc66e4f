"""``shard_map`` with adapted kernels passed in: the factors are sharded too.

A kernel ``W`` that enters ``shard_map`` with spec ``P(e_0, ..., e_n)`` (one
entry per kernel axis) enters as its three arrays: ``w`` with that spec,
``A`` with the entries of the kernel axes it holds (its input axes, and any
stacked axis) and ``B`` with those of its output axes; the rank axis is
replicated. So a column-parallel kernel ``P(None, 'x')`` gets a replicated
``A`` and a ``B`` split like its columns, a row-parallel ``P('x', None)`` an
``A`` split like its rows and a replicated ``B``. Inside, each device holds
its shard of ``W + s·A·B`` in factored form, and the body is interpreted like
any other jaxpr: ``x·w + s·(x·a)·b`` per shard, before the body's own
``psum``. A kernel the body returns unchanged (same spec in and out) stays
lazy; any other kernel returned from the body is formed as ``W + ΔW``
(warned, refused with ``strict=True``).
"""

import math

import jax
from jax.extend import core as jex_core
from jax.sharding import PartitionSpec

from lora_jax._src import interpreter
from lora_jax._src.interpreter import concrete, eval_jaxpr, fallback, flatten_lazy, is_lazy
from lora_jax._src.quant import is_quantized


def _entries(spec, ndim):
  return tuple(spec) + (None,) * (ndim - len(spec))


def _factor_spec(entries, dims) -> PartitionSpec:
  """A factor's spec: the kernel's entry for each kernel axis it holds."""
  return PartitionSpec(*[entries[d] if isinstance(d, int) else None for d in dims])


def _axis_size(mesh, entry) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def _check_fits(v, spec, mesh) -> None:
  """Raise if ``spec`` cannot shard kernel ``v`` and its factors alike."""
  problem = None
  if len(spec) > v.ndim:
    problem = f"the spec has {len(spec)} entries for a {v.ndim}-axis kernel"
  else:
    entries = _entries(spec, v.ndim)
    for name, x, dims in (("A", v.a, v.a_dims), ("B", v.b, v.b_dims)):
      for ax, d in enumerate(dims):
        if isinstance(d, int) and entries[d] is not None:
          n = _axis_size(mesh, entries[d])
          if v.shape[d] % n:
            problem = (f"kernel axis {d} has size {v.shape[d]}, not divisible by the "
                       f"{n} devices of mesh axis {entries[d]!r}")
          elif x.shape[ax] % n:
            problem = (f"kernel axis {d} (size {v.shape[d]}) is split {n} ways by "
                       f"{entries[d]!r}, but {name}'s axis for it has size {x.shape[ax]}")
  if problem:
    raise ValueError(
        f"lora: shard_map in_specs {spec} do not fit the adapted kernel {v.path} "
        f"(shape {tuple(v.shape)}, A: {tuple(v.a.shape)} holding kernel axes "
        f"{list(v.a_dims)}, B: {tuple(v.b.shape)} holding {list(v.b_dims)}; None "
        f"is the rank): {problem}. Give the kernel one spec entry per axis, each "
        "dividing its axis.")


def _shard_map(ctx, eqn, invals):
  p = eqn.params
  mesh, in_specs, out_specs = p["mesh"], p["in_specs"], p["out_specs"]
  if any(is_lazy(x) and (x.stacked or is_quantized(x.w)) for x in invals):
    return fallback(ctx, eqn, invals)  # a stack of adapters: no single kernel
  jaxpr = p["jaxpr"]
  flat, unflatten = flatten_lazy(invals)
  flat_specs = []
  for x, spec in zip(invals, in_specs):
    if is_lazy(x):
      _check_fits(x, spec, mesh)
      entries = _entries(spec, x.ndim)
      flat_specs += [spec, _factor_spec(entries, x.a_dims), _factor_spec(entries, x.b_dims)]
    else:
      flat_specs.append(spec)
  pos = {v: k for k, v in enumerate(jaxpr.invars)}
  kept = {}  # outputs that are a kernel passed in, with the same spec
  for i, v in enumerate(jaxpr.outvars):
    k = pos.get(v) if isinstance(v, jex_core.Var) else None
    if k is not None and is_lazy(invals[k]) and tuple(out_specs[i]) == tuple(in_specs[k]):
      kept[i] = invals[k]

  def body(*local):
    outs = eval_jaxpr(jaxpr, (), unflatten(local), ctx)
    rest = [o for i, o in enumerate(outs) if i not in kept]
    return tuple(concrete(rest, ctx, eqn, "a `shard_map` body"))

  rest_specs = tuple(s for i, s in enumerate(out_specs) if i not in kept)
  fn = jax.shard_map(body, mesh=mesh, in_specs=tuple(flat_specs), out_specs=rest_specs,
                     check_vma=p.get("check_vma", True),
                     axis_names=frozenset(p.get("newly_manual_axes", ())))
  res = iter(fn(*flat))
  return [kept[i] if i in kept else next(res) for i in range(len(eqn.outvars))]


interpreter.register("shard_map", _shard_map, dora=True)
