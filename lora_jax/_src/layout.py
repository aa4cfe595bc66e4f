"""Infer each kernel's axis roles (stack / in / out) from an abstract trace.

Shape alone cannot tell a stacked ``(layers, in, out)`` kernel from a
DenseGeneral ``(d, heads, head_dim)`` one. The model can: we trace it with
``jax.make_jaxpr`` on abstract values (no FLOPs) and follow every kernel to the
matmul, conv or gather that consumes it:

* ``dot_general``: contracting axes are inputs (``i``), batch axes are stacked
  (``s``), free axes are outputs (``o``);
* ``conv_general_dilated``: the kernel's input-feature and spatial axes are
  ``i``, its output-feature axis ``o``;
* ``gather`` (embedding lookup): indexed axes are ``i``, the rest ``o``;
* ``ragged_dot_general`` (MoE experts): the rhs group axis is ``s`` (one
  adapter per expert), contracting axes ``i``, free axes ``o``;
* an axis a ``scan`` slices (``nn.scan``, ``nnx.scan``, ``lax.scan`` over
  stacked layers) is ``s``;
* an axis ``vmap`` maps over (``jax.vmap``, ``nnx.vmap`` ensembles) is
  ``s``. With a batched input it is a ``dot_general`` batch axis. With a
  shared input, vmap makes it a free axis of the matmul, which alone reads as
  an output axis; the walker follows the activations the matmul produces, and
  when that axis of them later meets another kernel's stacked axis (the next
  layer of the ensemble) it is stacked too. A one-layer ensemble on a shared
  input leaves no such trace: name its roles (``LoraConfig(roles=...)``).

Transposes, reshapes, casts, slices and calls (jit, checkpoint, cond, while,
custom_jvp) are followed through. An axis that is indexed away (``w[0]``:
a slice or dynamic_slice then a squeeze, or a gather of one point) picks one
of several independent matrices, so unless a consumer settles it otherwise
it is stacked (``s``), as in Gemma's ``(2, d, ff)`` gating kernel. An axis
of size 1 that no consumer settles (dropped by a reshape or squeeze) takes a
neighbour's role: any role is exact for it. When a kernel has several consumers the first one in program order
decides (a tied embedding is an embedding), except that a stacked axis
(``s``) wins over an output one; an axis one use reads as stacked and another
as an input is an error naming both uses.
"""

from typing import Any, Callable

import jax
from jax.extend import core as jex_core

from jax.extend import source_info_util

from lora_jax._src import tree

_IDENTITY = frozenset({
    "convert_element_type", "copy", "copy_p", "sharding_constraint",
    "reduce_precision", "slice", "dynamic_slice", "rev",
    "mesh_cast", "reshard", "name",
})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2",
                    "checkpoint", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr", "named_call", "shard_map"})
_REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                     "argmax", "argmin"})


class _Act:
  """An activation computed from kernels: for each axis, the (kernel, kernel
  axis) pairs it came from through a matmul's free axes."""

  __slots__ = ("axes",)

  def __init__(self, axes):
    self.axes = tuple(axes)

  @staticmethod
  def of(axes):
    return _Act(axes) if any(axes) else None


def _use(eqn) -> str:
  """``prim at file:line``: one use of a kernel, for an error message."""
  if eqn is None:
    return "a use"
  try:
    line = source_info_util.summarize(eqn.source_info)
  except Exception:  # noqa: BLE001
    line = ""
  return f"`{eqn.primitive.name}`" + (f" at {line}" if line else "")

# A kernel axis map: for each axis of a traced value, the set of original
# kernel axes it holds, tagged with the kernel's index: (kernel, frozenset).
AxisMap = tuple


def reshape_groups(old, new):
  """Contiguous axis groups ``(old_axes, new_axes)`` of equal size.

  Axes of size 1 belong to no group: a reshape may add or drop them freely.
  """
  o = [k for k, d in enumerate(old) if d != 1]
  n = [k for k, d in enumerate(new) if d != 1]
  groups, i, j = [], 0, 0
  while i < len(o) and j < len(n):
    oi, nj = [o[i]], [n[j]]
    po, pn = old[o[i]], new[n[j]]
    i, j = i + 1, j + 1
    while po != pn:
      if po < pn:
        oi.append(o[i]); po *= old[o[i]]; i += 1
      else:
        nj.append(n[j]); pn *= new[n[j]]; j += 1
    groups.append((oi, nj))
  return groups


def _reshape_map(old_shape, new_shape, amap):
  """Map original-axis sets through a reshape."""
  out = [frozenset()] * len(new_shape)
  for oi, nj in reshape_groups(old_shape, new_shape):
    merged = frozenset().union(*(amap[k] for k in oi))
    for k in nj:
      out[k] = merged
  return tuple(out)


class _Walker:
  """Walks a jaxpr and records roles for the tracked kernels."""

  def __init__(self, shapes, names=None):
    self.shapes = [tuple(s) for s in shapes]
    self.names = list(names) if names is not None else [f"#{k}" for k in range(len(shapes))]
    self.roles: list[dict[int, str]] = [dict() for _ in shapes]
    self.indexed: list[set[int]] = [set() for _ in shapes]  # 's' unless a consumer says
    self.stopped: list[str | None] = [None] * len(shapes)  # first op not followed
    self.uses: list[dict[int, str]] = [dict() for _ in shapes]  # who set a role
    self.vmapped: list[dict[int, str]] = [dict() for _ in shapes]  # 's' from vmap

  def record(self, kernel: int, axes, role: str, eqn=None):
    for ax in axes:
      old = self.roles[kernel].get(ax)
      if old is None or (old == "o" and role == "s"):
        self.roles[kernel][ax] = role
        self.uses[kernel][ax] = eqn
      elif {old, role} == {"s", "i"}:
        self._conflict(kernel, ax, old, self.uses[kernel][ax], role, eqn)

  def _conflict(self, kernel, ax, role1, use1, role2, use2):
    use1, use2 = _use(use1), _use(use2)
    names = {"s": "stacked ('s', a scanned or vmapped axis)", "i": "an input axis ('i')",
             "o": "an output axis ('o')"}
    raise ValueError(
        f"lora: the uses of kernel {self.names[kernel]} (shape {self.shapes[kernel]}) disagree "
        f"on its axis {ax}: {use1} reads it as {names[role1]}, {use2} as "
        f"{names[role2]}. One adapter layout cannot serve both; name the roles "
        "in LoraConfig(roles=...) or use the kernel one way.")

  def stop(self, maps, name: str):
    for m in maps:
      if m is not None and self.stopped[m[0]] is None:
        self.stopped[m[0]] = name

  def dropped(self, old_shape, new_shape, amap):
    """Indexed-away axes (size 1 here, larger in the kernel) are stacked."""
    k, axes = amap
    kept = {d for oi, _ in reshape_groups(old_shape, new_shape) for d in oi}
    for d, ax in enumerate(axes):
      if d not in kept:
        self.indexed[k].update(a for a in ax if self.shapes[k][a] != 1)

  def walk(self, jaxpr, in_maps):
    env = {}
    for v, m in zip(jaxpr.invars, in_maps):
      if m is not None:
        env[v] = m
    for eqn in jaxpr.eqns:
      maps = [env.get(v) if isinstance(v, jex_core.Var) else None
              for v in eqn.invars]
      if all(m is None for m in maps):
        continue
      outs = self.dispatch(eqn, maps)
      for v, m in zip(eqn.outvars, outs):
        if m is not None:
          env[v] = m
    return [env.get(v) if isinstance(v, jex_core.Var) else None
            for v in jaxpr.outvars]

  def dispatch(self, eqn, maps):
    """Kernel maps go to ``eqn``; activations (``_Act``) to ``act``."""
    name = eqn.primitive.name
    if name == "dot_general":
      return self.dot(eqn, maps)
    if name in _CALLS or name in ("cond", "while", "scan"):
      return self.eqn(eqn, maps)
    kmaps = [None if isinstance(m, _Act) else m for m in maps]
    if all(m is None for m in kmaps):
      return self.act(eqn, maps)
    return self.eqn(eqn, kmaps)

  def dot(self, eqn, maps):
    """A matmul: kernel axes get roles; activation axes are followed."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    sides = ((maps[0], lc, lb, rb, maps[1]), (maps[1], rc, rb, lb, maps[0]))
    for m, contract, batch, other_batch, other in sides:
      if m is None or isinstance(m, _Act):
        continue
      k, axes = m
      for d, ax in enumerate(axes):
        role = "i" if d in contract else "s" if d in batch else "o"
        self.record(k, ax, role, eqn)
      if isinstance(other, _Act):  # vmap over a shared input's product, then this
        for d, od in zip(batch, other_batch):
          for k2, a2 in other.axes[od]:
            self.vmap_stacked(k2, a2, eqn)
    out = []
    nd = [len(v.aval.shape) for v in eqn.invars]

    def origins(m, d):
      if m is None:
        return frozenset()
      if isinstance(m, _Act):
        return m.axes[d]
      k, axes = m
      return frozenset((k, a) for a in axes[d])
    for dl, dr in zip(lb, rb):
      out.append(origins(maps[0], dl) | origins(maps[1], dr))
    for side, (m, contract, batch) in enumerate(((maps[0], lc, lb), (maps[1], rc, rb))):
      for d in range(nd[side]):
        if d not in contract and d not in batch:
          out.append(origins(m, d))
    return [_Act.of(out)]

  def vmap_stacked(self, k, ax, eqn):
    """Axis ``ax`` of kernel ``k`` met a stacked axis: a vmapped ensemble's."""
    self.vmapped[k].setdefault(ax, eqn)

  def act(self, eqn, maps):
    """Follow an activation's kernel-derived axes through one op."""
    name, params = eqn.primitive.name, eqn.params
    outs = [None] * len(eqn.outvars)
    if len(eqn.outvars) != 1:
      return outs
    m = maps[0]
    out_shape = tuple(eqn.outvars[0].aval.shape)
    in_shape = tuple(eqn.invars[0].aval.shape) if eqn.invars else ()
    if name == "transpose" and m is not None:
      return [_Act.of([m.axes[p] for p in params["permutation"]])]
    if name in ("reshape", "squeeze", "expand_dims") and m is not None:
      return [_Act.of(_reshape_map(in_shape, out_shape, m.axes))]
    if name == "broadcast_in_dim" and m is not None:
      axes = [frozenset()] * len(out_shape)
      for i, j in enumerate(params["broadcast_dimensions"]):
        if in_shape[i] == out_shape[j]:
          axes[j] = m.axes[i]
      return [_Act.of(axes)]
    if name in _REDUCE and m is not None:
      gone = set(params.get("axes", ()))
      return [_Act.of([a for d, a in enumerate(m.axes) if d not in gone])]
    # elementwise: every followed operand has the output's shape
    axes = [frozenset()] * len(out_shape)
    for v, mm in zip(eqn.invars, maps):
      if mm is None:
        continue
      if tuple(v.aval.shape) != out_shape:
        return outs
      axes = [a | b for a, b in zip(axes, mm.axes)]
    return [_Act.of(axes)]

  def eqn(self, eqn, maps):
    name, params, n_out = eqn.primitive.name, eqn.params, len(eqn.outvars)
    none = [None] * n_out
    if name == "optimization_barrier":  # several operands, each passed on
      return [None if isinstance(m, _Act) else m for m in maps]
    if name in _IDENTITY:
      if any(m is not None for m in maps[1:]):  # a kernel as a start index
        self.stop(maps[1:], name)
      return [maps[0]] + [None] * (n_out - 1)
    if name == "transpose":
      k, m = maps[0]
      return [(k, tuple(m[p] for p in params["permutation"]))]
    if name in ("reshape", "squeeze", "expand_dims", "broadcast_in_dim"):
      k, m = maps[0]
      old = eqn.invars[0].aval.shape
      new = eqn.outvars[0].aval.shape
      if name == "broadcast_in_dim" and (_prod(old) != _prod(new) or any(
          old[a] != new[b] for a, b in enumerate(params["broadcast_dimensions"]))):
        self.stop(maps, name)
        return none
      self.dropped(old, new, maps[0])
      return [(k, _reshape_map(old, new, m))]
    if name == "ragged_dot_general" and maps[1] is not None:
      k, axes = maps[1]  # grouped matmul (MoE experts): group axis = one stack
      dn = params["ragged_dot_dimension_numbers"]
      (_, contract), (_, batch) = dn.dot_dimension_numbers
      for d, ax in enumerate(axes):
        role = ("s" if d in dn.rhs_group_dimensions or d in batch
                else "i" if d in contract else "o")
        self.record(k, ax, role, eqn)
      return none
    if name == "conv_general_dilated" and maps[1] is not None:
      k, axes = maps[1]
      out_feature = params["dimension_numbers"].rhs_spec[0]
      for d, ax in enumerate(axes):
        self.record(k, ax, "o" if d == out_feature else "i", eqn)
      return none
    if name == "gather" and maps[0] is not None and _is_point(eqn):
      return [_point_gather_map(eqn, maps[0], self)]
    if name == "gather" and maps[0] is not None:
      k, axes = maps[0]
      indexed = params["dimension_numbers"].start_index_map
      for d, ax in enumerate(axes):
        self.record(k, ax, "i" if d in indexed else "o", eqn)
      return none
    if name == "scan":
      return self.scan(eqn, maps)
    if name in _CALLS:
      sub = params.get("jaxpr", params.get("call_jaxpr", params.get("fun_jaxpr")))
      if sub is not None:
        outs = self.walk(getattr(sub, "jaxpr", sub), maps)
        return outs if len(outs) == n_out else none
      return none
    if name == "cond":
      for br in params["branches"]:
        self.walk(br.jaxpr, maps[1:])
      return none
    if name == "while":
      cn, bn = params["cond_nconsts"], params["body_nconsts"]
      carry = maps[cn + bn:]
      self.walk(params["cond_jaxpr"].jaxpr, maps[:cn] + carry)
      self.walk(params["body_jaxpr"].jaxpr, maps[cn:cn + bn] + carry)
      return none
    self.stop(maps, name)
    return none

  def scan(self, eqn, maps):
    nc, ncarry = eqn.params["num_consts"], eqn.params["num_carry"]
    body_maps = list(maps[:nc + ncarry])
    for m in maps[nc + ncarry:]:
      if m is None or isinstance(m, _Act):
        body_maps.append(None if m is None else _Act.of(m.axes[1:]))
        continue
      k, axes = m
      self.record(k, axes[0], "s", eqn)
      body_maps.append((k, axes[1:]))
    self.walk(eqn.params["jaxpr"].jaxpr, body_maps)
    return [None] * len(eqn.outvars)


def _is_point(eqn) -> bool:
  """A gather of one point (``w[i]``, ``jnp.take(w, i, axis)``), not a lookup."""
  dn = eqn.params["dimension_numbers"]
  out_ndim = len(eqn.outvars[0].aval.shape)
  return len(dn.offset_dims) == out_ndim and not dn.operand_batching_dims


def _point_gather_map(eqn, amap, walker):
  """Axes of a point gather's output; the collapsed (indexed) axes are stacked."""
  k, axes = amap
  dn = eqn.params["dimension_numbers"]
  for d in dn.collapsed_slice_dims:
    walker.indexed[k].update(a for a in axes[d] if walker.shapes[k][a] != 1)
  kept = [axes[d] for d in range(len(axes)) if d not in dn.collapsed_slice_dims]
  return (k, tuple(kept))


def _fill_unit_axes(shape, found: dict) -> dict:
  """Size-1 axes no consumer settled take the role of a settled neighbour."""
  found = dict(found)
  for _ in range(len(shape)):
    for d in range(len(shape)):
      if d not in found and shape[d] == 1:
        near = [found.get(d - 1), found.get(d + 1)]
        role = next((r for r in near if r is not None), None)
        if role is not None:
          found[d] = role
  return found


def _prod(shape):
  out = 1
  for d in shape:
    out *= d
  return out


def infer_roles(trace: Callable[[Any], Any], params, paths: list[str],
                why: dict | None = None) -> dict[str, str]:
  """Roles strings for the leaves at ``paths``, from an abstract trace.

  Args:
    trace: a function of ``params`` only that runs the model, e.g.
      ``lambda p: model.apply(p, x)``. It is traced with ``jax.make_jaxpr``
      on abstract values: no FLOPs are spent. Leaves that are not arrays
      (ints, strings) are passed to it as they are, static.
    params: the params pytree (arrays or ``jax.ShapeDtypeStruct``).
    paths: the '/'-joined leaf paths to report on.
    why: if given, filled with ``{path: reason}`` for the paths the trace
      could not settle.

  Returns:
    ``{path: roles}`` for every path whose kernel reached a matmul, conv or
    gather on every axis; paths the trace could not settle are left out.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  strs = [tree.path_str(p) for p, _ in leaves]
  wanted = {p: n for n, p in enumerate(paths)}
  arrays = [k for k, (_, x) in enumerate(leaves) if _is_arraylike(x)]
  values = [x for _, x in leaves]

  def flat(*xs):
    full = list(values)
    for k, x in zip(arrays, xs):
      full[k] = x
    return trace(jax.tree_util.tree_unflatten(treedef, full))

  abstract = [jax.ShapeDtypeStruct(values[k].shape, values[k].dtype) for k in arrays]
  closed = jax.make_jaxpr(flat)(*abstract)
  shapes = {s: tuple(getattr(x, "shape", ())) for s, (_, x) in zip(strs, leaves)}
  walker = _Walker([shapes[p] for p in paths], paths)
  in_maps = []
  for k in arrays:
    n = wanted.get(strs[k])
    ndim = len(values[k].shape)
    in_maps.append(None if n is None else (n, tuple(frozenset([d]) for d in range(ndim))))
  walker.walk(closed.jaxpr, in_maps)
  out = {}
  for path, n in wanted.items():
    shape = shapes[path]
    found = {**{d: "s" for d in walker.indexed[n]}, **walker.roles[n]}
    for d, use in walker.vmapped[n].items():
      if found.get(d) == "i":
        walker._conflict(n, d, "i", walker.uses[n][d], "s", use)
      found[d] = "s"
    found = _fill_unit_axes(shape, found)
    if len(found) == len(shape):
      out[path] = "".join(found[d] for d in range(len(shape)))
    elif why is not None:
      why[path] = _reason(shape, found, walker.stopped[n])
  return out


def _is_arraylike(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _reason(shape, found: dict, stopped: str | None) -> str:
  """Why the trace left a kernel's layout open, for the error message."""
  open_axes = [d for d in range(len(shape)) if d not in found]
  settled = ", ".join(f"axis {d}: {r!r}" for d, r in sorted(found.items())) or "none"
  where = (f"the trace followed it to a `{stopped}` op, which has no layout rule"
           if stopped else
           "no matmul, conv or gather in the trace consumed those axes")
  return (f"axes {open_axes} of shape {tuple(shape)} were not settled "
          f"(settled: {settled}): {where}")
