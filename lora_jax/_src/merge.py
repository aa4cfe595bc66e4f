"""merge / unmerge / base, and the adapter view: adapter / attach."""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lora_jax._src import quant, stack, tree
from lora_jax._src.types import Params
from lora_jax._src.weight import (LoraWeight, Trainable, delta, describe, factor_shapes,
                                  is_node, node_problems)

Adapter = dict  # {path: LoraWeight(w=None, a, b, ...) | Trainable(value, base=None)}


def _spread(x, roles: str, kinds: str):
  """A factor ``(axes of kinds..., r)`` as an array of w's rank + 1 (rank
  last), its axes in w's order and size 1 on w's other axes."""
  pos = [d for d, r in enumerate(roles) if r == "s"] + [
      d for d, r in enumerate(roles) if r in kinds and r != "s"]
  order = sorted(range(len(pos)), key=pos.__getitem__)
  x = jnp.transpose(x, order + [len(pos)])
  shape = [x.shape[order.index(pos.index(d))] if d in pos else 1
           for d in range(len(roles))]
  return x.reshape(shape + [x.shape[-1]])


# Up to this rank ΔW is folded in as a sum of rank-1 products that XLA fuses
# with the add (no ΔW buffer; in place under donation). Above it, r multiply-
# adds per element cost more than a matmul (measured 54x a copy at r=64 on
# CPU vs 1.4x for dot + add), so ΔW is a matmul, one layer at a time.
FUSED_MAX_RANK = 16


def _fold_fused(w, lw: LoraWeight, sign: float):
  """``w ± ΔW`` as ``w + Σ_k a[..., k] ⊗ b[..., k]`` in one elementwise pass."""
  n_stack = lw.roles.count("s")
  a = _spread(lw.a.astype(jnp.float32) * (sign * lw.scale), lw.roles, "si")
  b = _spread(jnp.moveaxis(lw.b, n_stack, -1).astype(jnp.float32), lw.roles, "so")
  acc = w.astype(jnp.float32)
  for k in range(lw.rank):
    acc = acc + a[..., k] * b[..., k]
  return acc.astype(w.dtype)


def _fold(w, lw: LoraWeight, sign: float):
  """``w ± ΔW`` accumulated in float32, cast back to w's dtype.

  Memory: at most one layer's ΔW is alive at a time, so
  ``jax.jit(merge, donate_argnums=0)`` needs no second copy of the model.
  """
  if lw.rank <= FUSED_MAX_RANK:
    return _fold_fused(w, lw, sign)
  if lw.roles[0] == "s":  # stacked layers: one layer's ΔW at a time, in place
    def one(i, acc):
      layer = lw.replace(w=None, a=lw.a[i], b=lw.b[i], roles=lw.roles[1:],
                         scale=sign * lw.scale)
      d = delta(layer)[None]
      start = (i,) + (0,) * (w.ndim - 1)
      old = jax.lax.dynamic_slice(acc, start, d.shape)
      return jax.lax.dynamic_update_slice(
          acc, (old.astype(jnp.float32) + d).astype(w.dtype), start)
    return jax.lax.fori_loop(0, w.shape[0], one, w)
  d = delta(lw.replace(w=w, scale=sign * lw.scale))  # the one ΔW-sized temp
  return (w.astype(jnp.float32) + d).astype(w.dtype)


def _fold_dora(lw: LoraWeight):
  """DoRA's ``W' = m · (W + ΔW) / ‖W + ΔW‖_c`` in w's dtype (one ΔW-sized temp)."""
  from lora_jax._src import dora
  return dora.dora_kernel(lw).astype(lw.w.dtype)


def _check_nodes(what: str, leaves, need=("w", "a", "b", "value", "base")) -> None:
  """Raise one ValueError listing every node of ``leaves`` that is unusable."""
  errors = [e for path, x in leaves for e in node_problems(path, x, need)]
  if errors:
    raise ValueError(f"{what}: the params hold LoRA nodes that cannot be used:\n  "
                     + "\n  ".join(errors))


def merge(params: Params, *, requantize: bool = False) -> Params:
  """Fold every adapter into its kernel: plain params for zero-cost inference.

  The result has exactly the original tree structure, shapes and dtypes;
  ``Trainable`` leaves become their trained value. A quantized base (QLoRA)
  is dequantized to its ``compute_dtype`` first (the weights the adapter was
  trained against) and ``W + ΔW`` is returned in that dtype; every
  ``QuantizedWeight`` becomes a plain array.

  Args:
    params: params from ``lora_init``.
    requantize: with a quantized base, quantize each merged kernel again in
      its base's format and return ``(params, report)``, where ``report``
      maps each requantized path to its error against the dense merge
      (``{"rel_frobenius": ..., "max_abs": ...}``); kernels without an
      adapter keep their codes.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
    ...                  lj.LoraConfig(rank=1, targets="kernel"))
    >>> lj.merge(p)["kernel"].shape
    (4, 3)
  """
  stack.refuse_stack(params, "merge")
  if requantize:
    return quant.merge_requantized(params, merge)
  params = quant.dequantize(params)
  leaves, treedef = tree.flatten(params, is_leaf=is_node)
  _check_nodes("merge", leaves)
  out, last = [], None
  for _, x in leaves:
    if isinstance(x, LoraWeight):
      if x.rank > FUSED_MAX_RANK:
        if last is not None:
          x = x.replace(a=_after(out[last], x.a))
        last = len(out)
      out.append(_fold_dora(x) if x.dora else _fold(x.w, x, 1.0))
    else:
      out.append(x.value if isinstance(x, Trainable) else x)
  return jax.tree_util.tree_unflatten(treedef, out)


def _after(done, a):
  """``a``, made to depend on ``done``: ΔW-sized matmuls then run one at a time.

  Without it XLA (the CPU backend at least) runs every kernel's ``a @ b``
  first and holds all the ΔWs at once. The added term is exactly zero
  (``x == x`` is 0 or 1, never NaN), but XLA must wait for ``done``.
  """
  probe = done[(0,) * done.ndim]
  return a + (probe == probe).astype(a.dtype) * jnp.zeros((), a.dtype)


def base(params: Params) -> Params:
  """The original params: adapters turned off, trained leaves restored.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> w = jnp.ones((4, 3))
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": w}, lj.LoraConfig(rank=1, targets="kernel"))
    >>> bool((lj.base(p)["kernel"] == w).all())
    True
  """
  return _base(params, "base")


def _base(params: Params, what: str) -> Params:
  leaves, treedef = tree.flatten(params, is_leaf=lambda x: is_node(x) or stack.is_stack(x))
  _check_nodes(what, leaves, need=("w", "base"))
  out = [x.w if isinstance(x, (LoraWeight, stack.StackedLora)) else x.base if isinstance(x, Trainable)
         else x for _, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, out)


def adapter(params: Params) -> Adapter:
  """The adapter alone: ``{path: LoraWeight(w=None, a, b) | Trainable(value)}``.

  Holds A, B, each kernel's scale / roles / dropout, and the leaves trained
  in full; no base weights. ``attach`` puts it back on a base; checkpoints
  and task switching are built from it.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
    ...                  lj.LoraConfig(rank=1, targets="kernel"))
    >>> list(lj.adapter(p))
    ['kernel']
  """
  leaves, _ = tree.flatten(params, is_leaf=is_node)
  out = {}
  for path, x in leaves:
    if isinstance(x, LoraWeight):
      # a view, not a new node: no checks here (save_adapter and attach check
      # with the path in hand)
      out[path] = LoraWeight.tree_unflatten((x.scale, x.roles, x.dropout, x.dora),
                                            (None, x.a, x.b, x.m))
    elif isinstance(x, Trainable):
      out[path] = Trainable(x.value, None)
  if not out:
    raise ValueError(
        "adapter: the params hold no LoraWeight or Trainable node (found "
        f"{len(leaves)} plain leaves); pass the params returned by "
        "lora_jax.lora_init, lora_jax.attach or lora_jax.load_adapter")
  return out


def _check_adapter(adapter: Any, what: str) -> None:
  """``adapter`` must be ``{path: LoraWeight | Trainable}`` as from ``adapter``."""
  fix = ("Pass lj.adapter(lora_params) (or an adapter from a checkpoint): "
         "{'/'-joined path: LoraWeight | Trainable}")
  if not isinstance(adapter, Mapping):
    raise TypeError(f"{what}: the adapter must be a dict; got {describe(adapter)}. {fix}")
  if not adapter:
    raise ValueError(f"{what}: the adapter is empty. {fix}")
  bad = [f"{k!r}: {describe(v)}" for k, v in adapter.items()
         if not isinstance(k, str) or not is_node(v)]
  if bad:
    hint = (" (these look like nested params: call lj.adapter(...) on them first)"
            if any(isinstance(v, Mapping) for v in adapter.values()) else "")
    raise TypeError(f"{what}: the adapter maps each path to a LoraWeight or "
                    f"Trainable, but holds {', '.join(bad[:4])}"
                    f"{' ...' if len(bad) > 4 else ''}{hint}. {fix}")
  errors = [e for path, item in adapter.items()
            for e in node_problems(path, item, ("a", "b", "value"))]
  if errors:
    raise ValueError(f"{what}: the adapter is inconsistent:\n  " + "\n  ".join(errors))


def _check_fits(path: str, leaf: Any, item) -> None:
  if getattr(leaf, "shape", None) is None or getattr(leaf, "dtype", None) is None:
    raise ValueError(f"{path}: the base params hold {describe(leaf)} here, "
                     "expected an array (the kernel or leaf the adapter goes on)")
  shape = tuple(leaf.shape)
  if isinstance(item, Trainable):
    expected = {"value": tuple(item.value.shape)}
    found = {"value": shape}
  else:
    if len(item.roles) != len(shape):
      raise ValueError(f"{path}: the adapter's layout {item.roles!r} has "
                       f"{len(item.roles)} axes, the base kernel has shape {shape}")
    sa, sb = factor_shapes(shape, item.roles, item.a.shape[-1])
    expected = {"a": sa, "b": sb}
    found = {"a": tuple(item.a.shape), "b": tuple(item.b.shape)}
  if expected != found:
    raise ValueError(f"{path}: the adapter does not fit the base kernel of shape "
                     f"{shape}: adapter has {found}, the base needs {expected}")


def _apply(params: Params, adapter: Adapter, fn, what: str) -> Params:
  """``fn(leaf, item)`` at each adapter path; ``adapter`` already checked."""
  leaves, treedef = tree.flatten(params, is_leaf=is_node)
  paths = {p for p, _ in leaves}
  missing = sorted(set(adapter) - paths)
  errors = [f"{p}: not in the base params" for p in missing]
  out = []
  for path, x in leaves:
    if path in adapter:
      try:
        _check_fits(path, x, adapter[path])
        x = fn(x, adapter[path])
      except ValueError as e:
        errors.append(str(e))
    out.append(x)
  if errors:
    raise ValueError(f"{what}: the adapter does not match the params:\n  "
                     + "\n  ".join(errors)
                     + (f"\nPaths that exist:{tree.some_paths(sorted(paths))}"
                        if missing else ""))
  return jax.tree_util.tree_unflatten(treedef, out)


def attach(base_params: Params, adapter: Adapter) -> Params:
  """Put an adapter (from ``adapter`` or a checkpoint) on base params.

  Adapters already on ``base_params`` are taken off first (``base``), so
  attaching switches tasks rather than stacking adapters.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> w = {"kernel": jnp.ones((4, 3))}
    >>> p = lj.lora_init(jax.random.key(0), w, lj.LoraConfig(rank=1, targets="kernel"))
    >>> type(lj.attach(w, lj.adapter(p))["kernel"]).__name__
    'LoraWeight'
  """
  def put(leaf, item):
    if isinstance(item, Trainable):
      return Trainable(jnp.asarray(item.value).astype(leaf.dtype), leaf)
    return item.replace(w=leaf)
  if stack.is_stacked_adapter(adapter):
    return stack.attach_stack(base_params, adapter)
  _check_adapter(adapter, "attach")
  return _apply(_base(base_params, "attach"), adapter, put, "attach")


def unmerge(merged: Params, adapter: Adapter) -> Params:
  """Subtract an adapter's ΔW from merged params (for task switching).

  Leaves the adapter trained in full cannot be subtracted; they stay as they
  are in ``merged`` until another adapter is attached over them.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> w = {"kernel": jnp.ones((4, 3))}
    >>> p = lj.lora_init(jax.random.key(0), w, lj.LoraConfig(rank=1, targets="kernel"))
    >>> back = lj.unmerge(lj.merge(p), lj.adapter(p))
    >>> bool(jnp.allclose(back["kernel"], w["kernel"]))
    True
  """
  def sub(leaf, item):
    return leaf if isinstance(item, Trainable) else _fold(leaf, item, -1.0)
  _check_adapter(adapter, "unmerge")
  dora_paths = [p for p, x in adapter.items() if isinstance(x, LoraWeight) and x.dora]
  if dora_paths:
    raise ValueError(
        f"unmerge: the adapter is DoRA at {dora_paths[:4]}: a merged DoRA kernel "
        "m·(W+ΔW)/‖W+ΔW‖_c does not determine W (the column norms are lost), so it "
        "cannot be subtracted. Keep the base params (lj.base(params)) and attach "
        "adapters to them instead.")
  nodes = [p for p, x in tree.flatten(merged, is_leaf=is_node)[0] if is_node(x)]
  if nodes:
    raise ValueError(
        f"unmerge: the params still hold LoRA nodes at {nodes[:4]}"
        f"{' ...' if len(nodes) > 4 else ''}; unmerge subtracts an adapter from "
        "merged plain params (lj.merge(params)). To turn the adapters off, use "
        "lj.base(params).")
  return _apply(merged, adapter, sub, "unmerge")
