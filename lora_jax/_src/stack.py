"""Many adapters on one base: a stack, served in one mixed batch.

``stack_adapters`` turns N ordinary adapters (``{path: LoraWeight(w=None)}``)
into one adapter ``{path: StackedLora}`` whose factors carry a leading adapter
axis: ``a`` (N,) + a's shape, ``b`` (N,) + b's shape, ranks zero-padded to
the largest (exact: the padded rank columns are zero), and the scales an
array (N,) so replacing an adapter's values never changes the pytree
structure (no recompilation). ``lj.attach(base, stack)`` puts it on a base;
``lj.lora(fn)(params, x, adapter_ids=ids)`` then runs example ``i`` with
adapter ``ids[i]`` (``-1``: the base alone), each kernel by the strategy a cost
model picks (per-row gathers, a one-hot mask over all adapters, or sorted row
tiles: ``_src/stack_strategies.py``).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import tree
from lora_jax._src.types import Params

Adapter = dict  # {path: LoraWeight(w=None, a, b)}, as lj.adapter returns
from lora_jax._src.weight import LoraWeight, Trainable, _NotAnArray, describe, is_node


@jax.tree_util.register_pytree_with_keys_class
class StackedLora(_NotAnArray):
  """N adapters of one kernel: ``a`` (N, ...a), ``b`` (N, ...b).

  Attributes:
    w: the frozen base kernel, or ``None`` for a stack alone.
    a: factors of shape ``(N,) + stack + in + (rank,)`` (rank = the largest
      member's; smaller members are zero-padded).
    b: factors of shape ``(N,) + stack + (rank,) + out``.
    scales: float32 array (N,): each member's ``alpha / rank``.
    ranks: int32 array (N,): each member's true rank.
    dropouts: float32 array (N,): each member's dropout (kept for export;
      a stack serves without dropout).
    roles: the kernel's axis roles, as in ``LoraWeight``.
    names: the members' names (static).

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"k": jnp.ones((4, 3))},
    ...                  lj.LoraConfig(rank=2, targets="k"))
    >>> s = lj.stack_adapters([lj.adapter(p)] * 3)
    >>> s["k"].a.shape, s["k"].names
    ((3, 4, 2), ('adapter_0', 'adapter_1', 'adapter_2'))
  """

  __slots__ = ("w", "a", "b", "scales", "ranks", "dropouts", "roles", "names")
  _kind = "stacked adapter (StackedLora)"

  def __init__(self, w, a, b, scales, ranks, dropouts, *, roles: str, names):
    self.w, self.a, self.b = w, a, b
    self.scales, self.ranks, self.dropouts = scales, ranks, dropouts
    self.roles, self.names = roles, tuple(names)

  def tree_flatten_with_keys(self):
    k = jax.tree_util.GetAttrKey
    return ((k("w"), self.w), (k("a"), self.a), (k("b"), self.b),
            (k("scales"), self.scales), (k("ranks"), self.ranks),
            (k("dropouts"), self.dropouts)), (self.roles, self.names)

  @classmethod
  def tree_unflatten(cls, aux, children):
    self = object.__new__(cls)
    self.w, self.a, self.b, self.scales, self.ranks, self.dropouts = children
    self.roles, self.names = aux
    return self

  def replace(self, **changes) -> "StackedLora":
    f = {s: getattr(self, s) for s in self.__slots__}
    f.update(changes)
    roles, names = f.pop("roles"), f.pop("names")
    return StackedLora(**f, roles=roles, names=names)

  @property
  def size(self) -> int:
    """N, the number of adapters."""
    return len(self.names)

  def __repr__(self) -> str:
    return (f"StackedLora(names={self.names}, a={getattr(self.a, 'shape', self.a)}, "
            f"b={getattr(self.b, 'shape', self.b)}, roles={self.roles!r})")


def is_stack(x: Any) -> bool:
  return isinstance(x, StackedLora)


def is_stacked_adapter(adapter: Any) -> bool:
  """True for ``{path: StackedLora}`` as ``stack_adapters`` returns."""
  return (isinstance(adapter, Mapping) and bool(adapter)
          and all(is_stack(v) for v in adapter.values()))


def refuse_stack(params: Any, what: str) -> None:
  """Raise if ``params`` hold a stack: it has no single ``W + ΔW``."""
  leaves, _ = tree.flatten(params, is_leaf=is_stack)
  paths = [p for p, x in leaves if is_stack(x)]
  if paths:
    names = next(x for _, x in leaves if is_stack(x)).names
    raise ValueError(
        f"{what}: the params hold a stack of adapters {names} at {paths[:3]}; a stack "
        "has no single W + ΔW. Serve it with lj.lora(fn)(params, x, adapter_ids=ids), "
        "or merge one member: lj.merge(lj.attach(lj.base(params), "
        "lj.unstack_adapters(params)[name]))")


def _as_adapter(x: Any, name: str) -> dict:
  """An adapter ``{path: LoraWeight}`` from an adapter or LoRA params."""
  if isinstance(x, Mapping) and x and all(isinstance(v, (LoraWeight, Trainable))
                                          for v in x.values()):
    items = dict(x)
  else:
    leaves, _ = tree.flatten(x, is_leaf=is_node)
    items = {p: v for p, v in leaves if is_node(v)}
    if not items:
      raise TypeError(
          f"stack_adapters: adapter {name!r} is {describe(x)} with no LoraWeight "
          "node; pass adapters from lj.adapter(lora_params) / lj.load_adapter, "
          "or the LoRA params from lj.lora_init")
  bad = [p for p, v in items.items() if isinstance(v, Trainable)]
  if bad:
    raise ValueError(
        f"stack_adapters: adapter {name!r} trains {bad[:3]} in full (Trainable "
        "leaves, PEFT's modules_to_save); a stack shares every non-LoRA leaf, so "
        "only LoRA factors can be stacked. Merge those leaves into the base first.")
  return items


def _check_same_targets(adapters: list[dict], names: list[str]) -> None:
  ref = set(adapters[0])
  for ad, name in zip(adapters[1:], names[1:]):
    missing, extra = sorted(ref - set(ad)), sorted(set(ad) - ref)
    if missing or extra:
      raise ValueError(
          f"stack_adapters: adapter {name!r} targets other kernels than "
          f"{names[0]!r}: missing {missing[:4]}, extra {extra[:4]}. Every member "
          "of a stack must adapt the same paths (train them with one LoraConfig "
          "targets).")


def _member_problem(path: str, name: str, lw: LoraWeight, ref: LoraWeight,
                    ref_name: str) -> str | None:
  """Why ``lw`` cannot share a stack slot with ``ref`` (same base and layout)."""
  if not isinstance(lw, LoraWeight):
    return f"{path}: adapter {name!r} holds {describe(lw)}, expected a LoraWeight"
  if lw.roles != ref.roles:
    return (f"{path}: adapter {name!r} has layout {lw.roles!r}, adapter "
            f"{ref_name!r} has {ref.roles!r}")
  sa, ra = tuple(lw.a.shape[:-1]), tuple(ref.a.shape[:-1])
  n_s = lw.roles.count("s")
  sb = tuple(lw.b.shape[:n_s] + lw.b.shape[n_s + 1:])
  rb = tuple(ref.b.shape[:n_s] + ref.b.shape[n_s + 1:])
  if (sa, sb) != (ra, rb):
    return (f"{path}: adapter {name!r} is for a kernel with in-axes {sa} and "
            f"out-axes {sb}, adapter {ref_name!r} for {ra} and {rb}: they adapt "
            "different base models")
  return None


def _pad(lw: LoraWeight, rank: int, dtype):
  n_s = lw.roles.count("s")
  r = lw.a.shape[-1]
  a = jnp.pad(jnp.asarray(lw.a, dtype), [(0, 0)] * (lw.a.ndim - 1) + [(0, rank - r)])
  pad_b = [(0, 0)] * lw.b.ndim
  pad_b[n_s] = (0, rank - r)
  return a, jnp.pad(jnp.asarray(lw.b, dtype), pad_b)


def stack_adapters(adapters: Sequence[Adapter], names: Sequence[str] | None = None
                   ) -> dict[str, StackedLora]:
  """Stack N adapters for one base into one adapter with a leading adapter axis.

  Ranks are zero-padded to the largest (exact); the scales become an array,
  so ``set_adapter`` can replace a member without recompiling. Attach the
  stack with ``lj.attach(base_params, stack)`` and call
  ``lj.lora(fn)(params, x, adapter_ids=ids)``.

  Args:
    adapters: adapters (``lj.adapter(...)``, ``lj.load_adapter``) or LoRA
      params, all for the same base and the same target paths.
    names: one unique name per adapter (default ``adapter_0``, ...).

  Returns:
    ``{path: StackedLora}``.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> w = {"k": jnp.ones((4, 3))}
    >>> ads = [lj.adapter(lj.lora_init(jax.random.key(i), w,
    ...        lj.LoraConfig(rank=r, targets="k"))) for i, r in enumerate((1, 2))]
    >>> s = lj.stack_adapters(ads, names=["x", "y"])
    >>> s["k"].a.shape, s["k"].ranks.tolist()
    ((2, 4, 2), [1, 2])
  """
  if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or not adapters:
    raise TypeError("stack_adapters: expected a non-empty list of adapters, got "
                    f"{describe(adapters)}")
  names = [f"adapter_{i}" for i in range(len(adapters))] if names is None else list(names)
  if len(names) != len(adapters) or len(set(names)) != len(names) or not all(
      isinstance(n, str) for n in names):
    raise ValueError(f"stack_adapters: names must be {len(adapters)} unique strings "
                     f"(one per adapter), got {names!r}")
  ads = [_as_adapter(x, n) for x, n in zip(adapters, names)]
  _check_same_targets(ads, names)
  out = {}
  for path in ads[0]:
    members = [ad[path] for ad in ads]
    problems = [_member_problem(path, n, lw, members[0], names[0])
                for n, lw in zip(names, members)]
    problems = [p for p in problems if p]
    problems += [f"{path}: adapter {n!r} is DoRA (it has a magnitude m); a stack holds "
                 "plain LoRA factors only: merge it (lj.merge) or serve it alone"
                 for n, lw in zip(names, members) if getattr(lw, "dora", False)]
    if problems:
      raise ValueError("stack_adapters: the adapters cannot share a stack:\n  "
                       + "\n  ".join(problems))
    out[path] = _stack_one(members, names)
  return out


def _stack_one(members: list[LoraWeight], names) -> StackedLora:
  rank = max(int(lw.a.shape[-1]) for lw in members)
  dtype = jnp.result_type(*[lw.a for lw in members], *[lw.b for lw in members])
  padded = [_pad(lw, rank, dtype) for lw in members]
  return StackedLora(
      None, jnp.stack([a for a, _ in padded]), jnp.stack([b for _, b in padded]),
      jnp.asarray([lw.scale for lw in members], jnp.float32),
      jnp.asarray([lw.a.shape[-1] for lw in members], jnp.int32),
      jnp.asarray([lw.dropout for lw in members], jnp.float32),
      roles=members[0].roles, names=names)


def _stack_of(stack: Any, what: str) -> dict:
  """The ``{path: StackedLora}`` of a stack or of params holding one."""
  if is_stacked_adapter(stack):
    return dict(stack)
  leaves, _ = tree.flatten(stack, is_leaf=lambda x: is_stack(x) or is_node(x))
  found = {p: v for p, v in leaves if is_stack(v)}
  if not found:
    raise TypeError(f"{what}: expected a stack from lj.stack_adapters (or params "
                    f"holding one), got {describe(stack)} with no StackedLora")
  return found


def _slot(stack: dict, k, what: str) -> int:
  names = next(iter(stack.values())).names
  if isinstance(k, str):
    if k not in names:
      raise KeyError(f"{what}: no adapter named {k!r} in the stack; it holds {names}")
    return names.index(k)
  if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not (
      -len(names) <= k < len(names)):
    raise IndexError(f"{what}: slot {k!r} is not an adapter of the stack: use an "
                     f"int in [0, {len(names)}) or one of the names {names}")
  return int(k) % len(names)


def set_adapter(stack: Any, k: int | str, adapter: Adapter, name: str | None = None):
  """A new stack with slot ``k`` (an index or a name) holding ``adapter``.

  Pure: ``stack`` is not changed. Same N and padded rank, so a jitted
  ``lj.lora(fn)`` reuses its compiled program (a new ``name`` is a new
  structure and does recompile). Works on a stack alone or on params
  holding one (``lj.attach(base, stack)``).

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> w = {"k": jnp.ones((4, 3))}
    >>> ads = [lj.adapter(lj.lora_init(jax.random.key(i), w,
    ...        lj.LoraConfig(rank=2, targets="k"))) for i in range(3)]
    >>> s = lj.set_adapter(lj.stack_adapters(ads[:2]), 1, ads[2])
    >>> bool(jnp.all(s["k"].a[1] == ads[2]["k"].a))
    True
  """
  found = _stack_of(stack, "set_adapter")
  i = _slot(found, k, "set_adapter")
  first = next(iter(found.values()))
  old = first.names[i]
  ad = _as_adapter(adapter, name or old)
  missing, extra = sorted(set(found) - set(ad)), sorted(set(ad) - set(found))
  if missing or extra:
    raise ValueError(f"set_adapter: the adapter for slot {i} ({old!r}) targets other "
                     f"kernels than the stack: missing {missing[:4]}, extra {extra[:4]}")
  new = {}
  for path, s in found.items():
    new[path] = _put(path, s, i, ad[path], name)

  def swap(x):
    return new[_path_of[id(x)]] if is_stack(x) else x
  _path_of = {id(v): p for p, v in found.items()}
  return jax.tree.map(swap, stack, is_leaf=lambda x: is_stack(x) or is_node(x))


def _put(path: str, s: StackedLora, i: int, lw: LoraWeight, name) -> StackedLora:
  ref = _member(s, 0, path)
  problem = _member_problem(path, name or s.names[i], lw, ref, s.names[0])
  if problem:
    raise ValueError(f"set_adapter: {problem}")
  rank = s.a.shape[-1]
  if lw.a.shape[-1] > rank:
    raise ValueError(
        f"set_adapter: {path}: adapter {name or s.names[i]!r} has rank "
        f"{lw.a.shape[-1]}, the stack's padded rank is {rank}; build a new stack "
        "with lj.stack_adapters (a larger rank changes the compiled shapes)")
  a, b = _pad(lw, rank, s.a.dtype)
  names = list(s.names)
  if name is not None:
    names[i] = name
  return s.replace(a=s.a.at[i].set(a), b=s.b.at[i].set(b),
                   scales=s.scales.at[i].set(lw.scale),
                   ranks=s.ranks.at[i].set(lw.a.shape[-1]),
                   dropouts=s.dropouts.at[i].set(lw.dropout), names=names)


def _member(s: StackedLora, i: int, path: str) -> LoraWeight:
  """Member ``i`` of one stacked kernel, at its true rank."""
  r = int(np.asarray(s.ranks)[i])
  n_s = s.roles.count("s")
  b = jax.lax.slice_in_dim(s.b[i], 0, r, axis=n_s)
  return LoraWeight(None, s.a[i][..., :r], b, scale=float(np.asarray(s.scales)[i]),
                    roles=s.roles, dropout=float(np.asarray(s.dropouts)[i]))


def unstack_adapters(stack: Any) -> dict[str, dict[str, LoraWeight]]:
  """The members of a stack as ordinary adapters, ``{name: adapter}``.

  Each member is cut back to its own rank, scale and dropout, so it saves,
  merges or exports to PEFT on its own (``lj.interop.save_peft_adapter``).

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> w = {"k": jnp.ones((4, 3))}
    >>> ads = [lj.adapter(lj.lora_init(jax.random.key(i), w,
    ...        lj.LoraConfig(rank=r, targets="k"))) for i, r in enumerate((1, 2))]
    >>> out = lj.unstack_adapters(lj.stack_adapters(ads, names=["x", "y"]))
    >>> {n: ad["k"].rank for n, ad in out.items()}
    {'x': 1, 'y': 2}
  """
  found = _stack_of(stack, "unstack_adapters")
  names = next(iter(found.values())).names
  return {n: {p: _member(s, i, p) for p, s in found.items()}
          for i, n in enumerate(names)}


def attach_stack(base_params: Params, stack: dict) -> Params:
  """``lj.attach`` for a stack: each StackedLora takes its base kernel."""
  leaves, treedef = tree.flatten(base_params, is_leaf=lambda x: is_stack(x) or is_node(x))
  paths = {p for p, _ in leaves}
  missing = sorted(set(stack) - paths)
  if missing:
    raise ValueError(f"attach: the stack's paths {missing[:4]} are not in the base "
                     f"params. Paths that exist:{tree.some_paths(sorted(paths))}")
  out, errors = [], []
  for path, x in leaves:
    x = x.w if isinstance(x, (LoraWeight, StackedLora)) else x
    if path in stack:
      s = stack[path]
      want = _member_shape(s)
      if tuple(getattr(x, "shape", ())) != want:
        errors.append(f"{path}: the base kernel has shape "
                      f"{tuple(getattr(x, 'shape', ()))}, the stack's members fit "
                      f"{want}")
      x = s.replace(w=x)
    out.append(x)
  if errors:
    raise ValueError("attach: the stack does not fit the base params:\n  "
                     + "\n  ".join(errors))
  return jax.tree_util.tree_unflatten(treedef, out)


def _member_shape(s: StackedLora) -> tuple:
  """The base kernel shape the stacked factors fit."""
  n_s = s.roles.count("s")
  a, b = s.a.shape[1:], s.b.shape[1:]
  stack, ins, outs = a[:n_s], list(a[n_s:-1]), list(b[n_s + 1:])
  shape = []
  for r in s.roles:
    shape.append(stack[len(shape)] if r == "s" else ins.pop(0) if r == "i" else outs.pop(0))
  return tuple(shape)
