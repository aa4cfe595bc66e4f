"""Pure conversion of whole state dicts: ``unpack_state_dict`` / ``pack_state_dict``.

Torch-style ``{key: tensor}`` <-> Flax params through a name map
(``names.py``) and the single-tensor conversions (``tensors.py``); every key
that does not line up is reported at once in one ``ConversionError``. No
file I/O here (``files.py``).
"""

import re
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import tree
from lora_jax._src.interop.names import (LAYER, NameMap, Target, as_target_map, leaf_layout,
                                         torch_keys)
from lora_jax._src.interop.tensors import (leaf_from_torch, leaf_to_torch, mismatch_hint,
                                           part_axis, take_part, to_numpy)
from lora_jax._src.weight import is_node

_SHOW = 50


def _listing(title: str, items: list[str]) -> str:
  shown = "".join(f"\n    {s}" for s in items[:_SHOW])
  more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
  return f"\n  {title} ({len(items)}):{shown}{more}"


class ConversionError(ValueError):
  """Keys that did not line up, all of them, in one error.

  Attributes:
    unmapped: Flax paths the name map sent to no torch key.
    missing: ``(flax_path, torch_key)`` pairs whose torch key is absent.
    unexpected: torch keys no Flax leaf asked for.
    mismatched: ``(flax_path, torch_key, torch_shape, flax_shape[, hint])``.
  """

  def __init__(self, where: str, *, unmapped=(), missing=(), unexpected=(),
               mismatched=(), other=()):
    self.unmapped, self.missing = list(unmapped), list(missing)
    self.unexpected, self.mismatched = list(unexpected), list(mismatched)
    self.other = list(other)
    msg = f"{where}: the weights do not line up with the Flax params."
    if self.unmapped:
      msg += _listing("Flax leaves the name map maps to no torch key", self.unmapped)
    if self.missing:
      msg += _listing("missing torch keys (flax path <- torch key)",
                      [f"{p} <- {k}" for p, k in self.missing])
    if self.unexpected:
      msg += _listing("unexpected torch keys (no Flax leaf maps to them; "
                      "pass ignore=[regex] to skip)", self.unexpected)
    if self.mismatched:
      msg += _listing("shape mismatches", [
          f"{p} <- {k}: torch {tuple(ts)} does not convert to Flax {tuple(fs)}"
          + "".join(hint) for p, k, ts, fs, *hint in self.mismatched])
    if self.other:
      msg += _listing("other problems", self.other)
    super().__init__(msg)


# --- torch -> flax --------------------------------------------------------------

def _target_dtype(policy: Any, leaf: Any, value: np.ndarray):
  if isinstance(policy, str) and policy == "template":
    return leaf.dtype
  if isinstance(policy, str) and policy == "keep":
    return value.dtype
  return jnp.dtype(policy)


def _place(value: np.ndarray, leaf: Any, policy: Any) -> jax.Array:
  value = value.astype(_target_dtype(policy, leaf, value), copy=False)
  sharding = getattr(leaf, "sharding", None)
  if sharding is not None:
    return jax.device_put(value, sharding)
  return jnp.asarray(value)


def _check_policy(dtype: Any) -> None:
  if isinstance(dtype, str) and dtype in ("template", "keep"):
    return
  try:
    jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"dtype must be 'template', 'keep' or a dtype; got {dtype!r}") from e


def _leaf_from(w: np.ndarray, shape: tuple, path: str, target: Target):
  """``(value, None)`` or ``(None, (torch_shape, flax_shape, hint))``."""
  layout = leaf_layout(path, target.layout)
  whole = w
  if target.part is not None:
    w = take_part(w, target.part, layout)
    if w is None:
      i, n = target.part
      return None, (whole.shape, shape, f"; part {i} of {n}: axis {part_axis(layout)} "
                                        f"does not split into {n} equal slices")
  v = leaf_from_torch(w, shape, layout)
  if v is None:
    where = "" if target.part is None else f"; part {target.part} is {w.shape}"
    hint = where + mismatch_hint(w, shape, layout)
    return None, (whole.shape, shape) + ((hint,) if hint else ())
  return v, None


def unpack_state_dict(state_dict: Mapping[str, Any], template: Any,
                      name_map: NameMap, *, dtype: Any = "template",
                      strict: bool = True, ignore: Sequence[str] = ()) -> Any:
  """Torch-style state dict -> Flax params shaped like ``template``.

  Args:
    state_dict: ``{torch_key: tensor}``, torch tensors or numpy arrays (or a
      lazy mapping from ``read_state_dict``).
    template: the Flax params tree, arrays or ``jax.ShapeDtypeStruct`` (e.g.
      ``jax.eval_shape(model.init, key, x)["params"]``); its shapes decide
      the conversions, its dtypes the ``"template"`` dtype policy and its
      shardings (where set) where each leaf is placed.
    name_map: Flax path -> torch key (see ``lora_jax.interop.torch``).
    dtype: ``"template"`` casts to each template leaf's dtype; ``"keep"``
      keeps the torch dtype; a dtype casts everything to it.
    strict: raise one ``ConversionError`` listing every unmapped, missing,
      unexpected and mis-shaped key. With ``strict=False`` unexpected keys
      are skipped and leaves that could not be loaded keep the template's
      value (a warning lists them; abstract template leaves still raise).
    ignore: regexes (fullmatch) of torch keys to skip silently.

  Each leaf is converted as its rule's layout says (``lora_jax.interop.Rule``:
  ``"auto"``, ``"transposed"``, ``"as_is"``, ``"conv1d"``); a rule with
  ``part=(i, n)`` takes slice ``i`` of ``n`` of a fused torch tensor. A shape
  mismatch says when another layout would fit (e.g. a GPT-2 ``Conv1D``).

  Returns:
    Params with the template's structure.

  Raises:
    ConversionError: on any problem, listing all of them.

  Example:
    >>> import jax, numpy as np
    >>> template = {"fc": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32),
    ...                    "bias": jax.ShapeDtypeStruct((2,), np.float32)}}
    >>> sd = {"fc.weight": np.ones((2, 3)), "fc.bias": np.zeros(2)}
    >>> p = unpack_state_dict(sd, template, [(r"fc/kernel", "fc.weight"),
    ...                                      (r"fc/bias", "fc.bias")])
    >>> p["fc"]["kernel"].shape, p["fc"]["kernel"].dtype
    ((3, 2), dtype('float32'))
  """
  _check_policy(dtype)
  target_of = as_target_map(name_map)
  skip = [re.compile(p) for p in ignore]
  leaves, treedef = tree.flatten(template)
  used: set[str] = set()
  unmapped, missing, mismatched, out = [], [], [], []
  for path, leaf in leaves:
    out.append(None)
    target = target_of(path)
    if target is None:
      unmapped.append(path)
      continue
    shape = tuple(leaf.shape)
    keys = torch_keys(target.key, shape)
    absent = [k for k in keys if k not in state_dict]
    missing += [(path, k) for k in absent]
    used.update(keys)
    if absent:
      continue
    per = shape[1:] if LAYER in target.key else shape
    parts = []
    for k in keys:
      v, bad = _leaf_from(to_numpy(state_dict[k]), per, path, target)
      if v is None:
        mismatched.append((path, k) + bad)
        break
      parts.append(v)
    else:
      value = np.stack(parts) if LAYER in target.key else parts[0]
      out[-1] = _place(value, leaf, dtype)
  unexpected = [k for k in state_dict
                if k not in used and not any(r.fullmatch(k) for r in skip)]
  problems = dict(unmapped=unmapped, missing=missing, mismatched=mismatched)
  if strict and (unmapped or missing or mismatched or unexpected):
    raise ConversionError("unpack_state_dict", unexpected=unexpected, **problems)
  failed = [k for k, x in enumerate(out) if x is None]
  if failed:
    if any(not isinstance(leaves[k][1], (jax.Array, np.ndarray)) for k in failed):
      raise ConversionError("unpack_state_dict (abstract template leaves cannot "
                            "be kept)", **problems)
    warnings.warn(str(ConversionError("unpack_state_dict: kept the template value "
                                      "for", **problems)), stacklevel=2)
    for k in failed:
      out[k] = jnp.asarray(leaves[k][1])
  return jax.tree_util.tree_unflatten(treedef, out)


# --- flax -> torch --------------------------------------------------------------

def pack_state_dict(params: Any, name_map: NameMap, *,
                    shapes: Mapping[str, Sequence[int]] | None = None,
                    dtype: Any = None, strict: bool = True) -> dict[str, np.ndarray]:
  """Flax params -> torch-style state dict of (C-contiguous) numpy arrays.

  Args:
    params: plain Flax params (``lora_jax.merge`` adapters in first).
    name_map: Flax path -> torch key (see ``lora_jax.interop.torch``).
    shapes: ``{torch_key: shape}`` of the torch tensors, e.g.
      ``{k: v.shape for k, v in torch_model.state_dict().items()}``. Needed
      only for kernels of 3+ axes (DenseGeneral vs conv).
    dtype: cast every tensor to this dtype (default: keep).
    strict: raise for leaves the name map sends nowhere; ``False`` skips them.

  Each leaf is converted as its rule's layout says (``lora_jax.interop.Rule``);
  the leaves of a fused tensor (rules with ``part=(i, n)``) are concatenated
  along its output axis, and all ``n`` must be there.

  Returns:
    ``{torch_key: np.ndarray}``.

  Example:
    >>> import numpy as np
    >>> params = {"fc": {"kernel": np.ones((3, 2), np.float32)}}
    >>> pack_state_dict(params, [(r"fc/kernel", "fc.weight")])["fc.weight"].shape
    (2, 3)
  """
  target_of = as_target_map(name_map)
  shapes = shapes or {}
  out: dict[str, np.ndarray] = {}
  fused: dict[str, dict] = {}
  unmapped, other = [], []
  for path, leaf in tree.flatten(params, is_leaf=is_node)[0]:
    if is_node(leaf):
      raise TypeError(f"pack_state_dict: {path} holds a {type(leaf).__name__}; "
                      "fold adapters in with lora_jax.merge(params) first")
    target = target_of(path)
    if target is None:
      unmapped.append(path)
      continue
    x = to_numpy(leaf)
    if dtype is not None:
      x = x.astype(jnp.dtype(dtype))
    layout = leaf_layout(path, target.layout)
    keys = torch_keys(target.key, x.shape)
    for k, part in zip(keys, list(x) if LAYER in target.key else [x]):
      if k in out or (target.part is None and k in fused):
        other.append(f"{path} -> {k}: two Flax leaves map to this key")
        continue
      try:
        torch_shape = _part_shape(shapes.get(k), target.part, layout)
        t = np.ascontiguousarray(leaf_to_torch(part, layout, torch_shape))
      except ValueError as e:
        other.append(f"{path} -> {k}: {e}")
        continue
      if target.part is None:
        out[k] = t
      else:
        fused.setdefault(k, {"n": target.part[1], "layout": layout, "parts": {}})
        fused[k]["parts"].setdefault(target.part[0], []).append(path)
        fused[k].setdefault("values", {})[target.part[0]] = t
  for k, f in fused.items():
    problem = _fuse_problem(f)
    if problem:
      other.append(f"{k}: {problem}")
    else:
      vals = [f["values"][i] for i in range(f["n"])]
      out[k] = np.ascontiguousarray(np.concatenate(
          vals, axis=part_axis(f["layout"]) if vals[0].ndim > 1 else 0))
  if other or (strict and unmapped):
    raise ConversionError("pack_state_dict", unmapped=unmapped if strict else (),
                          other=other)
  return out


def _part_shape(shape, part, layout: str):
  """The torch shape of one part of a fused tensor of ``shape`` (None if unknown)."""
  if shape is None or part is None:
    return shape
  shape = list(shape)
  axis = part_axis(layout) if len(shape) > 1 else 0
  shape[axis] //= part[1]
  return tuple(shape)


def _fuse_problem(f: dict) -> str | None:
  """Why the parts of one fused torch tensor cannot be concatenated, or None."""
  n, parts = f["n"], f["parts"]
  twice = {i: p for i, p in parts.items() if len(p) > 1}
  if twice:
    return f"part(s) given by several Flax leaves: {twice}"
  absent = [i for i in range(n) if i not in parts]
  if absent:
    return (f"fused tensor of {n} parts lacks part(s) {absent} (have "
            f"{ {i: p[0] for i, p in sorted(parts.items())} })")
  shapes = {v.shape for v in f["values"].values()}
  if len({tuple(np.delete(s, part_axis(f["layout"]) if len(s) > 1 else 0))
          for s in shapes}) > 1:
    return f"parts have shapes that do not concatenate: {sorted(shapes)}"
  return None
