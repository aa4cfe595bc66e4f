"""DoRA: ``W' = m · (W + ΔW) / ‖W + ΔW‖_c`` without forming ``W + ΔW``.

``‖·‖_c`` is the norm of output column ``c`` over the input axes (PEFT's
``weight_norm``). Its square comes from three pieces, each computed without a
``d_in × d_out`` temporary (``ΔW = s·A@B``, ``A`` (in, r), ``B`` (r, out))::

  ‖W_c‖²            = Σ_i W_ic²                (a fused reduction)
  ⟨W_c, ΔW_c⟩       = s · Σ_k (AᵀW)_kc B_kc    (AᵀW: r × out, O(in·out·r))
  ‖ΔW_c‖²           = s² · Σ_kl (AᵀA)_kl B_kc B_lc

The norm is a constant to autodiff (``stop_gradient``, as PEFT's
``.detach()``), so the backward pass never touches ``W`` either.
"""

import jax
import jax.numpy as jnp

from lora_jax._src import explicit
from lora_jax._src.weight import LoraWeight, einsum_specs


def _flat(lw: LoraWeight, w, a, b):
  """``w`` (S, I, O), ``a`` (S, I, r), ``b`` (S, r, O) in float32."""
  n_s = lw.roles.count("s")
  w = jnp.transpose(w, _perm(lw.roles))  # a no-op for 'io' / 'sio'
  stack = w.shape[:n_s]
  return (w.astype(jnp.float32).reshape(stack + (a.size // (a.shape[-1] * _size(stack)), -1)),
          a.astype(jnp.float32).reshape(stack + (-1, a.shape[-1])),
          b.astype(jnp.float32).reshape(stack + (b.shape[n_s], -1)))


def _size(shape):
  out = 1
  for d in shape:
    out *= d
  return out


def column_norm(lw: LoraWeight, w=None) -> jax.Array:
  """``‖W + ΔW‖_c`` in float32, shape ``stack + out``, gradient stopped.

  Example:
    >>> import jax.numpy as jnp, lora_jax as lj
    >>> from lora_jax._src.dora import column_norm
    >>> lw = lj.LoraWeight(jnp.eye(2), jnp.ones((2, 1)), jnp.ones((1, 2)),
    ...                    scale=1.0, roles="io")
    >>> column_norm(lw).tolist()   # columns (2, 1) and (1, 2)
    [2.2360680103302, 2.2360680103302]
  """
  w = lw.w if w is None else w
  w, a, b = (jax.lax.stop_gradient(x) for x in _flat(lw, w, lw.a, lw.b))
  s = lw.scale
  ww = jnp.sum(w * w, axis=-2)
  ws = explicit.spec_of(w)  # explicit axes: the (r, out) products keep w's out axis
  aw = jnp.einsum("...ir,...io->...ro", a, w, out_sharding=None if ws is None else
                  explicit.like(w, ws[:-2] + (None, ws[-1])))
  cross = jnp.sum(aw * b, axis=-2)
  aa = jnp.einsum("...ir,...iq->...rq", a, a, out_sharding=None if ws is None else
                  explicit.like(w, ws[:-2] + (None, None)))
  quad = jnp.sum(jnp.einsum("...rq,...qo->...ro", aa, b) * b, axis=-2)
  sq = jnp.maximum(ww + 2.0 * s * cross + (s * s) * quad, 0.0)
  n_s = lw.roles.count("s")
  return jnp.sqrt(sq).reshape(lw.b.shape[:n_s] + lw.b.shape[n_s + 1:])


def column_scale(lw: LoraWeight) -> jax.Array:
  """``m / ‖W + ΔW‖_c`` (norm constant to autodiff), in ``b``'s layout with
  a rank axis of size 1, so it broadcasts against ``b``."""
  n_s = lw.roles.count("s")
  g = lw.m.astype(jnp.float32) / column_norm(lw)
  return jnp.expand_dims(g, n_s)


def dora_kernel(lw: LoraWeight, w=None) -> jax.Array:
  """``W' = m · (W + ΔW) / ‖W + ΔW‖_c`` with ``w``'s axes, float32 (formed:
  for merge and for consumers with no factored DoRA rule)."""
  from lora_jax._src.weight import delta
  w = lw.w if w is None else w
  perm = _perm(lw.roles)
  n_s, n_i = lw.roles.count("s"), lw.roles.count("i")
  g = lw.m.astype(jnp.float32) / column_norm(lw, w)  # stack + out
  g = g.reshape(g.shape[:n_s] + (1,) * n_i + g.shape[n_s:])
  full = jnp.transpose(w.astype(jnp.float32) + delta(lw.replace(w=None, m=None)), perm)
  return jnp.transpose(full * g, _inverse(perm))


def _perm(roles):
  """The permutation putting w's axes in stack, in, out order (stable)."""
  return sorted(range(len(roles)), key=lambda k: "sio".index(roles[k]))


def _inverse(perm):
  inv = [0] * len(perm)
  for n, k in enumerate(perm):
    inv[k] = n
  return inv
