"""LoraConfig: which kernels get adapters, with which rank, alpha and layout."""

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.types import Spec
from lora_jax._src.weight import ROLES

ALL_LINEAR = "all-linear"
INITS = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "olora")


def _init(value: Any) -> str:
  if isinstance(value, str) and (value in ("kaiming", "gaussian", "pissa", "olora")
                                 or re.fullmatch(r"pissa_niter_[1-9]\d*", value)):
    return value
  raise ValueError(f"LoraConfig.init must be one of {INITS} (K a positive int, e.g. "
                   f"'pissa_niter_4'), got {value!r}")


def _layers(value: Any) -> tuple[int, ...] | None:
  """``layers_to_transform``: None, an int or a sequence of ints >= 0."""
  if value is None:
    return None
  items = [value] if isinstance(value, numbers.Integral) else value
  if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
    raise TypeError(f"LoraConfig.layers_to_transform must be an int or a list of ints "
                    f"(layer indexes, as PEFT's), got {type(value).__name__} {value!r}")
  items = list(items)
  for k in items:
    _static("layers_to_transform", k, (numbers.Integral,))
    if k < 0:
      raise ValueError(f"LoraConfig.layers_to_transform: layer indexes are >= 0, got {k}")
  if not items:
    raise ValueError("LoraConfig.layers_to_transform is empty: it would adapt no layer "
                     "(use None for every layer)")
  return tuple(sorted({int(k) for k in items}))


_LAYER_INDEX = re.compile(r"(?:^|/)(?:[^/]*_)?(\d+)(?:/|$)")


def layer_index(path: str) -> int | None:
  """The layer index in a path: the first component that is ``N`` or ``name_N``."""
  m = _LAYER_INDEX.search(path)
  return None if m is None else int(m.group(1))


def _static(name: str, value: Any, kinds: tuple) -> None:
  """Raise a clear error for a traced or wrongly typed static field."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"LoraConfig.{name} must be a static Python value, got a traced value "
        f"{value}. Build the config outside jax.jit / jax.grad.")
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, kinds):
    names = {numbers.Integral: "int", numbers.Real: "a real number"}
    raise TypeError(
        f"LoraConfig.{name} must be {' or '.join(names.get(k, k.__name__) for k in kinds)}, "
        f"got {type(value).__name__} {value!r}")


def _positive_int(name: str, value: Any) -> int:
  _static(name, value, (numbers.Integral,))
  if value <= 0:
    raise ValueError(f"LoraConfig.{name} must be a positive int, got {value}")
  return int(value)


def _real(name: str, value: Any) -> float | int:
  """A static real number, as a Python int / float (numpy scalars converted)."""
  _static(name, value, (numbers.Real,))
  return value if type(value) in (int, float) else float(value)


def _positive_real(name: str, value: Any) -> float | int:
  value = _real(name, value)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"LoraConfig.{name} must be a finite number > 0, got {value!r}"
                     + (" (alpha=0 would turn the adapter off)" if value == 0 else ""))
  return value


def _regex(name: str, pattern: Any, owner: str = "LoraConfig") -> re.Pattern:
  if not isinstance(pattern, str):
    raise TypeError(f"{owner}.{name}: keys must be regex strings, got "
                    f"{type(pattern).__name__} {pattern!r}")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{owner}.{name}: {pattern!r} is not a valid regex: {e}") from e


def _pattern_map(name: str, value: Any, check, owner: str = "LoraConfig") -> dict | None:
  """Validate a ``{regex: value}`` field: ``{regex: checked value}``."""
  if value is None:
    return None
  if not isinstance(value, Mapping):
    raise TypeError(f"{owner}.{name} must be a dict {{regex: value}} or None, "
                    f"got {type(value).__name__} {value!r}")
  for k in value:
    _regex(name, k, owner)
  return {k: check(f"{name}[{k!r}]", v) for k, v in value.items()}


def compile_layouts(value: Any, owner: str) -> dict | None:
  """A checked ``layouts`` field as ``{compiled regex: roles}`` (None: none)."""
  value = _pattern_map("layouts", value, lambda name, v: _roles(name, v, owner), owner)
  return None if value is None else {re.compile(k): v for k, v in value.items()}


def _roles(name: str, roles: Any, owner: str = "LoraConfig") -> str:
  if not isinstance(roles, str) or not set(roles) <= ROLES or not (
      "i" in roles and "o" in roles):
    raise ValueError(
        f"{owner}.{name} must be a string of 's', 'i', 'o' with at least one "
        f"'i' and one 'o' (e.g. 'io', 'sio'); got {roles!r}")
  return roles


def _float_dtype(value: Any) -> None:
  if value is None:
    return
  try:
    dtype = np.dtype(value)
  except TypeError as e:
    raise TypeError(f"LoraConfig.dtype must be a floating dtype such as jnp.float32 "
                    f"or jnp.bfloat16 (or None: the kernel's), got {value!r}") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"LoraConfig.dtype must be a floating dtype such as jnp.float32 "
                     f"or jnp.bfloat16 (or None: the kernel's), got {dtype.name}")


def matcher(spec: Spec, name: str) -> Callable[[str, Any], bool]:
  """Normalise a selection spec into a predicate ``(path, leaf) -> bool``.

  A string is a regex matched with ``re.fullmatch`` against the '/'-joined
  path; a list or tuple matches if any of its regexes does; a callable is used
  as it is; ``None`` matches nothing; ``"all-linear"`` matches every leaf
  named ``kernel`` with two or more axes.
  """
  if spec is None:
    return lambda path, leaf: False
  if callable(spec):
    return spec
  if isinstance(spec, str):
    spec = [spec]
  if not isinstance(spec, (list, tuple)):
    raise TypeError(f"LoraConfig.{name} must be a regex string, a list of regex "
                    f"strings or a callable (path, leaf) -> bool; got "
                    f"{type(spec).__name__} {spec!r}")
  patterns = []
  for s in spec:
    if not isinstance(s, str):
      raise TypeError(f"LoraConfig.{name} must be a regex string, a list of regex "
                      f"strings or a callable (path, leaf) -> bool; the list holds "
                      f"{type(s).__name__} {s!r}")
    patterns.append(None if s == ALL_LINEAR else _regex(name, s))

  def match(path: str, leaf: Any) -> bool:
    for p in patterns:
      if p is None:
        if path.rsplit("/", 1)[-1] == "kernel" and len(getattr(leaf, "shape", ())) >= 2:
          return True
      elif p.fullmatch(path):
        return True
    return False
  return match


def _pattern_lookup(patterns: Mapping[re.Pattern, Any] | None, path: str):
  for pattern, value in (patterns or {}).items():
    if pattern.fullmatch(path):
      return value
  return None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how.

  Attributes:
    rank: the rank r of every adapter (overridden per path by rank_pattern).
    alpha: the LoRA alpha; defaults to ``rank``. The scale is ``alpha / rank``
      (``alpha / sqrt(rank)`` with ``rslora=True``).
    targets: which kernels get adapters: a regex matched with ``re.fullmatch``
      against the '/'-joined key path (``params/block_0/attn/query/kernel``;
      for Flax NNX state the trailing ``value`` is dropped:
      ``block_0/attn/query/kernel``), a list of regexes, a callable
      ``(path, leaf) -> bool``, or ``"all-linear"`` (every leaf named
      ``kernel`` with two or more axes; unlike PEFT the output layer is not
      excluded for you, use ``exclude``).
    exclude: leaves never adapted, in the same forms as ``targets``.
    rank_pattern: ``{regex: rank}``, first full match wins.
    alpha_pattern: ``{regex: alpha}``, first full match wins.
    dropout: dropout rate on the input of the LoRA branch only.
    rslora: scale by ``alpha / sqrt(rank)``.
    init: ``"kaiming"`` (PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)), i.e.
      kaiming-uniform with a = sqrt(5)) or ``"gaussian"`` (A ~ N(0, (1/r)^2),
      PEFT's ``init_lora_weights="gaussian"``): B is zero and the model's
      output unchanged. ``"pissa"`` (top-r SVD of W: A = U_r sqrt(S_r/s),
      B = sqrt(S_r/s) Vh_r), ``"pissa_niter_K"`` (the same by randomized SVD
      with K power iterations) and ``"olora"`` (QR of W) start A, B non-zero
      and replace the kernel by ``W - s·A@B`` (PEFT's inits of the same
      names): keep ``lj.adapter(params)`` from right after ``lora_init`` to
      convert the trained adapter to plain LoRA on the original base with
      ``lj.to_lora``.
    dtype: the factors' dtype; defaults to the kernel's.
    trainable: leaves trained in full (PEFT's modules_to_save), same forms as
      ``targets``.
    layouts: ``{regex: roles}`` giving a kernel's axis roles (``"io"``,
      ``"sio"``, ``"ioo"``, ``"iiio"``, ...: s = stacked layer axis, i = input,
      o = output). Without it, 2-D kernels are ``"io"`` and other kernels need
      it or ``lora_init(..., trace=fn)``.
    layers_to_transform: PEFT's field of that name: an int or a list of layer
      indexes; only those layers get adapters. A stacked kernel (roles
      starting with ``s``) keeps one LoraWeight whose other layers hold
      A = B = 0: exact no-ops whose gradients are exactly zero (dA = s·xᵀ(g·Bᵀ),
      dB = s·(x·A)ᵀg), so optimizers whose update is zero at a zero gradient
      and parameter (SGD, Adam(W), Lion, ...) keep them zero; another kernel is adapted only when its path has a
      layer index (the first ``/``-component ``N`` or ``name_N``, e.g.
      ``layers_3``) in the list.
    dora: DoRA (PEFT's ``use_dora``): each adapted kernel also gets a
      trainable magnitude ``m`` (one entry per output column, initialised to
      ``‖W‖_c``) and becomes ``W' = m · (W + ΔW) / ‖W + ΔW‖_c``, the norm
      over the input axes and constant to autodiff. Matmuls stay factored
      (the norm is computed from ``AᵀW`` and ``AᵀA``, never ``W + ΔW``);
      a DoRA kernel in a conv or embedding lookup gets ``W'`` formed (warned).

  Every field is checked at construction: a wrong type, a value out of range
  (``alpha`` must be finite and > 0, ``dropout`` in [0, 1)) or a bad regex
  raises a ``TypeError`` / ``ValueError`` naming the field (and pattern key).

  Example:
    >>> import lora_jax as lj
    >>> cfg = lj.LoraConfig(rank=4, alpha=8, targets=r".*/(query|value)/kernel")
    >>> cfg.scale_for("params/attn/query/kernel")
    2.0
  """

  rank: int = 8
  alpha: float | None = None
  targets: Spec = ALL_LINEAR
  exclude: Spec = None
  rank_pattern: Mapping[str, int] | None = None
  alpha_pattern: Mapping[str, float] | None = None
  dropout: float = 0.0
  rslora: bool = False
  init: str = "kaiming"
  dtype: Any = None
  trainable: Spec = None
  layouts: Mapping[str, str] | None = None
  layers_to_transform: int | tuple[int, ...] | None = None
  dora: bool = False

  def __post_init__(self):
    # every field checked once, here (each error names the field); the regex
    # fields are compiled once and kept: selects / *_for run for every leaf
    fix = lambda name, value: object.__setattr__(self, name, value)
    fix("rank", _positive_int("rank", self.rank))
    if self.alpha is not None:
      fix("alpha", _positive_real("alpha", self.alpha))
    fix("dropout", _real("dropout", self.dropout))
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
    if isinstance(self.rslora, np.bool_):
      fix("rslora", bool(self.rslora))
    if not isinstance(self.rslora, bool):
      raise TypeError(f"LoraConfig.rslora must be True or False, got "
                      f"{type(self.rslora).__name__} {self.rslora!r}")
    if isinstance(self.dora, np.bool_):
      fix("dora", bool(self.dora))
    if not isinstance(self.dora, bool):
      raise TypeError(f"LoraConfig.dora must be True or False, got "
                      f"{type(self.dora).__name__} {self.dora!r}")
    fix("init", _init(self.init))
    fix("layers_to_transform", _layers(self.layers_to_transform))
    _float_dtype(self.dtype)
    checks = {"rank_pattern": _positive_int, "alpha_pattern": _positive_real,
              "layouts": _roles}
    patterns = {}
    for name, check in checks.items():
      value = _pattern_map(name, getattr(self, name), check)
      if value is not None:
        fix(name, value)
        value = {re.compile(k): v for k, v in value.items()}
      patterns[name] = value
    object.__setattr__(self, "_patterns", patterns)
    object.__setattr__(self, "_match", {
        name: matcher(getattr(self, name), name)
        for name in ("targets", "exclude", "trainable")})

  def rank_for(self, path: str) -> int:
    value = _pattern_lookup(self._patterns["rank_pattern"], path)
    return self.rank if value is None else value

  def alpha_for(self, path: str) -> float:
    value = _pattern_lookup(self._patterns["alpha_pattern"], path)
    if value is not None:
      return float(value)
    return float(self.rank_for(path) if self.alpha is None else self.alpha)

  def scale_for(self, path: str) -> float:
    r = self.rank_for(path)
    return self.alpha_for(path) / (math.sqrt(r) if self.rslora else r)

  def layout_for(self, path: str) -> str | None:
    return _pattern_lookup(self._patterns["layouts"], path)

  def selects(self, path: str, leaf: Any) -> bool:
    return self._match["targets"](path, leaf) and not self._match["exclude"](path, leaf)

  def trains(self, path: str, leaf: Any) -> bool:
    return self._match["trainable"](path, leaf)

  def to_dict(self) -> dict:
    """A JSON-friendly description (callables are recorded by their repr)."""
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name == "dtype" and v is not None:  # before callable: jnp.float32 is a class
        v = np.dtype(v).name
      elif callable(v):
        v = repr(v)
      elif isinstance(v, tuple):
        v = list(v)
      elif isinstance(v, Mapping):
        v = dict(v)
      out[f.name] = v
    return out
