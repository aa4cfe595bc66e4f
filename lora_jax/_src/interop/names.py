"""Name maps: Flax leaf paths -> torch state-dict keys.

A name map is a callable ``path -> key | None`` or a list of ``(regex,
replacement)`` rules (first ``re.fullmatch`` wins). A key holding ``{layer}``
(``LAYER``) names a stacked leaf: one torch tensor per index of its leading
axis. See ``lora_jax.interop.torch`` for the whole picture.
"""

import re
from typing import Any, Callable, Sequence, Union

from lora_jax._src import tree
from lora_jax._src.weight import is_node

LAYER = "{layer}"
NameMap = Union[Callable[[str], Union[str, None]], Sequence[tuple[str, str]]]


def as_name_map(spec: NameMap) -> Callable[[str], str | None]:
  """Normalise a name map (callable or ``(regex, replacement)`` rules).

  Args:
    spec: a callable ``path -> key | None`` (returned as is), or a sequence of
      ``(regex, replacement)`` pairs; the first regex that fullmatches the path
      gives ``match.expand(replacement)``; no match gives ``None``.

  Returns:
    A callable ``path -> torch key | None``.

  Example:
    >>> m = as_name_map([(r"layers_(\\d+)/dense/kernel", r"blocks.\\1.fc.weight")])
    >>> m("layers_2/dense/kernel"), m("other")
    ('blocks.2.fc.weight', None)
  """
  if callable(spec):
    return spec
  try:
    rules = [(re.compile(p), r) for p, r in spec]
  except (TypeError, ValueError, re.error) as e:
    raise TypeError("name_map must be a callable path -> key, or a list of "
                    f"(regex, replacement) pairs; got {spec!r} ({e})") from e

  def name(path: str) -> str | None:
    for pattern, replacement in rules:
      m = pattern.fullmatch(path)
      if m:
        return m.expand(replacement)
    return None

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
  """``{torch_key: (flax_path, layer)}`` for every tensor the template takes.

  The inverse view of a name map, for code that starts from torch keys (e.g.
  a PEFT adapter's ``...q_proj.lora_A.weight``: look up ``...q_proj.weight``).
  ``layer`` is the index along a stacked leaf's leading axis, else None.

  Example:
    >>> import jax, numpy as np
    >>> t = {"h": {"kernel": jax.ShapeDtypeStruct((2, 4, 4), np.float32)}}
    >>> torch_index(t, [(r"h/kernel", "h.{layer}.weight")])["h.1.weight"]
    ('h/kernel', 1)
  """
  name = as_name_map(name_map)
  out = {}
  for path, leaf in tree.flatten(template, is_leaf=is_node)[0]:
    key = name(path)
    if key is None:
      continue
    stacked = LAYER in key
    for n, k in enumerate(torch_keys(key, tuple(leaf.shape))):
      out[k] = (path, n if stacked else None)
  return out
