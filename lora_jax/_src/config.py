"""LoraConfig: which kernels get adapters, with which rank, alpha and layout."""

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

from lora_jax._src.types import Spec
from lora_jax._src.weight import ROLES

ALL_LINEAR = "all-linear"
INITS = ("kaiming", "gaussian")


def _static(name: str, value: Any, kinds: tuple) -> None:
  """Raise a clear error for a traced or wrongly typed static field."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"LoraConfig.{name} must be a static Python value, got a traced value "
        f"{value}. Build the config outside jax.jit / jax.grad.")
  if isinstance(value, bool) or not isinstance(value, kinds):
    raise TypeError(
        f"LoraConfig.{name} must be {' or '.join(k.__name__ for k in kinds)}, "
        f"got {type(value).__name__} {value!r}")


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
  if not isinstance(spec, (list, tuple)) or not all(isinstance(s, str) for s in spec):
    raise TypeError(f"LoraConfig.{name} must be a regex string, a list of regex "
                    f"strings or a callable (path, leaf) -> bool; got {spec!r}")
  patterns = []
  for s in spec:
    if s == ALL_LINEAR:
      patterns.append(None)
      continue
    try:
      patterns.append(re.compile(s))
    except re.error as e:
      raise ValueError(f"LoraConfig.{name}: {s!r} is not a valid regex: {e}") from e

  def match(path: str, leaf: Any) -> bool:
    for p in patterns:
      if p is None:
        if path.rsplit("/", 1)[-1] == "kernel" and len(getattr(leaf, "shape", ())) >= 2:
          return True
      elif p.fullmatch(path):
        return True
    return False
  return match


def _pattern_lookup(patterns: Mapping[str, Any] | None, path: str):
  for pattern, value in (patterns or {}).items():
    if re.fullmatch(pattern, path):
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
      PEFT's ``init_lora_weights="gaussian"``). B is always zero.
    dtype: the factors' dtype; defaults to the kernel's.
    trainable: leaves trained in full (PEFT's modules_to_save), same forms as
      ``targets``.
    layouts: ``{regex: roles}`` giving a kernel's axis roles (``"io"``,
      ``"sio"``, ``"ioo"``, ``"iiio"``, ...: s = stacked layer axis, i = input,
      o = output). Without it, 2-D kernels are ``"io"`` and other kernels need
      it or ``lora_init(..., trace=fn)``.

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

  def __post_init__(self):
    _static("rank", self.rank, (int,))
    if self.rank <= 0:
      raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank}")
    if self.alpha is not None:
      _static("alpha", self.alpha, (int, float))
    _static("dropout", self.dropout, (int, float))
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
    if self.init not in INITS:
      raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
    for name, kinds in (("rank_pattern", (int,)), ("alpha_pattern", (int, float))):
      for pattern, value in (getattr(self, name) or {}).items():
        _static(f"{name}[{pattern!r}]", value, kinds)
        if value <= 0:
          raise ValueError(f"LoraConfig.{name}[{pattern!r}] must be > 0, got {value}")
    for pattern, roles in (self.layouts or {}).items():
      if not isinstance(roles, str) or not set(roles) <= ROLES or not (
          "i" in roles and "o" in roles):
        raise ValueError(
            f"LoraConfig.layouts[{pattern!r}] must be a string of 's', 'i', 'o' "
            f"with at least one 'i' and one 'o' (e.g. 'io', 'sio'); got {roles!r}")
    # validated once, and kept: selects / trains run for every leaf
    object.__setattr__(self, "_match", {
        name: matcher(getattr(self, name), name)
        for name in ("targets", "exclude", "trainable")})

  def rank_for(self, path: str) -> int:
    value = _pattern_lookup(self.rank_pattern, path)
    return self.rank if value is None else value

  def alpha_for(self, path: str) -> float:
    value = _pattern_lookup(self.alpha_pattern, path)
    if value is not None:
      return float(value)
    return float(self.rank_for(path) if self.alpha is None else self.alpha)

  def scale_for(self, path: str) -> float:
    r = self.rank_for(path)
    return self.alpha_for(path) / (math.sqrt(r) if self.rslora else r)

  def layout_for(self, path: str) -> str | None:
    return _pattern_lookup(self.layouts, path)

  def selects(self, path: str, leaf: Any) -> bool:
    return self._match["targets"](path, leaf) and not self._match["exclude"](path, leaf)

  def trains(self, path: str, leaf: Any) -> bool:
    return self._match["trainable"](path, leaf)

  def to_dict(self) -> dict:
    """A JSON-friendly description (callables are recorded by their repr)."""
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if callable(v):
        v = repr(v)
      elif f.name == "dtype" and v is not None:
        v = np.dtype(v).name
      elif isinstance(v, tuple):
        v = list(v)
      elif isinstance(v, Mapping):
        v = dict(v)
      out[f.name] = v
    return out
