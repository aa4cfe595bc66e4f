"""The pytree nodes lora_jax puts into a params tree.

``LoraWeight(w, a, b)`` stands where a selected kernel stood. Its ``roles``
string names each axis of ``w``: ``s`` a stacked axis (a scanned layer axis:
one independent adapter per entry), ``i`` an input axis, ``o`` an output axis.
The update is low rank over the flattened (in, out) matrix, as in PEFT::

  w: roles "io"   (in, out)          a: (in, r)          b: (r, out)
  w: roles "ioo"  (d, heads, hd)     a: (d, r)           b: (r, heads, hd)
  w: roles "iio"  (heads, hd, d)     a: (heads, hd, r)   b: (r, d)
  w: roles "sio"  (layers, in, out)  a: (layers, in, r)  b: (layers, r, out)
  w: roles "iiio" conv (kh, kw, in, out)  a: (kh, kw, in, r)  b: (r, out)

so ``a`` has shape ``stack + in + (r,)`` and ``b`` has ``stack + (r,) + out``,
and ``ΔW = scale · a @ b`` reshaped to ``w``'s axes.

``Trainable(value, base)`` marks a leaf trained in full (PEFT's
``modules_to_save``), keeping the original ``base`` so adapters can be turned
off exactly.
"""

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_LETTERS = "abcdefghijklmnopqstuvwxyz"  # 'r' is reserved for the rank axis

ROLES = frozenset("sio")


class OutsideLoraError(TypeError, AttributeError):
  """A LoraWeight / Trainable used as an array outside ``lora_jax.lora``.

  A ``TypeError`` (as for any unsupported operand) that is also an
  ``AttributeError``, so ``hasattr`` / ``getattr(x, name, default)`` probes of
  array attributes keep answering "no" instead of raising.
  """


_HOLDS = {"LoraWeight": "a frozen kernel `.w` and its factors `.a`, `.b`",
          "Trainable leaf": "a trained `.value` and the original `.base`"}


def _outside_lora(kind: str, tried: str = "") -> OutsideLoraError:
  what = f" (tried {tried})" if tried else ""
  return OutsideLoraError(
      f"A {kind} reached a function that was not wrapped with lora_jax.lora"
      f"{what}; it holds {_HOLDS.get(kind, 'arrays')}, it is not an array. "
      "Call the model as `lora_jax.lora(apply_fn)(params, ...)`, or fold the "
      "adapters in first with `lora_jax.merge(params)`.")


# Every public attribute of a jax / numpy array: on a node they raise the
# OutsideLoraError above (unless the node defines them, e.g. LoraWeight.shape).
_ARRAY_ATTRS = frozenset(
    n for t in (jax.Array, np.ndarray) for n in dir(t) if not n.startswith("_"))

_BINARY = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//",
           "mod": "%", "pow": "**", "matmul": "@", "and": "&", "or": "|",
           "xor": "^", "lshift": "<<", "rshift": ">>"}
_OPS = {**{f"__{o}__": f"`x {s} ...`" for o, s in _BINARY.items()},
        **{f"__r{o}__": f"`... {s} x`" for o, s in _BINARY.items()},
        **{f"__i{o}__": f"`x {s}= ...`" for o, s in _BINARY.items()},
        "__divmod__": "`divmod(x, ...)`", "__rdivmod__": "`divmod(..., x)`",
        "__neg__": "`-x`", "__pos__": "`+x`", "__abs__": "`abs(x)`",
        "__invert__": "`~x`", "__lt__": "`x < ...`", "__le__": "`x <= ...`",
        "__gt__": "`x > ...`", "__ge__": "`x >= ...`", "__getitem__": "`x[...]`",
        "__setitem__": "`x[...] = ...`", "__iter__": "iterating over x",
        "__len__": "`len(x)`", "__bool__": "`bool(x)`", "__float__": "`float(x)`",
        "__int__": "`int(x)`", "__complex__": "`complex(x)`",
        "__index__": "using x as an index", "__round__": "`round(x)`",
        "__contains__": "`... in x`", "__jax_array__": "converting x to a jax array",
        "__array__": "converting x to a numpy array"}


class _NotAnArray:
  """Mixin: every array operator and attribute raises ``OutsideLoraError``.

  ``==`` / ``!=`` / ``hash`` stay identity-based (containers and libraries
  compare nodes); everything else an array offers fails loudly.
  """

  __slots__ = ()
  _kind = "lora_jax node"

  def __getattr__(self, name: str):
    # only reached when normal lookup fails (so slots / properties win)
    prop = getattr(type(self), name, None)
    if isinstance(prop, property):  # it raised AttributeError: raise that again
      return prop.fget(self)
    if name in _ARRAY_ATTRS:
      raise _outside_lora(self._kind, f"`.{name}`")
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _refuse(op: str, tried: str):
  def method(self, *args, **kwargs):
    raise _outside_lora(self._kind, tried)
  method.__name__ = op
  return method


for _op, _tried in _OPS.items():
  setattr(_NotAnArray, _op, _refuse(_op, _tried))


def _concrete_shape(x) -> tuple[int, ...] | None:
  """``x.shape`` when it is a tuple of ints (arrays, tracers, ShapeDtypeStruct),
  else ``None`` (shardings, specs, sentinels, labels: nothing to check)."""
  shape = getattr(x, "shape", None)
  if isinstance(shape, tuple) and all(isinstance(d, (int, np.integer)) for d in shape):
    return tuple(int(d) for d in shape)
  return None


def factor_problems(w, a, b, roles: str) -> list[str]:
  """What is wrong with factors ``a``, ``b`` for kernel ``w`` and ``roles``.

  Checks only what is known: ``w`` may be ``None`` (an adapter alone) and any
  of the three may be a non-array (a sharding, a label); then the checks that
  need it are skipped. Returns ``[]`` when everything checkable fits.
  """
  problems = []
  sw, sa, sb = (_concrete_shape(x) for x in (w, a, b))
  if sw is not None and len(sw) != len(roles):
    problems.append(f"w has shape {sw} ({len(sw)} axes) but roles {roles!r} "
                    f"name {len(roles)} axes")
    sw = None
  n_s, n_i, n_o = (roles.count(c) for c in "sio")
  for name, shape, want in (("a", sa, n_s + n_i + 1), ("b", sb, n_s + 1 + n_o)):
    if shape is not None and len(shape) != want:
      problems.append(f"{name} has shape {shape} ({len(shape)} axes); roles "
                      f"{roles!r} need {want} (a: stack + in + (rank,), "
                      "b: stack + (rank,) + out)")
      return problems
  for name, x in (("a", a), ("b", b)):
    dtype = getattr(x, "dtype", None)
    if _concrete_shape(x) is not None and dtype is not None and not jnp.issubdtype(
        dtype, jnp.floating):
      problems.append(f"{name} has dtype {np.dtype(dtype).name}; the factors must "
                      "be floating point")
  if sa is not None and sb is not None:
    if sa[-1] != sb[n_s]:
      problems.append(f"a has rank {sa[-1]} (its last axis, shape {sa}) but b has "
                      f"rank {sb[n_s]} (axis {n_s}, shape {sb})")
    elif sa[:n_s] != sb[:n_s]:
      problems.append(f"a's stacked axes {sa[:n_s]} differ from b's {sb[:n_s]}")
  if sw is not None:
    rank = sa[-1] if sa is not None else (sb[n_s] if sb is not None else 1)
    want_a, want_b = factor_shapes(sw, roles, rank)
    for name, shape, want in (("a", sa, want_a), ("b", sb, want_b)):
      if shape is not None and shape != want and not problems:
        problems.append(f"{name} has shape {shape}; w of shape {sw} with roles "
                        f"{roles!r} needs {name} of shape {want}")
  return problems


def describe(x) -> str:
  """``an array float32[4, 3]`` / ``a dict`` / ... for error messages."""
  shape, dtype = _concrete_shape(x), getattr(x, "dtype", None)
  if shape is not None and dtype is not None and not isinstance(x, _NotAnArray):
    return f"an array {np.dtype(dtype).name}{list(shape)}"
  if x is None:
    return "None"
  name = type(x).__name__
  return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


_ALONE = ("{path}: a {kind} without its {what} ({name}=None), as in lj.adapter(...), "
          "a loaded adapter or the trainable half of lj.split(...); put it on the base "
          "params first: lj.attach(base_params, adapter) (or join split halves with "
          "lj.combine(trainable, frozen))")


def node_problems(path: str, x, need=("w", "a", "b", "value", "base")) -> list[str]:
  """Why node ``x`` at ``path`` is unusable when its fields ``need`` are read.

  ``[]`` for a plain leaf or a usable node. A field that is not an array is
  reported (``w=None``: an adapter alone; ``None`` elsewhere: a half of
  ``split``), then the factors' shapes.
  """
  if not isinstance(x, (LoraWeight, Trainable)):  # a plain leaf or a frozen kernel
    return []
  kind = "LoraWeight" if isinstance(x, LoraWeight) else "Trainable leaf"
  fields = ("w", "a", "b") if isinstance(x, LoraWeight) else ("value", "base")
  problems = []
  for name in (f for f in fields if f in need):
    value = getattr(x, name)
    if value is None and name in ("w", "base"):
      what = "base kernel" if name == "w" else "base value"
      problems.append(_ALONE.format(path=path, kind=kind, what=what, name=name))
    elif getattr(value, "shape", None) is None:
      problems.append(f"{path}: the {kind}'s {name} is {describe(value)}, not an array "
                      "(one half of lj.split(...)? join the halves with "
                      "lj.combine(trainable, frozen))")
  if not problems and isinstance(x, LoraWeight):  # w is checked too when it is an array
    problems = [f"{path}: {p}" for p in factor_problems(x.w, x.a, x.b, x.roles)]
  return problems


def check_factors(lw: "LoraWeight", where: str) -> None:
  """Raise a ValueError naming ``where`` if ``lw``'s factors do not fit."""
  problems = node_problems(where, lw, ("a", "b"))
  if problems:
    raise ValueError(f"{where}: inconsistent LoraWeight: " + "; ".join(
        p.removeprefix(f"{where}: ") for p in problems)
                     + ". a must have shape stack + in + (rank,) and b "
                     "stack + (rank,) + out, with the axes of w named by roles "
                     "(see lora_jax.LoraWeight).")


@jax.tree_util.register_pytree_with_keys_class
class LoraWeight(_NotAnArray):
  """A frozen kernel ``w`` with a low-rank update ``scale · a @ b``.

  Attributes:
    w: the frozen base kernel (never updated by lora_jax's optimizer).
    a: factor of shape ``stack + in + (rank,)``.
    b: factor of shape ``stack + (rank,) + out``; zero at init.
    scale: ``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA).
    roles: one character per axis of ``w``: ``s``, ``i`` or ``o``.
    dropout: dropout rate on the LoRA branch's input (PEFT semantics).
    m: DoRA's trainable magnitude, one entry per output column (shape
      ``stack + out``), or ``None`` for plain LoRA. With ``m`` the kernel is
      ``W' = m · (W + ΔW) / ‖W + ΔW‖_c``, the column norm taken over the
      input axes and treated as a constant by autodiff (as PEFT does).

  Construction (and ``replace``) checks the factors against ``w`` and
  ``roles`` wherever their shapes are known; ``w`` may be ``None`` (an adapter
  alone, see ``lora_jax.adapter``). Rebuilding from pytree leaves
  (``tree_unflatten``: ``jax.tree.map``, ``vmap``, optax, shardings) does not
  check, since those leaves need not be arrays of these shapes; ``merge`` and
  ``delta`` check again. A LoraWeight is not an array: outside
  ``lora_jax.lora``, ``W.T``, ``W + 1``, ``W[0]``, ``jnp.asarray(W)`` ... raise
  a ``TypeError`` saying to wrap the function or merge first.

  Example:
    >>> import jax.numpy as jnp, lora_jax as lj
    >>> lw = lj.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
    ...                    scale=1.0, roles="io")
    >>> lw.shape, lw.rank
    ((4, 3), 2)
  """

  __slots__ = ("w", "a", "b", "scale", "roles", "dropout", "m", "_dora")
  _kind = "LoraWeight"

  def __init__(self, w, a, b, *, scale: float, roles: str, dropout: float = 0.0,
               m=None):
    for name, value in (("scale", scale), ("dropout", dropout)):
      if (isinstance(value, (jax.core.Tracer, bool)) or not isinstance(value, numbers.Real)):
        raise TypeError(
            f"LoraWeight.{name} must be a static Python number (it is part of the "
            f"pytree structure, like a hyperparameter), got {value!r}")
    if not math.isfinite(scale):
      raise ValueError(f"LoraWeight.scale must be finite, got {scale}")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"LoraWeight.dropout must be in [0, 1), got {dropout}")
    if not isinstance(roles, str) or not set(roles) <= ROLES or not (
        "i" in roles and "o" in roles):
      raise TypeError("LoraWeight.roles must be a string of 's', 'i', 'o' with at "
                      f"least one 'i' and one 'o' (e.g. 'io', 'sio'), got {roles!r}")
    problems = factor_problems(w, a, b, roles)
    if problems:
      raise ValueError("LoraWeight: the factors do not fit: " + "; ".join(problems))
    problem = magnitude_problem(m, b, roles)
    if problem:
      raise ValueError(f"LoraWeight: {problem}")
    self.w, self.a, self.b, self.m, self._dora = w, a, b, m, m is not None
    self.scale, self.roles, self.dropout = scale, roles, dropout

  def tree_flatten_with_keys(self):
    keys = jax.tree_util.GetAttrKey
    children = ((keys("w"), self.w), (keys("a"), self.a), (keys("b"), self.b))
    if self._dora:  # plain LoRA keeps its three children (old treedefs)
      children += ((keys("m"), self.m),)
    return children, (self.scale, self.roles, self.dropout, self._dora)

  @classmethod
  def tree_unflatten(cls, aux, children):
    # No checks here: JAX, optax and flax rebuild nodes from leaves that are
    # not arrays of these shapes (None, shardings, sentinels, a stack of
    # adapters with a leading axis); aux came from a checked node.
    self = object.__new__(cls)
    self.scale, self.roles, self.dropout, dora = aux if len(aux) == 4 else (*aux, False)
    self.w, self.a, self.b = children[:3]
    self.m = children[3] if dora else None
    self._dora = dora  # also where m is None / a label (a half of split, labels)
    return self

  @property
  def dora(self) -> bool:
    """True for a DoRA node (it carries a magnitude ``m``)."""
    return self._dora

  def replace(self, **changes) -> "LoraWeight":
    fields = dict(w=self.w, a=self.a, b=self.b, scale=self.scale,
                  roles=self.roles, dropout=self.dropout, m=self.m)
    fields.update(changes)
    w, a, b = fields.pop("w"), fields.pop("a"), fields.pop("b")
    out = LoraWeight(w, a, b, **fields)
    if self._dora and "m" not in changes:  # a DoRA half without its m stays DoRA
      out._dora = True
    return out

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self._array("w", "shape").shape)

  @property
  def dtype(self):
    return self._array("w", "dtype").dtype

  @property
  def ndim(self) -> int:
    return len(self.roles)

  @property
  def rank(self) -> int:
    if getattr(self.a, "shape", None) is None and getattr(self.b, "shape", None) is not None:
      return int(self.b.shape[self.roles.count("s")])
    return int(self._array("a", "rank").shape[-1])

  def _array(self, name: str, attr: str):
    """Field ``name``, or an AttributeError saying why ``attr`` is unknown."""
    x = getattr(self, name)
    if getattr(x, "shape", None) is None or (attr == "dtype" and not hasattr(x, "dtype")):
      raise AttributeError(
          f"LoraWeight.{attr} is not known: this node's {name} is {describe(x)}, not "
          "an array (an adapter alone from lj.adapter(...) has w=None; the halves "
          "of lj.split(...) have None in the other half's places; lj.labels(...) "
          "holds strings)")
    return x

  def __repr__(self) -> str:
    def desc(x):
      return f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape") and hasattr(x, "dtype") else repr(x)
    return (f"LoraWeight(w={desc(self.w)}, a={desc(self.a)}, b={desc(self.b)}, "
            f"scale={self.scale}, roles={self.roles!r}, dropout={self.dropout}"
            + (f", m={desc(self.m)})" if self.m is not None else ")"))


def magnitude_problem(m, b, roles: str) -> str:
  """What is wrong with DoRA magnitude ``m`` for factor ``b``; ``""`` if fine.

  ``m`` has one entry per output column: ``b``'s shape without the rank axis.
  """
  if m is None:
    return ""
  sm, sb = _concrete_shape(m), _concrete_shape(b)
  if sm is None or sb is None:
    return ""
  n_s = roles.count("s")
  want = sb[:n_s] + sb[n_s + 1:]
  if sm != want:
    return (f"the DoRA magnitude m has shape {sm}; b of shape {sb} (roles {roles!r}) "
            f"needs m of shape {want} (stack + out: one entry per output column)")
  return ""



@jax.tree_util.register_pytree_with_keys_class
class Trainable(_NotAnArray):
  """A leaf trained in full; ``base`` keeps the original value.

  Not an array: read ``.value`` (or call the model through ``lora_jax.lora``).

  Example:
    >>> import jax.numpy as jnp, lora_jax as lj
    >>> t = lj.Trainable(jnp.zeros(3), jnp.zeros(3))
    >>> t.value.shape
    (3,)
  """

  __slots__ = ("value", "base")
  _kind = "Trainable leaf"

  def __init__(self, value, base):
    sv, sb = _concrete_shape(value), _concrete_shape(base)
    if sv is not None and sb is not None and sv != sb:
      raise ValueError(f"Trainable: value has shape {sv} but base has shape {sb}; "
                       "they must match (base is the leaf the value replaces)")
    self.value, self.base = value, base

  def tree_flatten_with_keys(self):
    keys = jax.tree_util.GetAttrKey
    return ((keys("value"), self.value), (keys("base"), self.base)), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux  # no checks: leaves may be labels, shardings, a stack (see LoraWeight)
    self = object.__new__(cls)
    self.value, self.base = children
    return self

  def __repr__(self) -> str:
    shape = getattr(self.value, "shape", None)
    return f"Trainable(value={getattr(self.value, 'dtype', '')}{list(shape or ())})"


class FrozenKernel:
  """Base of nodes standing for a frozen kernel stored in another form
  (``QuantizedWeight``): tree walks stop at them like at a LoraWeight."""

  __slots__ = ()


def is_node(x: Any) -> bool:
  """``is_leaf`` predicate that stops at lora_jax nodes."""
  return isinstance(x, (LoraWeight, Trainable, FrozenKernel))


def factor_shapes(shape, roles: str, rank: int):
  """Shapes of ``a`` and ``b`` for a kernel of ``shape`` with ``roles``."""
  pick = lambda role: tuple(d for d, r in zip(shape, roles) if r == role)
  stack, ins, outs = pick("s"), pick("i"), pick("o")
  return stack + ins + (rank,), stack + (rank,) + outs


def max_rank(shape, roles: str) -> int:
  """The largest rank a kernel allows: min(prod(in dims), prod(out dims))."""
  ins = [d for d, r in zip(shape, roles) if r == "i"]
  outs = [d for d, r in zip(shape, roles) if r == "o"]
  return int(min(np.prod(ins), np.prod(outs)))


def einsum_specs(roles: str) -> tuple[str, str, str]:
  """Subscripts ``(a, b, w)`` such that ``einsum(a, b) -> w`` gives ΔW/scale."""
  if len(roles) > len(_LETTERS):
    raise ValueError(f"kernels of {len(roles)} axes are not supported")
  letters = _LETTERS[:len(roles)]
  pick = lambda role: "".join(l for l, r in zip(letters, roles) if r == role)
  s, i, o = pick("s"), pick("i"), pick("o")
  return s + i + "r", s + "r" + o, letters


def delta(lw: LoraWeight, dtype=jnp.float32) -> jax.Array:
  """``ΔW = scale · a @ b`` with ``w``'s axes, accumulated in ``dtype``.

  Example:
    >>> import jax.numpy as jnp, lora_jax as lj
    >>> lw = lj.LoraWeight(jnp.zeros((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)),
    ...                    scale=0.5, roles="io")
    >>> lj.delta(lw).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
  """
  if not isinstance(lw, LoraWeight):
    raise TypeError(
        f"delta: expected one LoraWeight node, got {describe(lw)}. Pass a node "
        "of the params from lora_init, e.g. lj.delta(lparams['dense']['kernel']); "
        "for every kernel at once use lj.merge(lparams) (W + ΔW).")
  check_factors(lw, "delta")
  sa, sb, sw = einsum_specs(lw.roles)
  a = lw.a.astype(dtype) * jnp.asarray(lw.scale, dtype)  # scale the small factor
  return jnp.einsum(f"{sa},{sb}->{sw}", a, lw.b.astype(dtype),
                    preferred_element_type=dtype)
