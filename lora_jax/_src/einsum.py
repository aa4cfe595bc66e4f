"""A two-operand einsum that emits one ``dot_general`` (and a transpose).

The rules build the LoRA branch as einsums over the factors. ``jnp.einsum``
is itself a jitted function: every call plans a contraction path and traces
and inlines a nested jit, which made the interpreter's rules most of
``lora(f)``'s trace time (48 layers: about two thirds of it, by cProfile).
The branch's einsums are plain pairwise contractions, so they are bound here
directly as ``lax.dot_general``; anything else (a repeated letter, a letter
summed away on one side) goes to ``jnp.einsum``.
"""

import jax.numpy as jnp
import numpy as np
from jax import lax


def scalar(value, dtype):
  """``value`` as a rank-0 constant of ``dtype`` for ``lax`` ops: a NumPy
  scalar for a Python number (no device array is made while tracing), else a
  cast of the array."""
  if isinstance(value, (int, float)):
    return np.asarray(value, dtype)
  return lax.convert_element_type(value, dtype)


def einsum2(spec: str, x, y, *, precision=None, preferred_element_type=None,
            out_sharding=None):
  """``jnp.einsum(spec, x, y, ...)`` for a pairwise contraction, as one
  ``dot_general`` plus at most one transpose. ``out_sharding`` (explicit
  mesh axes) is passed on only when given, so JAX releases without the
  keyword run the rest.

  Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax._src.einsum import einsum2
    >>> einsum2("ab,bc->ca", jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (4, 2)
  """
  ins, out = spec.split("->")
  xs, ys = ins.split(",")
  kw = {} if out_sharding is None else {"out_sharding": out_sharding}
  both = [c for c in xs if c in ys]
  batch = [c for c in both if c in out]
  got = batch + [c for c in xs if c not in ys] + [c for c in ys if c not in xs]
  if (len(set(xs)) != len(xs) or len(set(ys)) != len(ys) or len(set(out)) != len(out)
      or (set(xs) ^ set(ys)) - set(out) or not set(out) <= set(xs) | set(ys)
      or (kw and got != list(out))):  # a sharding names `out`'s axes, not got's
    return jnp.einsum(spec, x, y, precision=precision,
                      preferred_element_type=preferred_element_type, **kw)
  if x.dtype != y.dtype:
    dtype = jnp.promote_types(x.dtype, y.dtype)
    x, y = lax.convert_element_type(x, dtype), lax.convert_element_type(y, dtype)
  contract = [c for c in both if c not in out]
  if not batch and not kw:
    z = _as_matmul(xs, ys, out, contract, x, y, precision, preferred_element_type)
    if z is not None:
      return z
  dn = (([xs.index(c) for c in contract], [ys.index(c) for c in contract]),
        ([xs.index(c) for c in batch], [ys.index(c) for c in batch]))
  z = lax.dot_general(x, y, dn, precision=precision,
                      preferred_element_type=preferred_element_type, **kw)
  if got == list(out):
    return z
  return lax.transpose(z, [got.index(c) for c in out])


def _as_matmul(xs, ys, out, contract, x, y, precision, preferred_element_type):
  """``fold_matmul`` when the axes already line up as ``x: (F..., C...)``,
  ``y: (C..., G...)``, ``out: (F..., G...)`` and some group has more than one
  axis; else None."""
  nf, nc = len(xs) - len(contract), len(contract)
  f, c, g = xs[:nf], xs[nf:], ys[nc:]
  if (list(c) != contract or ys[:nc] != c or out != f + g
      or (len(f) <= 1 and len(c) <= 1 and len(g) <= 1)):
    return None
  return fold_matmul(x, y, nc, precision=precision,
                     preferred_element_type=preferred_element_type)


def fold_matmul(x, y, nc: int, *, precision=None, preferred_element_type=None):
  """``x (F..., C...) · y (C..., G...) -> (F..., G...)``, contracting the
  ``nc`` axes ``C``, as one 2-D matmul between reshapes.

  Only reshapes (free in XLA), and the reason is speed: the transpose of a
  dot with several free axes on one side (the weight gradient of a
  ``(batch, seq, d)`` activation) makes XLA:CPU transpose the full-size
  cotangent in a slow strided loop (``bench/peft.py``; ``docs/guides/
  training_step.md``), where the 2-D form's gradient is a plain matmul.

  Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax._src.einsum import fold_matmul
    >>> fold_matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5)), 1).shape
    (2, 3, 5)
  """
  nf = x.ndim - nc
  fs, cs, gs = x.shape[:nf], x.shape[nf:], y.shape[nc:]
  size = lambda shape: int(np.prod(shape, dtype=np.int64))
  z = lax.dot_general(x.reshape(size(fs), size(cs)), y.reshape(size(cs), size(gs)),
                      (([1], [0]), ([], [])), precision=precision,
                      preferred_element_type=preferred_element_type)
  return z.reshape(*fs, *gs)
