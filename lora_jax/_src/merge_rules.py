"""PEFT's model-merging rules (``peft/utils/merge_utils.py``) in jax.numpy.

Task arithmetic, magnitude pruning, TIES (trim, elect sign, disjoint merge)
and DARE (random drop, rescale by 1/density), on a stack of N adapters'
tensors ``(N, S, ...)``; pruning counts and top-k work per stacked layer
``S``, as PEFT works per module.
"""

import functools

import jax
import jax.numpy as jnp

PRUNED = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def _magnitude_prune(t, density: float):
  """Keep the ``int(density · numel)`` largest |entries| of each layer (PEFT)."""
  if density >= 1:
    return t
  n, s = t.shape[:2]
  flat = t.reshape(n, s, -1)
  k = int(density * flat.shape[-1])
  if k == 0:
    return jnp.zeros_like(t)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  mask = jnp.zeros(flat.shape, bool)
  mask = jax.vmap(jax.vmap(lambda m, i: m.at[i].set(True)))(mask, idx)
  return (flat * mask).reshape(t.shape)


def dare_mask(key: jax.Array, shape, density: float) -> jax.Array:
  """DARE's Bernoulli(density) keep-mask for one adapter's tensor."""
  return jax.random.bernoulli(key, density, shape)


def _random_prune(t, density: float, keys):
  """DARE: drop entries at random, rescale the survivors by 1/density."""
  if density >= 1:
    return t
  masks = jnp.stack([dare_mask(k, t.shape[1:], density) for k in keys])
  return t * masks / density


def _weighted(t, weights):
  return t * weights.reshape((-1,) + (1,) * (t.ndim - 1))


def _majority_sign_mask(t, method: str):
  sign = jnp.sign(t)
  magnitude = t.sum(0) if method == "total" else sign.sum(0)
  return sign == jnp.where(magnitude >= 0, 1.0, -1.0)[None]


def _disjoint_merge(weighted, mask):
  kept = (weighted * mask).sum(0)
  return kept / jnp.maximum(mask.sum(0).astype(weighted.dtype), 1.0)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def merge(rule: str, t, weights, density, sign_method, keys):
  """Merge ``t``: (N, S, ...) (N adapters, S stacked layers) with ``weights``
  (N,) by ``rule``: "sum", "magnitude_prune", "ties", "dare_linear" or
  "dare_ties"; ``keys``: one DARE key per adapter."""
  if rule == "sum":
    return _weighted(t, weights).sum(0)
  if rule == "magnitude_prune":
    return _weighted(_magnitude_prune(t, density), weights).sum(0)
  if rule == "dare_linear":
    return _weighted(_random_prune(t, density, keys), weights).sum(0)
  t = _magnitude_prune(t, density) if rule == "ties" else _random_prune(t, density, keys)
  mask = _majority_sign_mask(t, sign_method)
  return _disjoint_merge(_weighted(t, weights), mask)
