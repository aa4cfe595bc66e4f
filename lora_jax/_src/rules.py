"""Interpreter rules: how each primitive consumes a lazy ``W + s·A⊗B``.

Every rule takes ``(ctx, eqn, invals)`` and returns the list of outputs. A
rule that cannot keep the factored form calls ``interpreter.fallback``. The
table at the end registers them with the interpreter.

The reads of higher-order primitives' params (``jaxpr``, ``num_consts``, ...)
live in the rule modules only (here, ``control_rules``, ``custom_rules``,
``shard_map_rules``): their names move between JAX releases.
"""

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._src import explicit, interpreter, layout, stack_strategies
from lora_jax._src.einsum import einsum2, scalar
from lora_jax._src.factor_ops import a_as_kernel as _a_as_kernel
from lora_jax._src.factor_ops import not_rows as _not_rows
from lora_jax._src.factor_ops import rank_to as _rank_to
from lora_jax._src.factor_ops import row_ids as _row_ids
from lora_jax._src.factor_ops import stacked_gather_a as _stacked_gather_a
from lora_jax._src.interpreter import (ADAPTER, _Lazy, bind, eval_jaxpr, fallback,
                                       is_lazy)

_LETTERS = "abcdefghijklmnopqstuvwxyzABCDEFGHIJKLMNOPQSTUVWXYZ"  # no 'r'/'R'


# ----------------------------------------------------------------- lazy views

def _cast(ctx, eqn, invals):
  v = invals[0]
  w = bind(eqn, [v.w])[0]
  dtype = w.dtype
  if jnp.issubdtype(dtype, jnp.floating):
    return [v.replace(w=w, a=v.a.astype(dtype), b=v.b.astype(dtype))]
  return fallback(ctx, eqn, invals)


def _w_only(ctx, eqn, invals):
  """Ops that only re-label or constrain ``w`` (copies, sharding)."""
  v = invals[0]
  return [v.replace(w=bind(eqn, [v.w] + list(invals[1:]))[0])]


def _constrain(ctx, eqn, invals):
  """A sharding constraint on a kernel constrains its factors alike.

  ``a`` takes the spec of the kernel's axes it holds, ``b`` likewise; the
  rank axis is replicated.
  """
  v = invals[0]
  w = bind(eqn, [v.w])[0]
  s = eqn.params.get("sharding")
  if not isinstance(s, jax.sharding.NamedSharding):
    return [v.replace(w=w)]
  spec = tuple(s.spec) + (None,) * (v.ndim - len(s.spec))

  def sub(dims):
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(
        *[spec[d] if isinstance(d, int) else None for d in dims]))
  return [v.replace(w=w, a=lax.with_sharding_constraint(v.a, sub(v.a_dims)),
                    b=lax.with_sharding_constraint(v.b, sub(v.b_dims)))]


def _transpose(ctx, eqn, invals):
  v = invals[0]
  perm = eqn.params["permutation"]
  inv = {old: new for new, old in enumerate(perm)}
  inv[None], inv[ADAPTER] = None, ADAPTER
  return [v.replace(w=bind(eqn, [v.w])[0],
                    a_dims=[inv[d] for d in v.a_dims],
                    b_dims=[inv[d] for d in v.b_dims])]


def _reshape_factor(x, dims, groups, old_shape, new_shape, extra_new):
  """Reshape one factor; None if its axes do not allow it.

  Each group of V axes this factor holds must sit contiguously, in order, in
  the factor (size-1 axes aside), so that a row-major reshape regroups it.
  """
  owner = {k: g for g in groups for k in g[0]}
  kept = [(d, n) for d, n in zip(dims, x.shape)
          if not isinstance(d, int) or old_shape[d] != 1]
  new_dims, new_sizes, p = [], [], 0
  while p < len(kept):
    d, n = kept[p]
    if not isinstance(d, int):  # the rank or the adapter axis
      new_dims.append(d)
      new_sizes.append(n)
      p += 1
      continue
    oi, nj = owner[d]
    if [k for k, _ in kept[p:p + len(oi)]] != oi:
      return None
    new_dims += nj
    new_sizes += [new_shape[k] for k in nj]
    p += len(oi)
  return x.reshape(new_sizes + [1] * len(extra_new)), new_dims + extra_new


def _reshape(ctx, eqn, invals):
  v = invals[0]
  old = v.shape
  new = tuple(eqn.outvars[0].aval.shape)
  if eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None:
    return fallback(ctx, eqn, invals)
  groups = layout.reshape_groups(old, new)
  a_set, b_set = set(v.a_dims), set(v.b_dims)
  for oi, _ in groups:
    kinds = {(k in a_set, k in b_set) for k in oi}
    if len(kinds) != 1:
      return fallback(ctx, eqn, invals)  # a group mixes in/out/stack axes
  ones = [k for k, d in enumerate(new) if d == 1]
  ra = _reshape_factor(v.a, v.a_dims, [g for g in groups if g[0][0] in a_set],
                       old, new, ones)
  rb = _reshape_factor(v.b, v.b_dims, [g for g in groups if g[0][0] in b_set],
                       old, new, [])
  if ra is None or rb is None:
    return fallback(ctx, eqn, invals)
  w = v.w.reshape(new)
  return [v.replace(w=w, a=ra[0], a_dims=ra[1], b=rb[0], b_dims=rb[1])]


def _broadcast(ctx, eqn, invals):
  """``w[None]`` / ``expand_dims``: only size-1 axes are added, a reshape."""
  old, new = invals[0].shape, tuple(eqn.outvars[0].aval.shape)
  dims = eqn.params["broadcast_dimensions"]
  if len(invals) > 1 or layout._prod(old) != layout._prod(new) or any(
      old[a] != new[b] for a, b in enumerate(dims)):
    return fallback(ctx, eqn, invals)
  return _reshape(ctx, eqn, invals)


def _per_axis(dims, x, of_v, rank_value):
  """For each axis of factor ``x``: ``of_v(d)`` for V's axis d, else (rank or
  adapter axis) ``rank_value(size)``."""
  return [of_v(d) if isinstance(d, int) else rank_value(n) for d, n in zip(dims, x.shape)]


def _slice(ctx, eqn, invals):
  v = invals[0]
  p = eqn.params
  strides = p["strides"] or (1,) * v.ndim

  def cut(x, dims):
    return lax.slice(x, _per_axis(dims, x, lambda d: p["start_indices"][d], lambda n: 0),
                     _per_axis(dims, x, lambda d: p["limit_indices"][d], lambda n: n),
                     _per_axis(dims, x, lambda d: strides[d], lambda n: 1))
  return [v.replace(w=bind(eqn, [v.w])[0], a=cut(v.a, v.a_dims), b=cut(v.b, v.b_dims))]


def _dynamic_slice(ctx, eqn, invals):
  v, starts = invals[0], invals[1:]
  if any(is_lazy(s) for s in starts):
    return fallback(ctx, eqn, invals)
  sizes = eqn.params["slice_sizes"]

  def cut(x, dims):
    return lax.dynamic_slice(x, _per_axis(dims, x, lambda d: starts[d], lambda n: 0),
                             _per_axis(dims, x, lambda d: sizes[d], lambda n: n))
  return [v.replace(w=bind(eqn, [v.w] + list(starts))[0],
                    a=cut(v.a, v.a_dims), b=cut(v.b, v.b_dims))]


def _rev(ctx, eqn, invals):
  v = invals[0]
  axes = set(eqn.params["dimensions"])

  def flip(x, dims):
    return lax.rev(x, [k for k, d in enumerate(dims) if d is not None and d in axes])
  return [v.replace(w=bind(eqn, [v.w])[0], a=flip(v.a, v.a_dims), b=flip(v.b, v.b_dims))]


# ------------------------------------------------------------- the consumers

def _dot_general(ctx, eqn, invals):
  lhs, rhs = invals
  if is_lazy(lhs) and is_lazy(rhs):
    return fallback(ctx, eqn, invals)
  side = 1 if is_lazy(rhs) else 0
  v, x = invals[side], invals[1 - side]
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  x_contract, v_contract = (lc, rc) if side == 1 else (rc, lc)
  x_batch, v_batch = (lb, rb) if side == 1 else (rb, lb)

  # Subscripts: x's axes, V's axes (sharing letters where contracted/batched).
  xs = list(_LETTERS[:x.ndim])
  vs = list(_LETTERS[x.ndim:x.ndim + v.ndim])
  for xd, vd in zip(list(x_contract) + list(x_batch), list(v_contract) + list(v_batch)):
    vs[vd] = xs[xd]
  batch = [xs[d] for d in x_batch]
  x_free = [xs[d] for d in range(x.ndim) if d not in x_contract and d not in x_batch]
  v_free = [vs[d] for d in range(v.ndim) if d not in v_contract and d not in v_batch]
  out = batch + (x_free + v_free if side == 1 else v_free + x_free)

  fa, fb, scale, letter = v.a, v.b, v.scale, {None: "r"}
  g = None
  if v.dora:
    fa, fb, g = v.dora_parts()
    g_sub = [vs[d] for d in v.b_dims if d is not None]
    if not set(g_sub) <= set(out):  # the matmul contracts an output column
      return fallback(ctx, eqn, invals)
  if v.stacked:  # each example (x's axis 0) meets its own adapter's factors
    group = ctx.row_group(x)
    if group and group[0] == ctx.adapter_ids.shape[0] and 0 not in x_contract + x_batch:
      return _regrouped(ctx, eqn, invals, side, group)
    if 0 in x_contract or 0 in x_batch:
      raise _not_rows(v, f"the matmul contracts or batches x's axis 0 (shape {x.shape})")
    d_in = layout._prod([x.shape[d] for d in x_contract])
    how = stack_strategies.pick(ctx, v, "dot_general", x.shape[0], x.size // d_in, d_in,
                                layout._prod([v.shape[d] for d in range(v.ndim)
                                              if d not in v_contract and d not in v_batch]))
    if how == "gather":
      fa, fb, scale = _rows(ctx, v, x.shape[0])
    letter[ADAPTER] = xs[0] if how == "gather" else stack_strategies.ADAPTER_LETTER
  a_sub = [vs[d] if isinstance(d, int) else letter[d] for d in v.a_dims]
  b_sub = [vs[d] if isinstance(d, int) else letter[d] for d in v.b_dims]
  contract = {vs[d] for d in v_contract}
  in_a = contract & (set(a_sub) - set(b_sub))
  in_b = contract & (set(b_sub) - set(a_sub))
  if in_a and in_b:
    return fallback(ctx, eqn, invals)  # contraction mixes in- and out-axes
  (f1, s1), (f2, s2) = ((fb, b_sub), (fa, a_sub)) if in_b else (
      (fa, a_sub), (fb, b_sub))

  base = invals[:]
  base[side] = lax.stop_gradient(v.w)
  y = bind(eqn, base)[0]

  p = eqn.params
  prec, pref = p.get("precision"), p.get("preferred_element_type")
  xd = ctx.dropout(x, v.dropout)
  t_sub = [l for l in dict.fromkeys(xs + s1) if l in out or l in s2]
  if v.stacked and how != "gather":  # onehot / segments: stack_strategies
    z = stack_strategies.dot(how, ctx, v, xd, xs, (f1, s1), (f2, s2), t_sub, out, prec, pref)
    return [y + z.astype(y.dtype)]
  t_out, z_out = explicit.factored_dot_shardings(y, out, t_sub)  # explicit axes
  t = einsum2(f"{''.join(xs)},{''.join(s1)}->{''.join(t_sub)}", xd, f1,
              precision=prec, preferred_element_type=pref, out_sharding=t_out)
  if v.stacked:
    t = t * _row_scale(scale, t.ndim, t_sub.index(xs[0]), t.dtype)
  elif not (isinstance(scale, (int, float)) and scale == 1):  # alpha = rank: no op
    t = lax.mul(t, scalar(scale, t.dtype))
  z = einsum2(f"{''.join(t_sub)},{''.join(s2)}->{''.join(out)}", t, f2,
              precision=prec, preferred_element_type=pref, out_sharding=z_out)
  if g is not None:
    g = jnp.squeeze(g, axis=v.b_dims.index(None))
    y = _dora_base(eqn, base, side, y, x, xd, g, g_sub, out)
  return [lax.add(y, lax.convert_element_type(z, y.dtype))]


def _regrouped(ctx, eqn, invals, side, group):
  """A stack's matmul on tokens folded ``(B·T, ...)`` (``track_rows``): the
  same matmul on ``(B, T, ...)``, folded back, so example ``i``'s ``T`` rows
  meet adapter ``ids[i]``."""
  x = invals[1 - side]
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  shift = lambda dims: tuple(d + 1 for d in dims)
  dn = ((shift(lc), rc), (shift(lb), rb)) if side == 1 else ((lc, shift(rc)), (lb, shift(rb)))
  vals = list(invals)
  vals[1 - side] = x.reshape(*group, *x.shape[1:])
  y = _dot_general(ctx, eqn.replace(params={**eqn.params, "dimension_numbers": dn}), vals)[0]
  return [y.reshape(eqn.outvars[0].aval.shape)]


def _dora_base(eqn, base, side, y, x, xd, g, g_sub, out):
  """DoRA's base term, as PEFT's ``DoraLinearLayer.forward``: ``g ⊙ (x·W)``,
  or, with dropout (``xd``: the LoRA branch's dropped-out input),
  ``x·W + (g - 1) ⊙ (xd·W)`` (one more matmul, as in PEFT).

  ``g = m / ‖W + ΔW‖_c`` (subscripts ``g_sub``) scales output columns, so
  ``W`` itself is never rescaled: no ``d_in × d_out`` temporary.
  """
  spec = f"{''.join(out)},{''.join(g_sub)}->{''.join(out)}"
  g = g.astype(y.dtype)
  if xd is x:
    return jnp.einsum(spec, y, g)
  base = list(base)
  base[1 - side] = xd
  yd = bind(eqn, base)[0]
  return y + jnp.einsum(spec, yd, g - jnp.ones((), g.dtype))


# ----------------------------------------------- stacks: one adapter per row

def _rows(ctx, v: _Lazy, rows: int):
  """Each example's factors and scale: ``a[ids]``, ``b[ids]``, ``scale[ids]``.

  The adapter axis of ``a``/``b`` becomes the batch axis (same position).
  The scale is 0 for id -1 (the base alone: the branch adds exact zeros) and
  NaN for an id out of range that was not seen before tracing, so a bad id
  under ``jit`` poisons its row instead of reading another adapter.
  """
  k, scale = _row_ids(ctx, v, rows)
  a = explicit.take(v.a, k, axis=v.a_dims.index(ADAPTER), mode="clip")  # k is in range
  b = explicit.take(v.b, k, axis=v.b_dims.index(ADAPTER), mode="clip")
  return a, b, scale


def _row_scale(scale, ndim: int, axis: int, dtype):
  """The per-row scale, shaped to broadcast along ``axis`` of an ndim array."""
  shape = [1] * ndim
  shape[axis] = -1
  return scale.astype(dtype).reshape(shape)


def _rank_to_rows(z, axis: int, batch_axis: int, b):
  """Contract ``z``'s rank axis with each row's ``b`` (rows, r, out), in place."""
  zt = jnp.moveaxis(z, (batch_axis, axis), (0, -1))
  y = jnp.einsum("b...r,bro->b...o", zt, b)
  return jnp.moveaxis(y, (0, -1), (batch_axis, axis))


def _strip(v: _Lazy, a, b) -> _Lazy:
  """One member's view of a stack (factors ``a``/``b`` without the adapter axis)."""
  return v.replace(a=a, b=b, a_dims=[d for d in v.a_dims if d != ADAPTER],
                   b_dims=[d for d in v.b_dims if d != ADAPTER])


def _stacked_conv(ctx, eqn, x, v: _Lazy):
  """Per-example ``conv(x_i, A[ids_i])`` (vmapped), then ``·B[ids_i]``."""
  dn = eqn.params["dimension_numbers"]
  bx, bo = dn.lhs_spec[0], dn.out_spec[0]
  fa, fb, scale = _rows(ctx, v, x.shape[bx])
  if _a_as_kernel(_strip(v, fa[0], fb[0]), dn.rhs_spec[0]) is None:
    raise NotImplementedError(f"lora: {v.path}: a stacked conv kernel with layout "
                              f"{v.a_dims} has no factored rule")

  def branch(x_i, a_i, b_i):
    k = _a_as_kernel(_strip(v, a_i, b_i), dn.rhs_spec[0])
    return jnp.squeeze(bind(eqn, [jnp.expand_dims(x_i, bx), k])[0], bo)
  z = jax.vmap(branch, in_axes=(bx, 0, 0), out_axes=bo)(x, fa, fb)
  return z, fb, scale


def _stacked_conv_strategy(ctx, eqn, x, v: _Lazy) -> str:
  """The strategy for a stacked conv (``stack_strategies.pick``)."""
  dn = eqn.params["dimension_numbers"]
  bx, c_in = dn.lhs_spec[0], dn.lhs_spec[1]
  d_out = v.shape[dn.rhs_spec[0]]
  fits = None if (bx, dn.out_spec[0]) == (0, 0) else (
      f"the batch is axis {bx} of the input and {dn.out_spec[0]} of the output, "
      "not the leading axis")
  return stack_strategies.pick(ctx, v, "conv_general_dilated", x.shape[bx],
                               x.size // x.shape[c_in], layout._prod(v.shape) // d_out,
                               d_out, segments_fits=fits)


def _conv(ctx, eqn, invals):
  x, v = invals
  p = eqn.params
  dn = p["dimension_numbers"]
  if is_lazy(x) or p["batch_group_count"] != 1:
    return fallback(ctx, eqn, invals)
  if p["feature_group_count"] != 1:
    return _grouped_conv(ctx, eqn, x, v)
  if v.stacked:
    how = _stacked_conv_strategy(ctx, eqn, x, v)
    if how != "gather":
      y = bind(eqn, [x, lax.stop_gradient(v.w)])[0]
      z = stack_strategies.conv(how, ctx, eqn, ctx.dropout(x, v.dropout), v)
      return [y + z.astype(y.dtype)]
    z, fb, scale = _stacked_conv(ctx, eqn, ctx.dropout(x, v.dropout), v)
    z = z * _row_scale(scale, z.ndim, dn.out_spec[0], z.dtype)
    y = bind(eqn, [x, lax.stop_gradient(v.w)])[0]
    return [y + _rank_to_rows(z, dn.out_spec[1], dn.out_spec[0], fb).astype(y.dtype)]
  a_kernel = _a_as_kernel(v, dn.rhs_spec[0])
  if a_kernel is None:
    return fallback(ctx, eqn, invals)
  y = bind(eqn, [x, lax.stop_gradient(v.w)])[0]
  z = bind(eqn, [ctx.dropout(x, v.dropout), a_kernel])[0]
  z = z * jnp.asarray(v.scale, z.dtype)
  return [y + _rank_to(z, dn.out_spec[1], v).astype(y.dtype)]


def _grouped_conv(ctx, eqn, x, v: _Lazy):
  """A grouped or depthwise conv runs on ``W + ΔW``: a deliberate choice.

  ΔW = s·A·B is low rank over the kernel's own (kh·kw·in/groups, out)
  matrix, so it merges exactly. Factored, every group would meet the whole
  of ``a`` (a conv with groups·r outputs) and then a block-diagonal 1x1:
  measured on CPU, a train step of a 7x7 depthwise conv (96 channels) took
  62 s factored against 0.22 s on ``W + ΔW``, and a 32-group 3x3 conv 15 s
  against 11 s. The kernel is small, so ``W + ΔW`` is cheap. With dropout
  on, the branch is ``conv(drop(x), ΔW)`` added to ``conv(x, W)``.
  """
  if v.dropout == 0.0 or ctx.rng is None:
    return bind(eqn, [x, v.materialize()])
  delta = v.replace(w=jnp.zeros_like(v.w)).materialize()
  y = bind(eqn, [x, lax.stop_gradient(v.w)])[0]
  return [y + bind(eqn, [ctx.dropout(x, v.dropout), delta])[0]]


def _point_gather(ctx, eqn, invals):
  """``w[i]`` / ``jnp.take(w, i, axis)``: the same gather on each factor.

  Each factor is indexed on the axes of V it holds, with the index entries
  for those axes; its rank axis is kept whole. The result stays lazy.
  """
  v, idx = invals
  p = eqn.params
  dn = p["dimension_numbers"]
  sim, sizes = dn.start_index_map, p["slice_sizes"]
  if idx.ndim != 1 or idx.shape[0] != len(sim):
    return fallback(ctx, eqn, invals)
  kept = [d for d in range(v.ndim) if d not in dn.collapsed_slice_dims]
  renumber = {d: k for k, d in enumerate(kept)}
  renumber[None], renumber[ADAPTER] = None, ADAPTER

  def cut(x, dims):
    sel = [j for j, d in enumerate(sim) if d in dims]
    collapsed = tuple(dims.index(d) for d in dn.collapsed_slice_dims if d in dims)
    n_out = x.ndim - len(collapsed)
    f_dn = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(n_out)), collapsed_slice_dims=collapsed,
        start_index_map=tuple(dims.index(sim[j]) for j in sel))
    f_sizes = tuple(_per_axis(dims, x, lambda d: sizes[d], lambda n: n))
    y = lax.gather(x, idx[jnp.asarray(sel, jnp.int32)], f_dn, f_sizes,
                   mode=p["mode"], fill_value=p["fill_value"])
    return y, [renumber[d] for d in dims if d not in dn.collapsed_slice_dims]

  a, a_dims = cut(v.a, v.a_dims)
  b, b_dims = cut(v.b, v.b_dims)
  w = bind(eqn, [v.w, idx])[0]
  return [v.replace(w=w, a=a, b=b, a_dims=a_dims, b_dims=b_dims)]


def _gather(ctx, eqn, invals):
  v, idx = invals
  p = eqn.params
  dn = p["dimension_numbers"]
  point = (not is_lazy(idx) and not dn.operand_batching_dims
           and len(dn.offset_dims) == len(eqn.outvars[0].aval.shape))
  b_axes = [d for d in v.b_dims if isinstance(d, int)]
  if is_lazy(idx) or dn.operand_batching_dims or len(b_axes) != 1:
    return _point_gather(ctx, eqn, invals) if point else fallback(ctx, eqn, invals)
  out_axis = b_axes[0]
  sizes = list(p["slice_sizes"])
  if v.stacked:
    return _stacked_gather(ctx, eqn, v, idx, out_axis)
  a_kernel = _a_as_kernel(v, out_axis)
  if (a_kernel is None or out_axis in dn.start_index_map
      or out_axis in dn.collapsed_slice_dims or sizes[out_axis] != v.shape[out_axis]):
    return _point_gather(ctx, eqn, invals) if point else fallback(ctx, eqn, invals)
  y = bind(eqn, [lax.stop_gradient(v.w), idx])[0]
  sizes[out_axis] = v.a.shape[v.a_dims.index(None)]
  params = dict(p, slice_sizes=tuple(sizes))
  z = eqn.primitive.bind(a_kernel, idx, **params)
  kept = [d for d in range(v.ndim) if d not in dn.collapsed_slice_dims]
  z = z * jnp.asarray(v.scale, z.dtype)
  return [y + _rank_to(z, dn.offset_dims[kept.index(out_axis)], v).astype(y.dtype)]


def _ragged_dot(ctx, eqn, invals):
  """Grouped matmul over experts: ``x·W[g] + s·(x·A[g])·B[g]`` per row group.

  The kernel is ``(E, in, out)`` in any axis order (group, contracting and
  free axis of ``ragged_dot_general``'s rhs); its adapter is one ``(in, r)``
  / ``(r, out)`` pair per expert. Both skinny products are ``ragged_dot``
  calls with the same ``group_sizes``: each row meets only its own expert's factors,
  and no ``(E, in, out)`` array is formed.
  """
  lhs, rhs, sizes = invals
  p = eqn.params
  dn = p["ragged_dot_dimension_numbers"]
  (lc, rc), (lb, rb) = dn.dot_dimension_numbers
  if (is_lazy(lhs) or is_lazy(sizes) or not is_lazy(rhs) or rhs.ndim != 3 or lhs.ndim != 2
      or tuple(lc) != (1,) or lb or rb or tuple(dn.lhs_ragged_dimensions) != (0,)
      or len(dn.rhs_group_dimensions) != 1 or p.get("group_offset") is not None):
    return fallback(ctx, eqn, invals)
  g, k = dn.rhs_group_dimensions[0], rc[0]
  n = 3 - g - k
  a_k = _factor_as(rhs.a, rhs.a_dims, (g, k, None))
  b_k = _factor_as(rhs.b, rhs.b_dims, (g, None, n))
  if a_k is None or b_k is None:
    return fallback(ctx, eqn, invals)
  y = bind(eqn, [lhs, lax.stop_gradient(rhs.w), sizes])[0]
  prec, pref = p.get("precision"), p.get("preferred_element_type")
  t_out, z_out = explicit.factored_dot_shardings(y, ["m", "o"], ["m", "r"])  # explicit axes
  t = lax.ragged_dot(ctx.dropout(lhs, rhs.dropout), a_k, sizes, precision=prec,
                     preferred_element_type=pref, out_sharding=t_out)
  t = t * jnp.asarray(rhs.scale, t.dtype)
  if z_out is None:
    z = lax.ragged_dot(t, b_k, sizes, precision=prec, preferred_element_type=pref)
  else:  # explicit axes: B as (E, out, r), the layout whose sharded lowering works
    z = lax.ragged_dot_general(t, jnp.swapaxes(b_k, 1, 2), sizes, _B_LAST, precision=prec,
                               preferred_element_type=pref, out_sharding=z_out)
  return [y + z.astype(y.dtype)]


_B_LAST = lax.RaggedDotDimensionNumbers(  # t (m, r) · B[g] (out, r)
    dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=(0,),
    rhs_group_dimensions=(0,))


def _factor_as(x, dims, order):
  """Factor ``x`` transposed so its axes stand for ``order`` (V axes / None), or None."""
  if sorted(dims, key=str) != sorted(order, key=str):
    return None
  return jnp.transpose(x, [list(dims).index(d) for d in order])


def _stacked_gather(ctx, eqn, v: _Lazy, idx, out_axis: int):
  """An embedding lookup in a stack: row i reads adapter ids[i]'s rows of A."""
  dn = eqn.params["dimension_numbers"]
  sizes = eqn.params["slice_sizes"]
  if (out_axis in dn.start_index_map or out_axis in dn.collapsed_slice_dims
      or sizes[out_axis] != v.shape[out_axis]):
    raise NotImplementedError(f"lora: {v.path}: this lookup of a stacked kernel "
                              "has no factored rule")
  y = bind(eqn, [lax.stop_gradient(v.w), idx])[0]
  kept = [d for d in range(v.ndim) if d not in dn.collapsed_slice_dims]
  how = stack_strategies.pick(ctx, v, "gather", idx.shape[0], idx.size // idx.shape[-1],
                              v.a.shape[v.a_dims.index(None)], v.shape[out_axis])
  if how != "gather":
    z = stack_strategies.lookup(how, ctx, eqn, v, idx, out_axis,
                                dn.offset_dims[kept.index(out_axis)])
    return [y + z.astype(y.dtype)]
  z, fb, scale = _stacked_gather_a(v, out_axis, idx, eqn, ctx)
  z = z * _row_scale(scale, z.ndim, 0, z.dtype)
  z = _rank_to_rows(z, dn.offset_dims[kept.index(out_axis)], 0, fb)
  return [y + z.astype(y.dtype)]


# ---------------------------------------------------- higher-order primitives

def _inline(key):
  def rule(ctx, eqn, invals):
    closed = eqn.params[key]
    jaxpr = getattr(closed, "jaxpr", closed)
    return eval_jaxpr(jaxpr, getattr(closed, "consts", ()), invals, ctx)
  return rule


RULES = {
    "convert_element_type": _cast,
    "copy": _w_only, "copy_p": _w_only, "sharding_constraint": _constrain,
    "transpose": _transpose,
    "reshape": _reshape, "squeeze": _reshape, "broadcast_in_dim": _broadcast,
    "slice": _slice, "dynamic_slice": _dynamic_slice, "rev": _rev,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "gather": _gather,
    "ragged_dot_general": _ragged_dot,
    "jit": _inline("jaxpr"), "pjit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"), "core_call": _inline("call_jaxpr"),
    # custom_jvp / custom_vjp calls: custom_rules; remat, cond, while and
    # scan: control_rules (kernels that come out of them stay lazy)
}

# Rules that keep a DoRA value exact: the views carry its column scale in
# ``b`` (see ``interpreter._dora_factors``) and ``dot_general`` applies it. A
# DoRA kernel reaching any other rule (conv, gather, ragged_dot)
# gets ``W'`` formed, with the fallback's warning.
_NOT_DORA = ("conv_general_dilated", "gather", "ragged_dot_general")
for _name, _rule in RULES.items():
  interpreter.register(_name, _rule, dora=_name not in _NOT_DORA)
