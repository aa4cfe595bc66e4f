"""Check an adapter checkpoint's JSON description before anything trusts it.

The description says how to read the arrays back (shapes, dtypes, keys) and
what model they make (roles, rank, scale, dropout), so a damaged or edited
description must fail loudly rather than load a different model. Three layers:

* ``check_description``: every field's type and range, roles against shapes,
  floating dtypes for A and B, and ``nbytes`` against the shapes.
* ``seal`` / checksums (format version 2): a sha256 digest of each field,
  stored beside the fields in ``checksums``, so an edit that leaves the
  description valid (``"scale": 2.0`` to ``3.0``) is caught and named.
* ``check_arrays``: the description against the shapes and dtypes Orbax
  recorded for the stored arrays.

Every error names the file, the field (``entries['dense/kernel'].scale``),
what was expected and what was found.
"""

import hashlib
import json
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from lora_jax._src.checkpoint_format import FORMAT, FORMAT_VERSION, escape
from lora_jax._src.weight import ROLES, factor_shapes, max_rank

CHECKSUMS = "checksums"
_TOP = {"format", "format_version", "lora_jax_version", "step", "nbytes", "config",
        "entries"}
_LORA = {"kind", "roles", "rank", "scale", "dropout", "kernel", "a", "b", "key"}
_TRAINABLE = {"kind", "value", "key"}
_SPEC = {"shape", "dtype"}
_FIX = ("The description was damaged or edited after save_adapter wrote it: "
        "restore the file or save the adapter again.")


class _Shown(str):
  """A found value already written out: shown as is, with no type."""

  def __repr__(self) -> str:
    return str(self)


MISSING = _Shown("nothing (the field is missing)")


def _dims(shape) -> _Shown:
  return _Shown(str(list(shape)))


class _Checker:
  """Raises one ValueError naming ``where``, the field, the expectation and the value."""

  def __init__(self, where: str, fix: str = _FIX):
    self.where, self.fix = where, fix

  def fail(self, field: str, expected: str, found: Any, note: str = "") -> None:
    raise ValueError(f"{self.where}: field {field}: expected {expected}, found "
                     f"{_show(found)}{note}. {self.fix}")

  def mapping(self, x: Any, field: str, keys: set[str]) -> None:
    """``x`` is an object with exactly the fields ``keys``."""
    if not isinstance(x, Mapping):
      self.fail(field or "(top level)", f"a JSON object with fields {sorted(keys)}", x)
    sub = lambda k: f"{field}.{k}" if field else k
    for k in sorted(keys - set(x)):
      self.fail(sub(k), "a value", MISSING)
    for k in sorted(set(x) - keys):
      self.fail(sub(k), f"no such field (the fields are {sorted(keys)})", x[k])

  def integer(self, x: Any, field: str, low: int) -> None:
    if not _is_int(x) or x < low:
      self.fail(field, f"an integer >= {low}", x)


def _show(x: Any) -> str:
  """``repr`` of a found value, shortened, with its JSON type where that helps."""
  text = repr(x)
  text = text if len(text) <= 80 else text[:77] + "..."
  if isinstance(x, _Shown) or _is_real(x):
    return text
  kind = {str: "string", list: "list", dict: "object", bool: "boolean",
          type(None): "null"}.get(type(x), type(x).__name__)
  return f"{text} (a {kind})" if kind != "null" else text


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _name(path: str) -> str:
  return f"entries[{path!r}]"


def _dtype(c: _Checker, name: Any, field: str, floating: bool) -> None:
  expected = ("a floating dtype (float32, bfloat16, float16, float64, float8_*)"
              if floating else "a numeric dtype name (e.g. float32, int32)")
  try:
    dtype = jnp.dtype(name) if isinstance(name, str) else None
  except (TypeError, ValueError):
    dtype = None
  if dtype is None or dtype.name != name or not (
      jnp.issubdtype(dtype, jnp.floating) or (not floating and dtype.kind in "biufc")):
    c.fail(field, expected, name)


def _spec(c: _Checker, x: Any, field: str, floating: bool, low: int = 1) -> tuple:
  c.mapping(x, field, _SPEC)
  shape = x["shape"]
  if not isinstance(shape, list) or not all(_is_int(d) and d >= low for d in shape):
    c.fail(f"{field}.shape", f"a list of integers >= {low}", shape)
  _dtype(c, x["dtype"], f"{field}.dtype", floating)
  return tuple(shape)


def _implied_kernel(roles: str, a: tuple, b: tuple) -> tuple:
  """The kernel shape that factors ``a`` and ``b`` stand for."""
  ns, ni = roles.count("s"), roles.count("i")
  dims = {"s": iter(a[:ns]), "i": iter(a[ns:ns + ni]), "o": iter(b[ns + 1:])}
  return tuple(next(dims[r]) for r in roles)


def _factors(c: _Checker, e: Mapping, field: str) -> None:
  """A and B against the roles, the rank and the kernel's shape (recorded or implied)."""
  roles, rank = e["roles"], e["rank"]
  a, b = (_spec(c, e[n], f"{field}.{n}", floating=True) for n in ("a", "b"))
  ns, ni, no = (roles.count(r) for r in "sio")
  for n, got, axes, what in (("a", a, ns + ni + 1, "stack + in + rank"),
                             ("b", b, ns + 1 + no, "stack + rank + out")):
    if len(got) != axes:
      c.fail(f"{field}.{n}.shape", f"{axes} axes ({what} for roles {roles!r})", _dims(got))
  kernel = _implied_kernel(roles, a, b)
  if e["kernel"] is not None:
    kernel = _spec(c, e["kernel"], f"{field}.kernel", floating=True)
    if len(kernel) != len(roles):
      c.fail(f"{field}.kernel.shape", f"{len(roles)} axes (roles {roles!r})", _dims(kernel))
  if rank > max_rank(kernel, roles):
    c.fail(f"{field}.rank", f"at most {max_rank(kernel, roles)} for a kernel of shape "
           f"{list(kernel)} with roles {roles!r}", rank)
  how = f" (kernel {list(kernel)}, roles {roles!r}, rank {rank})"
  for n, got, want in zip("ab", (a, b), factor_shapes(kernel, roles, rank)):
    if got != tuple(want):
      c.fail(f"{field}.{n}.shape", f"{list(want)}{how}", _dims(got))


def _lora_entry(c: _Checker, e: Mapping, field: str) -> int:
  """Checks one LoRA entry; returns the bytes of its A and B."""
  roles = e["roles"]
  if (not isinstance(roles, str) or not set(roles) <= ROLES or "i" not in roles
      or "o" not in roles):
    c.fail(f"{field}.roles", "a string of 's', 'i', 'o' with at least one 'i' and one 'o'",
           roles)
  c.integer(e["rank"], f"{field}.rank", 1)
  scale, dropout = e["scale"], e["dropout"]
  if not _is_real(scale) or not math.isfinite(scale) or scale <= 0:
    c.fail(f"{field}.scale", "a finite number > 0", scale)
  if not _is_real(dropout) or not 0 <= dropout < 1:
    c.fail(f"{field}.dropout", "a number in [0, 1)", dropout)
  _factors(c, e, field)
  if "m" in e:  # DoRA: one magnitude per output column (b without its rank axis)
    m = _spec(c, e["m"], f"{field}.m", floating=True)
    b, ns = tuple(e["b"]["shape"]), roles.count("s")
    if m != b[:ns] + b[ns + 1:]:
      c.fail(f"{field}.m.shape", f"{list(b[:ns] + b[ns + 1:])} (DoRA's magnitude: "
             f"b's shape {list(b)} without its rank axis)", _dims(m))
  return sum(_nbytes(e[n]) for n in factor_names(e))


def factor_names(e: Mapping) -> tuple[str, ...]:
  """The arrays stored for a LoRA entry: ``a``, ``b`` and DoRA's ``m``."""
  return ("a", "b", "m") if "m" in e else ("a", "b")


def _nbytes(spec: Mapping) -> int:
  return int(np.prod(spec["shape"], dtype=np.int64)) * jnp.dtype(spec["dtype"]).itemsize


def _entry(c: _Checker, path: Any, e: Any) -> int:
  field = _name(path)
  kind = e.get("kind") if isinstance(e, Mapping) else None
  if kind not in ("lora", "trainable"):
    if not isinstance(e, Mapping):
      c.fail(field, "a JSON object", e)
    c.fail(f"{field}.kind", "'lora' or 'trainable'", e.get("kind", MISSING))
  dora = kind == "lora" and "m" in e  # DoRA: the magnitude vector too
  c.mapping(e, field, (_LORA | {"m"} if dora else _LORA) if kind == "lora" else _TRAINABLE)
  key = [escape(k) for k in path.split("/")]
  if e["key"] != key:
    c.fail(f"{field}.key", f"{key} (the escaped path)", e["key"])
  if kind == "trainable":
    _spec(c, e["value"], f"{field}.value", floating=False, low=0)
    return _nbytes(e["value"])
  return _lora_entry(c, e, field)


def _header(c: _Checker, info: Any) -> int:
  """Format and version; returns the version."""
  if not isinstance(info, Mapping):
    c.fail("(top level)", "a JSON object", info)
  if info.get("format") != FORMAT:
    c.fail("format", repr(FORMAT), info.get("format", MISSING),
           note=" (not a lora_jax adapter checkpoint)")
  version = info.get("format_version", MISSING)
  if not _is_int(version) or version < 1:
    c.fail("format_version", f"an integer from 1 to {FORMAT_VERSION}", version)
  if version > FORMAT_VERSION:
    raise ValueError(
        f"{c.where} was written in lora_jax checkpoint format version {version} "
        f"(by lora_jax {info.get('lora_jax_version')}); this lora_jax reads format "
        f"versions 1 to {FORMAT_VERSION}. Upgrade lora_jax to load it.")
  return version


def check_description(info: Any, where: str) -> None:
  """Raise a ValueError naming ``where`` and the field unless ``info`` is valid.

  Format version 1 (no checksums) is still read; version 2 must carry the
  checksum of every field, and each must match.

  Args:
    info: the parsed JSON description.
    where: the file to name in errors.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> from lora_jax._src.checkpoint_format import pack
    >>> p = lj.lora_init(jax.random.key(0), {"k": jnp.ones((4, 3))},
    ...                  lj.LoraConfig(rank=2, targets="k"))
    >>> info = seal(pack(p)[1])
    >>> check_description(info, "ckpt/lora_jax/metadata")
    >>> info["entries"]["k"]["scale"] = 3.0
    >>> check_description(info, "ckpt/lora_jax/metadata")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: ckpt/lora_jax/metadata: field entries['k'].scale: expected the value it was saved with (sha256 ...), found 3.0. ...
  """
  c = _Checker(where)
  version = _header(c, info)
  _body(c, info, sealed=version >= 2)
  if version >= 2:
    _check_checksums(c, info)


def _body(c: _Checker, info: Mapping, sealed: bool) -> None:
  """Every field but the format, the version and the checksums."""
  c.mapping(info, "", _TOP | ({CHECKSUMS} if sealed else set()))
  if not isinstance(info["lora_jax_version"], str):
    c.fail("lora_jax_version", "a version string", info["lora_jax_version"])
  if info["step"] is not None:
    c.integer(info["step"], "step", 0)
  if info["config"] is not None and not isinstance(info["config"], Mapping):
    c.fail("config", "a JSON object (LoraConfig.to_dict()) or null", info["config"])
  entries = info["entries"]
  if not isinstance(entries, Mapping) or not entries:
    c.fail("entries", "a non-empty JSON object {param path: entry}", entries)
  total = sum(_entry(c, path, e) for path, e in entries.items())
  c.integer(info["nbytes"], "nbytes", 0)
  if info["nbytes"] != total:
    c.fail("nbytes", f"{total} (the bytes of the arrays the entries describe)",
           info["nbytes"])


def _fields(info: Mapping) -> dict[str, Any]:
  """Every checksummed field of a description: ``{field name: value}``."""
  out = {f"{_name(path)}.{k}": e[k] for path, e in info["entries"].items() for k in sorted(e)}
  out.update((k, info[k]) for k in sorted(_TOP - {"entries"}) if k in info)
  return out  # entries first: an added entry is named before the nbytes it changes


def _digest(field: str, value: Any) -> str:
  text = json.dumps([field, value], sort_keys=True, separators=(",", ":"),
                    ensure_ascii=True, allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def seal(description: dict) -> dict:
  """``description`` checked, with the sha256 digest of each field added.

  Checking at save time means a checkpoint that would be refused on loading
  is never written.
  """
  c = _Checker("save_adapter", fix="Fix the adapter before saving it.")
  _header(c, description)
  _body(c, description, sealed=False)
  sums = {field: _digest(field, v) for field, v in _fields(description).items()}
  return {**description, CHECKSUMS: {"sha256": sums}}


def _check_checksums(c: _Checker, info: Mapping) -> None:
  sums = info[CHECKSUMS]
  c.mapping(sums, CHECKSUMS, {"sha256"})
  stored = sums["sha256"]
  if not isinstance(stored, Mapping):
    c.fail(f"{CHECKSUMS}.sha256", "a JSON object {field: digest}", stored)
  fields = _fields(info)
  for field, value in fields.items():
    if field not in stored:
      c.fail(field, "no such field (it has no checksum: added after saving)", value)
    if stored[field] != _digest(field, value):
      c.fail(field, f"the value it was saved with (sha256 {stored[field]!r}...)", value)
  for field in sorted(set(stored) - set(fields)):
    c.fail(field, "a value (its checksum is stored)", MISSING)


def check_arrays(entries: Mapping, stored: Mapping, where: str) -> None:
  """The description's shapes and dtypes against those Orbax stored.

  Args:
    entries: the checked description's ``entries``.
    stored: Orbax's metadata tree of the ``arrays`` item (objects with
      ``shape`` and ``dtype``).
    where: the ``arrays`` directory, named in errors.
  """
  errors = []
  for path, e in entries.items():
    names = ("value",) if e["kind"] == "trainable" else factor_names(e)
    node = stored
    for k in e["key"]:
      node = node.get(k, {}) if isinstance(node, Mapping) else {}
    for n in names:
      meta = node.get(n) if isinstance(node, Mapping) else None
      want = (list(e[n]["shape"]), e[n]["dtype"])
      if meta is None or not hasattr(meta, "shape"):
        errors.append(f"{_name(path)}.{n}: no array stored under key "
                      f"{'.'.join(e['key'] + [n])!r}")
        continue
      got = (list(meta.shape), np.dtype(meta.dtype).name)
      if got != want:
        errors.append(f"{_name(path)}.{n}: the description says shape {want[0]} "
                      f"{want[1]}, the stored array has shape {got[0]} {got[1]}")
  if errors:
    raise ValueError(f"{where}: the stored arrays do not match the description:\n  "
                     + "\n  ".join(errors) + "\nThe checkpoint was damaged or its "
                     "parts mixed up: save the adapter again.")
