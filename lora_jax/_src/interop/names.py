"""Name maps: Flax leaf paths -> torch state-dict keys, each with a layout.

A name map is a callable ``path -> key | None`` or a list of rules (first
``re.fullmatch`` wins). A rule is a ``Rule`` or a tuple read as one:
``(regex, key)``, ``(regex, key, layout)`` or ``(regex, key, layout, part)``.
A key holding ``{layer}`` (``LAYER``) names a stacked leaf: one torch tensor
per index of its leading axis. See ``lora_jax.interop.torch`` for the whole
picture.
"""

import dataclasses
import re
from typing import Any, Callable, NamedTuple, Sequence, Union

from lora_jax._src import tree
from lora_jax._src.weight import is_node

LAYER = "{layer}"
LAYOUTS = ("auto", "transposed", "as_is", "conv1d")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One name-map rule: which torch tensor a Flax leaf is, and how it is stored.

  Attributes:
    flax: a regex that must ``re.fullmatch`` the Flax path.
    torch: the torch key, ``match.expand``-ed (``\\1``, ``\\g<name>``).
    layout: how the torch tensor is laid out:

      * ``"auto"`` (default): leaves named ``kernel`` are torch ``Linear``
        ``(out, in)`` / ``Conv`` ``(O, I, *k)`` weights (``"transposed"``),
        everything else ``"as_is"``;
      * ``"transposed"``: a torch ``Linear`` / ``Conv`` weight, whatever the
        leaf's name;
      * ``"as_is"``: the Flax array itself (reshaped only when the axes
        merge or split in order, e.g. a bias ``(h*hd,)`` -> ``(h, hd)``);
      * ``"conv1d"``: GPT-2's ``Conv1D`` (weights stored ``(in, out)``): as
        is, and PEFT adapters on it are ``fan_in_fan_out``.

    part: ``(i, n)`` when the torch tensor is fused (``nn.MultiheadAttention``
      ``in_proj_weight`` / ``in_proj_bias``, GPT-2's ``c_attn``): the leaf is
      the ``i``-th of ``n`` equal slices along the torch *output* axis (axis 0
      of a Linear weight or a bias, the last axis of a ``conv1d`` weight).
      Loading slices, saving concatenates the ``n`` leaves.

  Example:
    >>> rules = [Rule(r"h_(\\d+)/attn/c_attn/kernel", r"h.\\1.attn.c_attn.weight", "conv1d"),
    ...          (r"attn/query/kernel", "attn.in_proj_weight", "auto", (0, 3))]
    >>> as_target_map(rules)("h_0/attn/c_attn/kernel")
    Target(key='h.0.attn.c_attn.weight', layout='conv1d', part=None)
  """

  flax: str
  torch: str
  layout: str = "auto"
  part: tuple[int, int] | None = None

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"name map rule {self.flax!r}: layout {self.layout!r} is not one "
                       f"of {LAYOUTS}")
    if self.part is not None:
      ok = (isinstance(self.part, tuple) and len(self.part) == 2
            and all(isinstance(v, int) for v in self.part) and 0 <= self.part[0] < self.part[1])
      if not ok:
        raise ValueError(f"name map rule {self.flax!r}: part must be (i, n) with "
                         f"0 <= i < n; got {self.part!r}")


class Target(NamedTuple):
  """Where a Flax leaf lives in torch: ``key``, ``layout`` and fused ``part``."""
  key: str
  layout: str = "auto"
  part: tuple[int, int] | None = None


NameMap = Union[Callable[[str], Union[str, None]], Sequence[Union[Rule, tuple]]]


def _rule(r: Any) -> Rule:
  if isinstance(r, Rule):
    return r
  if isinstance(r, (tuple, list)) and 2 <= len(r) <= 4:
    return Rule(*(tuple(x) if isinstance(x, list) else x for x in r))
  raise TypeError(f"expected (regex, key), (regex, key, layout), "
                  f"(regex, key, layout, part) or a Rule; got {r!r}")


def as_target_map(spec: NameMap) -> Callable[[str], Target | None]:
  """Normalise a name map to ``path -> Target(key, layout, part) | None``.

  A callable may return a key, a ``Target`` / tuple ``(key, layout[, part])``
  or None.

  Example:
    >>> m = as_target_map([(r"fc/kernel", "fc.weight", "conv1d")])
    >>> m("fc/kernel").layout, m("other")
    ('conv1d', None)
  """
  if callable(spec):
    def from_callable(path: str) -> Target | None:
      got = spec(path)
      if got is None or isinstance(got, str):
        return None if got is None else Target(got)
      rule = Rule(re.escape(path), *got)  # validates layout and part
      return Target(rule.torch, rule.layout, rule.part)
    return from_callable
  try:
    rules = [_rule(r) for r in spec]
    compiled = [(re.compile(r.flax), r) for r in rules]
  except (TypeError, ValueError, re.error) as e:
    raise TypeError("name_map must be a callable path -> key, or a list of rules "
                    "(regex, key[, layout[, part]]) / Rule; "
                    f"got {spec!r} ({e})") from e

  def target(path: str) -> Target | None:
    for pattern, rule in compiled:
      m = pattern.fullmatch(path)
      if m:
        return Target(m.expand(rule.torch), rule.layout, rule.part)
    return None

  return target


def as_name_map(spec: NameMap) -> Callable[[str], str | None]:
  """Normalise a name map to a callable ``path -> torch key | None``.

  Args:
    spec: a callable ``path -> key | None``, or a sequence of rules (see
      ``Rule``); the first regex that fullmatches the path gives
      ``match.expand(key)``; no match gives ``None``. Layouts and parts are
      dropped here (``as_target_map`` keeps them).

  Returns:
    A callable ``path -> torch key | None``.

  Example:
    >>> m = as_name_map([(r"layers_(\\d+)/dense/kernel", r"blocks.\\1.fc.weight")])
    >>> m("layers_2/dense/kernel"), m("other")
    ('blocks.2.fc.weight', None)
  """
  target = as_target_map(spec)

  def name(path: str) -> str | None:
    t = target(path)
    return None if t is None else t.key

  return name


def torch_keys(key: str, shape: Sequence[int]) -> list[str]:
  """The torch keys behind one Flax leaf: ``[key]``, or one per layer.

  Example:
    >>> torch_keys("h.{layer}.w", (3, 4, 4))
    ['h.0.w', 'h.1.w', 'h.2.w']
  """
  if LAYER not in key:
    return [key]
  if not shape:
    raise ValueError(f"torch key {key!r} is stacked ({LAYER}) but the leaf is a scalar")
  return [key.replace(LAYER, str(i)) for i in range(shape[0])]


def torch_index(template: Any, name_map: NameMap) -> dict[str, tuple[str, int | None]]:
  """``{torch_key: (flax_path, layer)}`` for every tensor the template takes whole.

  The inverse view of a name map, for code that starts from torch keys (e.g.
  a PEFT adapter's ``...q_proj.lora_A.weight``: look up ``...q_proj.weight``).
  ``layer`` is the index along a stacked leaf's leading axis, else None.
  Fused tensors (rules with a ``part``) are left out: no single leaf is them
  (``fused_keys`` lists them).

  Example:
    >>> import jax, numpy as np
    >>> t = {"h": {"kernel": jax.ShapeDtypeStruct((2, 4, 4), np.float32)}}
    >>> torch_index(t, [(r"h/kernel", "h.{layer}.weight")])["h.1.weight"]
    ('h/kernel', 1)
  """
  out = {}
  for key, (path, layer, target) in _index(template, name_map).items():
    if target.part is None:
      out[key] = (path, layer)
  return out


def fused_keys(template: Any, name_map: NameMap) -> dict[str, list[str]]:
  """``{torch_key: [flax paths]}`` for fused torch tensors (rules with a ``part``)."""
  out: dict[str, list[str]] = {}
  target_of = as_target_map(name_map)
  for path, leaf in tree.flatten(template, is_leaf=is_node)[0]:
    t = target_of(path)
    if t is not None and t.part is not None:
      for k in torch_keys(t.key, tuple(leaf.shape)):
        out.setdefault(k, []).append(path)
  return out


def _index(template: Any, name_map: NameMap):
  target_of = as_target_map(name_map)
  out = {}
  for path, leaf in tree.flatten(template, is_leaf=is_node)[0]:
    t = target_of(path)
    if t is None:
      continue
    stacked = LAYER in t.key
    for n, k in enumerate(torch_keys(t.key, tuple(leaf.shape))):
      out[k] = (path, n if stacked else None, t)
  return out


def leaf_layout(path: str, layout: str) -> str:
  """The effective layout of a leaf: ``"transposed"`` or ``"as_is"`` (or ``"conv1d"``).

  Example:
    >>> leaf_layout("fc/kernel", "auto"), leaf_layout("fc/bias", "auto")
    ('transposed', 'as_is')
  """
  if layout == "auto":
    return "transposed" if path.rsplit("/", 1)[-1] == "kernel" else "as_is"
  return layout
