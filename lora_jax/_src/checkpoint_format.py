"""The adapter checkpoint format, pure: ``pack`` / ``unpack`` and the checks.

``pack`` splits params into ``(arrays, description)``: a nested dict of A, B
and trained values under Orbax-safe keys (``escape``), and a JSON
description (format, version, config, and per path the kind, roles, rank,
scale, dropout, shapes and dtypes). ``unpack`` attaches restored arrays to
base params. ``fit_errors`` and ``restore_target`` serve loading; the
checks of a description are in ``checkpoint_check.py``, the Orbax I/O in
``checkpoint.py``.
"""

import json
import re
from typing import Any

import jax
import numpy as np

from lora_jax._src import merge, sharding, tree
from lora_jax._src.types import Params
from lora_jax._src.weight import LoraWeight, Trainable, factor_shapes, is_node

FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 2  # 2: per-field sha256 checksums (checkpoint_check.py)
ARRAYS = "arrays"  # Orbax item holding the arrays
INFO = "lora_jax"  # Orbax item holding the JSON description
_SAFE = re.compile(r"[A-Za-z0-9_]")


def _version() -> str:
  import lora_jax  # pylint: disable=import-outside-toplevel
  return lora_jax.__version__


def escape(component: str) -> str:
  """An Orbax-safe key for one path component (injective).

  Letters, digits and ``_`` stay; every other byte becomes ``-XX`` (hex), and
  the empty component is ``-``. Orbax joins keys with ``.``, so ``.`` and ``/``
  must never reach it.

  Example:
    >>> escape("layers"), escape("0"), escape("a.b/c"), escape("")
    ('layers', '0', 'a-2Eb-2Fc', '-')
  """
  if not component:
    return "-"
  return "".join(c if _SAFE.fullmatch(c) else "".join(
      f"-{byte:02X}" for byte in c.encode()) for c in component)


def _spec(x) -> dict:
  return {"shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name}


def _entry(x, kernel) -> tuple[dict, dict]:
  """(JSON description, arrays) of one adapter node."""
  if isinstance(x, Trainable):
    return {"kind": "trainable", "value": _spec(x.value)}, {"value": x.value}
  info = {"kind": "lora", "roles": x.roles, "rank": x.rank,
          "scale": float(x.scale), "dropout": float(x.dropout),
          "kernel": None if kernel is None else _spec(kernel),
          "a": _spec(x.a), "b": _spec(x.b)}
  if x.dora:  # DoRA's magnitude; plain LoRA entries keep their old fields
    info["m"] = _spec(x.m)
    return info, {"a": x.a, "b": x.b, "m": x.m}
  return info, {"a": x.a, "b": x.b}


def _put(nested: dict, keys: list[str], value: dict) -> None:
  for k in keys[:-1]:
    nested = nested.setdefault(k, {})
  nested[keys[-1]] = value


def _check_prefix_free(keys: dict) -> None:
  """No node's key may be a prefix of another's (they would nest into each other)."""
  ordered = sorted((tuple(k), p) for p, k in keys.items())
  for (k1, p1), (k2, p2) in zip(ordered, ordered[1:]):
    if k2[:len(k1)] == k1:
      raise ValueError(f"save_adapter: adapter paths {p1!r} and {p2!r} nest into "
                       "each other; they cannot both be saved")


def pack(params: Params, config=None, step: int | None = None) -> tuple[dict, dict]:
  """Split params into ``(arrays, description)`` for an adapter checkpoint.

  Args:
    params: params holding LoraWeight / Trainable nodes, or an adapter dict
      from ``lora_jax.adapter``.
    config: optional ``LoraConfig``, recorded with ``config.to_dict()``.
    step: optional training step, recorded in the description.

  Returns:
    ``arrays``: a nested dict (Orbax-safe keys) of A, B and trained values;
    ``description``: a JSON-serialisable dict.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"layers": {"0": {"kernel": jnp.ones((4, 3))}}},
    ...                  lj.LoraConfig(rank=2))
    >>> arrays, info = pack(p)
    >>> jax.tree.map(jnp.shape, arrays), info["entries"]["layers/0/kernel"]["roles"]
    ({'layers': {'0': {'kernel': {'a': (4, 2), 'b': (2, 3)}}}}, 'io')
  """
  kernels = dict(tree.flatten(params, is_leaf=is_node)[0])
  arrays, entries, nbytes = {}, {}, 0
  for path, x in merge.adapter(params).items():
    w = getattr(kernels.get(path), "w", None)
    info, arr = _entry(x, w)
    info["key"] = [escape(c) for c in path.split("/")]
    _put(arrays, info["key"], arr)
    entries[path] = info
    nbytes += sum(int(v.size) * np.dtype(v.dtype).itemsize for v in arr.values())
  _check_prefix_free({p: e["key"] for p, e in entries.items()})
  if not entries:
    raise ValueError("save_adapter: the params hold no LoraWeight or Trainable "
                     "node; pass the params returned by lora_jax.lora_init")
  description = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "lora_jax_version": _version(), "step": step, "nbytes": nbytes,
      "config": None if config is None else config.to_dict(),
      "entries": entries}
  return arrays, json.loads(json.dumps(description, default=repr))


def fit_errors(entries: dict, leaves: dict) -> list[str]:
  """Every way the checkpoint's entries do not fit the base leaves."""
  errors = []
  for path, e in entries.items():
    if path not in leaves:
      errors.append(f"{path}: in the checkpoint, not in the base params")
      continue
    shape = tuple(np.shape(leaves[path]))
    if e["kind"] == "trainable":
      saved = tuple(e["value"]["shape"])
      if saved != shape:
        errors.append(f"{path}: trained leaf of shape {saved} in the checkpoint, "
                      f"the base leaf has shape {shape}")
      continue
    kernel = tuple(e["kernel"]["shape"]) if e.get("kernel") else None
    saved = {"a": tuple(e["a"]["shape"]), "b": tuple(e["b"]["shape"])}
    fits = len(e["roles"]) == len(shape) and dict(zip(
        ("a", "b"), factor_shapes(shape, e["roles"], e["rank"]))) == saved
    if not fits or (kernel is not None and kernel != shape):
      errors.append(f"{path}: the checkpoint's kernel has shape {kernel} (a "
                    f"{saved['a']}, b {saved['b']}, roles {e['roles']!r}), the "
                    f"base kernel has shape {shape}")
  return errors


def _replicated(s: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """Replicated on the devices (and mesh) of ``s``."""
  if isinstance(s, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  if s.is_fully_replicated:
    return s
  devices = np.array(sorted(s.device_set, key=lambda d: d.id))
  return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("d",)),
                                    jax.sharding.PartitionSpec())


def _factor_shardings(leaf, roles: str) -> tuple[Any, Any]:
  """Shardings of A and B for the base kernel ``leaf``.

  Derived from the kernel's sharding axis by axis (``sharding.factor_shardings``);
  replicated on the kernel's devices where that mapping does not apply.
  """
  if hasattr(leaf, "codes"):  # a QuantizedWeight: its kernel's sharding, from the codes
    from lora_jax._src import quant_sharding
    s = quant_sharding.kernel_sharding(leaf)
  else:
    s = getattr(leaf, "sharding", None)
  if s is None:
    return None, None
  derive = getattr(sharding, "factor_shardings", None)
  if derive is not None:
    try:
      return derive(s, roles)
    except (TypeError, ValueError):
      pass
  return _replicated(s), _replicated(s)


def restore_target(entries: dict, leaves: dict) -> dict:
  """The restore target: ShapeDtypeStructs with shardings from the base.

  A base leaf that is no ``jax.Array`` (numpy) gives this process's first
  device, never the sharding recorded at saving time (whose devices may not
  exist here: another mesh, another number of processes).
  """
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {}
  for path, e in entries.items():
    leaf = leaves[path]
    if e["kind"] == "trainable":
      shardings = {"value": getattr(leaf, "sharding", None) or here}
    else:
      shardings = dict(zip(("a", "b"), _factor_shardings(leaf, e["roles"])))
      shardings = {n: sh or here for n, sh in shardings.items()}
      if "m" in e:  # DoRA's magnitude (small): replicated where b is placed
        sb = shardings["b"]
        shardings["m"] = _replicated(sb) if isinstance(sb, jax.sharding.Sharding) else sb
    arr = {n: jax.ShapeDtypeStruct(tuple(e[n]["shape"]), jax.numpy.dtype(e[n]["dtype"]),
                                   sharding=sh) for n, sh in shardings.items()}
    _put(target, e["key"], arr)
  return target


def _lookup(nested: dict, keys: list[str]) -> dict:
  for k in keys:
    nested = nested[k]
  return nested


def unpack(arrays: dict, description: dict, base_params: Params) -> Params:
  """Inverse of ``pack``: attach restored arrays to ``base_params``.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> w = {"kernel": jnp.ones((4, 3))}
    >>> p = lj.lora_init(jax.random.key(0), w, lj.LoraConfig(rank=2, targets="kernel"))
    >>> q = unpack(*pack(p), w)
    >>> bool((q["kernel"].a == p["kernel"].a).all()), q["kernel"].scale
    (True, 1.0)
  """
  leaves = dict(tree.flatten(base_params, is_leaf=is_node)[0])  # a QuantizedWeight whole
  out = {}
  for path, e in description["entries"].items():
    arr = _lookup(arrays, e["key"])
    if e["kind"] == "trainable":
      out[path] = Trainable(arr["value"], None)
      continue
    a, b = arr["a"], arr["b"]
    if isinstance(leaves.get(path), jax.Array):  # no-op where restored in place
      a, b = sharding.place_factors(leaves[path], a, b, e["roles"])
    out[path] = LoraWeight(None, a, b, scale=e["scale"], roles=e["roles"],
                           dropout=e["dropout"], m=arr.get("m"))
  return merge.attach(base_params, out)
