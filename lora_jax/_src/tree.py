"""Key-path helpers: the '/'-joined path strings that targets match against."""

from typing import Any, Callable

import jax
import numpy as np

from lora_jax._src.types import KeyPath, PyTree


def key_str(key: Any) -> str:
  """One component of a key path as plain text."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: KeyPath) -> str:
  """The '/'-joined path of a leaf, e.g. ``params/Dense_0/kernel``.

  A trailing ``value`` attribute (Flax NNX ``Variable.value``) is dropped, so
  NNX state paths read like Linen ones: ``layers/0/linear/kernel``.
  """
  parts = [key_str(k) for k in path]
  if parts and parts[-1] in ("value", "raw_value") and isinstance(
      path[-1], jax.tree_util.GetAttrKey):
    parts = parts[:-1]
  return "/".join(parts)


def is_array(x: Any) -> bool:
  """True for the array leaves that are model inputs (jax or numpy)."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def flatten(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None):
  """``tree_flatten_with_path`` returning ``([(path_str, leaf)], treedef)``."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(path_str(p), x) for p, x in leaves], treedef


def some_paths(paths: list[str], n: int = 8) -> str:
  """A short listing of paths for error messages."""
  shown = "\n  ".join(p or "(the root: the params are a single leaf)" for p in paths[:n])
  more = f"\n  ... and {len(paths) - n} more" if len(paths) > n else ""
  return f"\n  {shown}{more}" if paths else " (the tree has no array leaves)"
