"""Small operations on a lazy kernel's factors, shared by the rules and the
stack strategies: which stack member each example uses, ``a`` laid out as a
kernel, and the contraction of a rank axis with ``b``."""

import jax
import jax.numpy as jnp

from lora_jax._src import explicit
from lora_jax._src.interpreter import ADAPTER, _Lazy


def not_rows(v: _Lazy, found: str) -> ValueError:
  return ValueError(
      f"lora: {v.path} holds a stack of adapters, used with adapter_ids (one per "
      f"example), but {found}: the batch must be the leading axis of the input "
      "that meets the kernel, so row i can use adapter ids[i]. Keep the batch axis "
      "first, or fold only the axes after it into it (x.reshape(B * S, d)); do not "
      "fold it behind another axis (a time-major (S, B, d) -> (S * B, d)).")


def row_ids(ctx, v: _Lazy, rows: int):
  """Each example's stack index (clipped into range) and scale (see ``_rows``)."""
  ids = ctx.adapter_ids
  if ids.shape[0] != rows:
    raise not_rows(v, f"adapter_ids has {ids.shape[0]} entries and the input's "
                    f"leading axis has {rows}")
  n = v.a.shape[v.a_dims.index(ADAPTER)]
  k = jnp.clip(ids, 0, n - 1)
  scale = jnp.where(ids == -1, 0.0, jnp.where((ids >= 0) & (ids < n),
                                              explicit.take(v.scale, k, mode="clip"), jnp.nan))
  return k, scale


def a_as_kernel(v: _Lazy, out_axis: int):
  """``a`` laid out like V with the rank in ``out_axis``'s place, or None."""
  b_axes = [d for d in v.b_dims if isinstance(d, int)]
  a_axes = sorted(d for d in v.a_dims if isinstance(d, int))
  if b_axes != [out_axis] or a_axes != [d for d in range(v.ndim) if d != out_axis]:
    return None
  perm = [v.a_dims.index(None if d == out_axis else d) for d in range(v.ndim)]
  return jnp.transpose(v.a, perm)


def rank_to(z, axis, v: _Lazy):
  """Contract ``z``'s rank axis (at ``axis``) with ``b`` (r, out), in place."""
  y = jnp.tensordot(z, v.b, axes=([axis], [v.b_dims.index(None)]))
  return jnp.moveaxis(y, -1, axis)


def stacked_gather_a(v: _Lazy, out_axis: int, idx, eqn, ctx):
  """Rows of each example's ``a``: one gather over (adapter, row) indices."""
  p, dn = eqn.params, eqn.params["dimension_numbers"]
  if idx.ndim < 2 or 0 in dn.offset_dims:
    raise not_rows(v, f"the lookup's indices have shape {idx.shape}")
  k, scale = row_ids(ctx, v, idx.shape[0])  # no per-row copy of a (vocab-sized)
  fb = jnp.take(v.b, k, axis=v.b_dims.index(ADAPTER), mode="clip")
  n_pos = v.a_dims.index(ADAPTER)
  perm = [n_pos] + [v.a_dims.index(None if d == out_axis else d) for d in range(v.ndim)]
  a_kernel = jnp.transpose(v.a, perm)  # (N,) + V's axes, rank at out_axis
  k = k.astype(idx.dtype)
  k = jnp.broadcast_to(k.reshape((-1,) + (1,) * (idx.ndim - 1)), idx.shape[:-1] + (1,))
  sizes = list(p["slice_sizes"])
  sizes[out_axis] = v.a.shape[v.a_dims.index(None)]
  gdn = jax.lax.GatherDimensionNumbers(
      offset_dims=dn.offset_dims,
      collapsed_slice_dims=(0,) + tuple(d + 1 for d in dn.collapsed_slice_dims),
      start_index_map=(0,) + tuple(d + 1 for d in dn.start_index_map))
  params = dict(p, dimension_numbers=gdn, slice_sizes=(1,) + tuple(sizes))
  z = eqn.primitive.bind(a_kernel, jnp.concatenate([k, idx], -1), **params)
  return z, fb, scale
