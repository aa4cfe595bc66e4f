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

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_LETTERS = "abcdefghijklmnopqstuvwxyz"  # 'r' is reserved for the rank axis

ROLES = frozenset("sio")


def _outside_lora(kind: str) -> TypeError:
  return TypeError(
      f"A {kind} reached a function that was not wrapped with lora_jax.lora. "
      "Call the model as `lora_jax.lora(apply_fn)(params, ...)`, or fold the "
      "adapters in first with `lora_jax.merge(params)`.")


@jax.tree_util.register_pytree_with_keys_class
class LoraWeight:
  """A frozen kernel ``w`` with a low-rank update ``scale · a @ b``.

  Attributes:
    w: the frozen base kernel (never updated by lora_jax's optimizer).
    a: factor of shape ``stack + in + (rank,)``.
    b: factor of shape ``stack + (rank,) + out``; zero at init.
    scale: ``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA).
    roles: one character per axis of ``w``: ``s``, ``i`` or ``o``.
    dropout: dropout rate on the LoRA branch's input (PEFT semantics).

  Example:
    >>> import jax.numpy as jnp, lora_jax as lj
    >>> lw = lj.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)),
    ...                    scale=1.0, roles="io")
    >>> lw.shape, lw.rank
    ((4, 3), 2)
  """

  __slots__ = ("w", "a", "b", "scale", "roles", "dropout")

  def __init__(self, w, a, b, *, scale: float, roles: str, dropout: float = 0.0):
    for name, value in (("scale", scale), ("dropout", dropout)):
      if isinstance(value, jax.core.Tracer) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"LoraWeight.{name} must be a static Python number (it is part of the "
            f"pytree structure, like a hyperparameter), got {value!r}")
    if not isinstance(roles, str) or not set(roles) <= ROLES:
      raise TypeError(f"LoraWeight.roles must be a string of 's', 'i', 'o', got {roles!r}")
    self.w, self.a, self.b = w, a, b
    self.scale, self.roles, self.dropout = scale, roles, dropout

  def tree_flatten_with_keys(self):
    keys = jax.tree_util.GetAttrKey
    children = ((keys("w"), self.w), (keys("a"), self.a), (keys("b"), self.b))
    return children, (self.scale, self.roles, self.dropout)

  @classmethod
  def tree_unflatten(cls, aux, children):
    scale, roles, dropout = aux
    return cls(*children, scale=scale, roles=roles, dropout=dropout)

  def replace(self, **changes) -> "LoraWeight":
    fields = dict(w=self.w, a=self.a, b=self.b, scale=self.scale,
                  roles=self.roles, dropout=self.dropout)
    fields.update(changes)
    w, a, b = fields.pop("w"), fields.pop("a"), fields.pop("b")
    return LoraWeight(w, a, b, **fields)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  @property
  def ndim(self) -> int:
    return len(self.roles)

  @property
  def rank(self) -> int:
    return int(self.a.shape[-1])

  def __repr__(self) -> str:
    def desc(x):
      return f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape") and hasattr(x, "dtype") else repr(x)
    return (f"LoraWeight(w={desc(self.w)}, a={desc(self.a)}, b={desc(self.b)}, "
            f"scale={self.scale}, roles={self.roles!r}, dropout={self.dropout})")

  # A LoraWeight is not an array: fail loudly where user code treats it as one.
  def __jax_array__(self):
    raise _outside_lora("LoraWeight")

  def __array__(self, *args, **kwargs):
    raise _outside_lora("LoraWeight")


@jax.tree_util.register_pytree_with_keys_class
class Trainable:
  """A leaf trained in full; ``base`` keeps the original value.

  Example:
    >>> import jax.numpy as jnp, lora_jax as lj
    >>> t = lj.Trainable(jnp.zeros(3), jnp.zeros(3))
    >>> t.value.shape
    (3,)
  """

  __slots__ = ("value", "base")

  def __init__(self, value, base):
    self.value, self.base = value, base

  def tree_flatten_with_keys(self):
    keys = jax.tree_util.GetAttrKey
    return ((keys("value"), self.value), (keys("base"), self.base)), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)

  def __repr__(self) -> str:
    shape = getattr(self.value, "shape", None)
    return f"Trainable(value={getattr(self.value, 'dtype', '')}{list(shape or ())})"

  def __jax_array__(self):
    raise _outside_lora("Trainable leaf")

  def __array__(self, *args, **kwargs):
    raise _outside_lora("Trainable leaf")


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
  sa, sb, sw = einsum_specs(lw.roles)
  a = lw.a.astype(dtype) * jnp.asarray(lw.scale, dtype)  # scale the small factor
  return jnp.einsum(f"{sa},{sb}->{sw}", a, lw.b.astype(dtype),
                    preferred_element_type=dtype)
