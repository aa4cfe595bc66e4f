"""Initializations that move the top of W into the adapter: PiSSA and OLoRA.

Both split a kernel ``W`` (flattened to ``(in, out)``, per stacked layer) as
``W = W_res + s·A0·B0``: the adapter starts non-zero and the frozen base
becomes the residual ``W_res``, so the model's output is unchanged (to
float rounding) while the training starts on the kernel's principal part.
They follow PEFT's ``pissa_init`` / ``olora_init`` (``tuners/lora/layer.py``)
written for lora_jax's ``(in, out)`` layout (PEFT's ``weight`` is ``W.T``):

* ``"pissa"``: ``W = U S Vh`` (exact SVD), ``A0 = U_r·sqrt(S_r/s)``,
  ``B0 = sqrt(S_r/s)·Vh_r``.
* ``"pissa_niter_K"``: the same from a randomized SVD (Halko et al., K
  power iterations, no oversampling: torch's ``svd_lowrank(W, q=r)``).
* ``"olora"``: ``W.T = Q R`` (QR), ``A0 = R_r.T``, ``B0 = Q_r.T`` (no division
  by ``s``, as in PEFT).

The base change is recorded by the initial adapter ``lj.adapter(params)``
taken right after ``lora_init``; ``to_lora`` turns a trained adapter plus
that record into a plain LoRA adapter of rank 2r on the *original* base, as
PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import tree
from lora_jax._src.weight import LoraWeight, check_factors, delta, is_node

_NITER = re.compile(r"pissa_niter_(\d+)")


def is_base_changing(init: str) -> bool:
  """Whether ``init`` moves part of W into the adapter (PiSSA / OLoRA)."""
  return init in ("pissa", "olora") or _NITER.fullmatch(init) is not None


def _to_matrix(w: jax.Array, roles: str):
  """``w`` -> ``(S, in, out)`` float32 and the permutation used."""
  order = [k for c in "sio" for k, r in enumerate(roles) if r == c]
  pick = lambda c: int(np.prod([w.shape[k] for k, r in enumerate(roles) if r == c]))
  m = jnp.transpose(w, order).reshape(pick("s"), pick("i"), pick("o"))
  return m.astype(jnp.float32), order


def _from_matrix(m: jax.Array, shape: tuple, roles: str, order: list[int]) -> jax.Array:
  moved = tuple(shape[k] for k in order)
  return jnp.transpose(m.reshape(moved), np.argsort(order))


def _randomized_svd(key, m: jax.Array, rank: int, niter: int):
  """Top-``rank`` SVD of ``m`` (in, out) by subspace iteration (torch's svd_lowrank)."""
  g = jax.random.normal(key, (m.shape[1], rank), m.dtype)
  q, _ = jnp.linalg.qr(m @ g)
  for _ in range(niter):
    z, _ = jnp.linalg.qr(m.T @ q)
    q, _ = jnp.linalg.qr(m @ z)
  u, s, vh = jnp.linalg.svd(q.T @ m, full_matrices=False)
  return q @ u, s, vh


def _factor_one(key, m: jax.Array, rank: int, scale: float, init: str):
  """``(a0, b0)`` of shapes (in, r), (r, out) for one (in, out) matrix."""
  if init == "olora":
    q, r = jnp.linalg.qr(m.T)  # PEFT: QR of torch's weight (out, in)
    return r[:rank].T, q[:, :rank].T
  niter = _NITER.fullmatch(init)
  if niter is None:
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
  else:
    u, s, vh = _randomized_svd(key, m, rank, int(niter.group(1)))
  root = jnp.sqrt(s[:rank] / scale)
  return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]


def principal_factors(key: jax.Array, w: jax.Array, roles: str, rank: int,
                      scale: float, init: str):
  """PiSSA / OLoRA: ``(w_res, a0, b0)`` with ``w = w_res + scale·a0@b0``.

  ``a0`` / ``b0`` have lora_jax's factor shapes (``stack + in + (r,)``,
  ``stack + (r,) + out``); the factorization runs in float32 and each result
  is cast back to ``w``'s dtype, as PEFT does.
  """
  m, order = _to_matrix(w, roles)
  keys = jax.random.split(key, m.shape[0])
  a0, b0 = jax.vmap(lambda k, x: _factor_one(k, x, rank, scale, init))(keys, m)
  res = m - scale * jnp.einsum("sir,sro->sio", a0, b0, precision="highest")
  w_res = _from_matrix(res, w.shape, roles, order).astype(w.dtype)
  stack = tuple(d for d, r in zip(w.shape, roles) if r == "s")
  ins = tuple(d for d, r in zip(w.shape, roles) if r == "i")
  outs = tuple(d for d, r in zip(w.shape, roles) if r == "o")
  return w_res, a0.reshape(stack + ins + (rank,)), b0.reshape(stack + (rank,) + outs)


def _convert_one(path: str, x, x0):
  if not isinstance(x, LoraWeight):
    raise ValueError(f"to_lora: {path} is a LoraWeight in `initial` but "
                     f"{type(x).__name__} in params; pass lj.adapter(params) taken right "
                     "after lora_init of these params")
  if (x0.roles, x0.scale) != (x.roles, x.scale) or x0.a.shape != x.a.shape:
    raise ValueError(
        f"to_lora: {path}: the initial adapter has roles {x0.roles!r}, scale {x0.scale}, "
        f"a {tuple(x0.a.shape)}, params have roles {x.roles!r}, scale {x.scale}, a "
        f"{tuple(x.a.shape)}; `initial` must be lj.adapter() of the same lora_init")
  check_factors(x, "to_lora")
  w = (x.w.astype(jnp.float32) + delta(x.replace(a=x0.a, b=x0.b))).astype(x.w.dtype)
  rank_axis = x.roles.count("s")
  a = jnp.concatenate([x.a, x0.a.astype(x.a.dtype)], axis=-1)
  b = jnp.concatenate([x.b, -x0.b.astype(x.b.dtype)], axis=rank_axis)
  return x.replace(w=w, a=a, b=b)


def to_lora(params, initial):
  """A PiSSA / OLoRA adapter as plain LoRA (rank 2r) on the original base.

  ``W = W_res + s·A0@B0`` at init and ``W_res + s·A@B`` after training, so
  the change to the original ``W`` is ``s·(A@B - A0@B0) = s·[A | A0]@[B ; -B0]``:
  the result has ``w = W_res + s·A0@B0`` (the original kernel, to rounding),
  ``a = [A | A0]``, ``b = [B ; -B0]`` and the same scale, so it saves with
  ``save_adapter`` / ``save_peft_adapter`` like any LoRA adapter, loads onto
  the original base, and ``merge`` gives the same kernels. This is PEFT's
  ``save_pretrained(path_initial_model_for_weight_conversion=...)``.

  Args:
    params: trained params from ``lora_init(..., LoraConfig(init="pissa"))``
      (or ``"olora"``, ``"pissa_niter_K"``).
    initial: ``lj.adapter(params)`` taken right after that ``lora_init``: the
      record of the base change.

  Returns:
    params whose LoraWeights named in ``initial`` have rank 2r on the original kernels.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> w = {"k": jax.random.normal(jax.random.key(1), (6, 4))}
    >>> p = lj.lora_init(jax.random.key(0), w, lj.LoraConfig(rank=2, targets="k", init="pissa"))
    >>> init = lj.adapter(p)
    >>> plain = lj.to_lora(p, init)
    >>> plain["k"].rank, bool(jnp.allclose(plain["k"].w, w["k"], atol=1e-5))
    (4, True)
  """
  if not isinstance(initial, dict) or not initial:
    raise TypeError(f"to_lora: initial must be lj.adapter(params_at_init) (a non-empty "
                    f"dict path -> LoraWeight), got {type(initial).__name__}")
  leaves, treedef = tree.flatten(params, is_leaf=is_node)
  by_path = dict(leaves)
  missing = sorted(set(p for p, x in initial.items() if isinstance(x, LoraWeight))
                   - set(by_path))
  if missing:
    raise ValueError(f"to_lora: paths of the initial adapter not in params: {missing[:6]}")
  out = [_convert_one(p, x, initial[p]) if isinstance(initial.get(p), LoraWeight) else x
         for p, x in leaves]
  return jax.tree_util.tree_unflatten(treedef, out)
