"""Type aliases shared by lora_jax modules."""

from typing import Any, Callable, Sequence, Union

import jax

PyTree = Any
Params = Any  # a pytree of arrays, possibly holding LoraWeight / Trainable nodes
Array = jax.Array
KeyPath = tuple  # a jax.tree_util key path
# A selection spec: a regex (fullmatch on the '/'-joined path), a list of
# regexes, or a callable (path, leaf) -> bool.
Spec = Union[str, Sequence[str], Callable[[str, Any], bool], None]
