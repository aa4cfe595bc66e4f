"""combine_adapters: one adapter from a weighted mix of several.

The methods and their names are PEFT's ``add_weighted_adapter``'s; the merge
rules (TIES, DARE, magnitude pruning) are in ``merge_rules``. Each kernel is
one matrix per stacked layer: ``a`` as ``(S, in, r)`` and ``b`` as
``(S, r, out)`` with ``S`` the product of the stacked axes (1 when there are
none), so every stacked layer is combined on its own, as PEFT combines each
layer's module.
"""

import functools
import numbers
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import tree
from lora_jax._src.merge_rules import PRUNED as _PRUNED
from lora_jax._src.merge_rules import merge as _merge
from lora_jax._src.types import Params
from lora_jax._src.weight import LoraWeight, Trainable, is_node

# method -> (where the merge rule applies, the rule)
METHODS = {
    "linear": ("factors", "sum"),
    "cat": ("cat", None),
    "svd": ("delta", "sum"),
    "ties": ("factors", "ties"),
    "ties_svd": ("delta", "ties"),
    "dare_linear": ("factors", "dare_linear"),
    "dare_linear_svd": ("delta", "dare_linear"),
    "dare_ties": ("factors", "dare_ties"),
    "dare_ties_svd": ("delta", "dare_ties"),
    "magnitude_prune": ("factors", "magnitude_prune"),
    "magnitude_prune_svd": ("delta", "magnitude_prune"),
}
_SIGNS = ("total", "frequency")


# ------------------------------------------------------------ one kernel
def _matrices(lw: LoraWeight):
  """``a`` as (S, in, r) and ``b`` as (S, r, out), float32."""
  n_stack = lw.roles.count("s")
  s = int(np.prod(lw.a.shape[:n_stack], dtype=int))
  r = lw.rank
  a = jnp.asarray(lw.a, jnp.float32).reshape(s, -1, r)
  b = jnp.asarray(lw.b, jnp.float32).reshape(s, r, -1)
  return a, b


def _as_node(like: LoraWeight, a, b, scale: float) -> LoraWeight:
  n_stack = like.roles.count("s")
  stack, r = like.a.shape[:n_stack], a.shape[-1]
  a = a.reshape(stack + like.a.shape[n_stack:-1] + (r,)).astype(like.a.dtype)
  b = b.reshape(stack + (r,) + like.b.shape[n_stack + 1:]).astype(like.b.dtype)
  return like.replace(a=a, b=b, scale=scale)


def _keys(seed, path: str, part: int, n: int):
  """One DARE key per adapter, for one tensor (``part``) of one kernel."""
  key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
  key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
  key = jax.random.fold_in(key, part)
  return [jax.random.fold_in(key, i) for i in range(n)]


def _combine_kernel(path: str, lws: list[LoraWeight], weights, opts) -> LoraWeight:
  method, rank, density, sign_method, seed = opts
  where, rule = METHODS[method]
  mats = [_matrices(lw) for lw in lws]
  scales = [float(lw.scale) for lw in lws]
  if where == "delta":  # the kernel's size caps the rank
    rank = min(rank or max(lw.rank for lw in lws), mats[0][0].shape[1], mats[0][1].shape[2])
    a, b = _delta_svd(rule, mats, jnp.asarray(scales, jnp.float32),
                      jnp.asarray(weights, jnp.float32), density, sign_method,
                      _keys(seed, path, 2, len(lws)), rank)
    return _as_node(lws[0], a, b, 1.0)
  # Keep a scale all adapters share (then one adapter x 1.0 is itself, bit for
  # bit); otherwise fold every adapter's own scale into its factors.
  common = scales[0] if len(set(scales)) == 1 and scales[0] != 0 else 1.0
  ratio = [w * s / common for w, s in zip(weights, scales)]
  if where == "cat":
    a = jnp.concatenate([x * c for (x, _), c in zip(mats, ratio)], axis=-1)
    b = jnp.concatenate([y for _, y in mats], axis=-2)
    return _as_node(lws[0], a, b, common)
  # PEFT: sign·sqrt(|w·s|) on A, sqrt(|w·s|) on B
  wa = jnp.asarray([np.sign(c or 1.0) * np.sqrt(abs(c)) for c in ratio], jnp.float32)
  wb = jnp.asarray([np.sqrt(abs(c)) for c in ratio], jnp.float32)
  a = _merge(rule, jnp.stack([x for x, _ in mats]), wa, density, sign_method,
             _keys(seed, path, 0, len(lws)))
  b = _merge(rule, jnp.stack([y for _, y in mats]), wb, density, sign_method,
             _keys(seed, path, 1, len(lws)))
  return _as_node(lws[0], a, b, common)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 7))
def _delta_svd(rule, mats, scales, weights, density, sign_method, keys, rank: int):
  """Merge the ΔWᵢ by ``rule`` and keep the best rank-``rank`` factors,
  ``a = U``, ``b = Σ·Vᵀ`` (PEFT's arrangement, in lora_jax's (in, out)).

  One stacked layer at a time, so only N ΔW-sized buffers are alive.
  """
  def layer(xs):
    factors, i = xs
    d = jnp.stack([s * (x @ y) for (x, y), s in zip(factors, scales)])[:, None]
    d = _merge(rule, d, weights, density, sign_method,
               [jax.random.fold_in(k, i) for k in keys])[0]
    u, sv, vt = jnp.linalg.svd(d, full_matrices=False)
    return u[:, :rank], sv[:rank, None] * vt[:rank]
  return jax.lax.map(layer, (mats, jnp.arange(mats[0][0].shape[0])))


def _combine_trainable(path: str, nodes: list[Trainable], weights) -> Trainable:
  """A leaf trained in full: ``base + Σ wᵢ (valueᵢ - base)``."""
  if len(nodes) == 1 and weights[0] == 1.0:
    return nodes[0]
  if any(t.base is None for t in nodes):
    raise ValueError(
        f"combine_adapters: {path} is trained in full (Trainable, PEFT's "
        "modules_to_save) and an adapter here holds no base value to take a "
        "difference from. Pass the adapters as full params "
        "(lj.attach(base, adapter)) rather than lj.adapter(...) views.")
  base = nodes[0].base
  mixed = jnp.asarray(base, jnp.float32) + sum(
      w * (jnp.asarray(t.value, jnp.float32) - jnp.asarray(base, jnp.float32))
      for w, t in zip(weights, nodes))
  return Trainable(mixed.astype(jnp.asarray(nodes[0].value).dtype), base)


# ------------------------------------------------------------ checks
def _check_args(adapters, weights, method, rank, density, sign_method) -> list[float]:
  if isinstance(adapters, dict) or not isinstance(adapters, Sequence) or not adapters:
    raise TypeError(
        "combine_adapters: `adapters` must be a non-empty list of adapters "
        "(each lj.adapter(params) or LoRA params), got "
        f"{type(adapters).__name__}{' (empty)' if not adapters else ''}")
  if method not in METHODS:
    raise ValueError(f"combine_adapters: unknown method={method!r}; expected one of "
                     f"{sorted(METHODS)}")
  weights = _weights(weights)
  if len(weights) != len(adapters):
    raise ValueError(
        f"combine_adapters: got {len(weights)} weights for {len(adapters)} "
        "adapters; pass one weight per adapter, in the same order")
  _check_density(method, density)
  _check_rank(method, rank)
  if sign_method not in _SIGNS:
    raise ValueError(f"combine_adapters: majority_sign_method must be one of "
                     f"{_SIGNS}, got {sign_method!r}")
  return weights


def _check_density(method: str, density) -> None:
  rule = METHODS[method][1]
  if rule not in _PRUNED:
    if density is not None:
      pruned = sorted(m for m, (_, r) in METHODS.items() if r in _PRUNED)
      raise ValueError(f"combine_adapters: density= applies to {pruned}, "
                       f"not to method={method!r}")
    return
  if density is None:
    raise ValueError(f"combine_adapters(method={method!r}) needs density=: the "
                     "fraction of each tensor's entries kept, in (0, 1]")
  dare = rule.startswith("dare")
  ok = isinstance(density, numbers.Real) and (0 < density <= 1 if dare else 0 <= density <= 1)
  if not ok:
    raise ValueError(f"combine_adapters: density must be a number in "
                     f"{'(0' if dare else '[0'}, 1], got {density!r}"
                     + (" (DARE rescales by 1/density)" if dare else ""))


def _check_rank(method: str, rank) -> None:
  if rank is None:
    return
  if METHODS[method][0] != "delta":
    raise ValueError(
        f"combine_adapters: rank= applies to the SVD methods "
        f"{sorted(m for m, (w, _) in METHODS.items() if w == 'delta')}; "
        f"method={method!r} keeps the adapters' ranks ('cat': their sum)")
  if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"combine_adapters: rank must be a positive int, got {rank!r}")


def _weights(weights) -> list[float]:
  if isinstance(weights, jax.core.Tracer):
    raise TypeError("combine_adapters: weights must be concrete Python numbers "
                    "(they are applied once, outside jit), got a traced array")
  try:
    values = list(np.asarray(weights, dtype=np.float64).reshape(-1))
  except (TypeError, ValueError) as e:
    raise TypeError(f"combine_adapters: weights must be a list of numbers, got "
                    f"{weights!r}") from e
  if np.ndim(weights) != 1:
    raise ValueError(f"combine_adapters: weights must be a flat list (one number "
                     f"per adapter), got shape {np.shape(weights)}")
  return [float(v) for v in values]


def _nodes(adapter: Any, i: int) -> dict:
  leaves, _ = tree.flatten(adapter, is_leaf=is_node)
  nodes = {p: x for p, x in leaves if is_node(x)}
  if not nodes:
    raise ValueError(f"combine_adapters: adapter {i} holds no LoraWeight or Trainable "
                     "node; pass lj.adapter(params), LoRA params or a loaded adapter")
  return nodes


def _signature(x) -> tuple:
  """What must agree between adapters at one path: the kernel, not the rank."""
  if isinstance(x, Trainable):
    return ("Trainable", tuple(np.shape(x.value)))
  n = x.roles.count("s")
  stack, ins, outs = x.a.shape[:n], x.a.shape[n:-1], x.b.shape[n + 1:]
  w = None if x.w is None else tuple(np.shape(x.w))
  return ("LoraWeight", x.roles, tuple(stack), tuple(ins), tuple(outs), w)


def _describe(sig: tuple) -> str:
  if sig[0] == "Trainable":
    return f"a leaf trained in full of shape {sig[1]}"
  _, roles, stack, ins, outs, w = sig
  kernel = f"kernel {w}" if w is not None else f"kernel {stack}+{ins}->{outs}"
  return f"LoRA on a {kernel} with layout {roles!r}"


def _check_same_kernels(all_nodes: list[dict]) -> None:
  first = all_nodes[0]
  for i, nodes in enumerate(all_nodes[1:], 1):
    missing, extra = sorted(set(first) - set(nodes)), sorted(set(nodes) - set(first))
    if missing or extra:
      raise ValueError(
          f"combine_adapters: adapter {i} does not adapt the same kernels as adapter 0"
          + (f"; it lacks:{tree.some_paths(missing)}" if missing else "")
          + (f"\nit adds:{tree.some_paths(extra)}" if extra else "")
          + "\nCombine adapters made for one base with the same targets.")
    for path, x in nodes.items():
      mine, theirs = _signature(x), _signature(first[path])
      same = mine[:5] == theirs[:5] and (mine[-1] is None or theirs[-1] is None
                                         or mine[-1] == theirs[-1])
      if not same:
        raise ValueError(
            f"combine_adapters: adapter {i} at {path}: {_describe(mine)}, but "
            f"adapter 0 has {_describe(theirs)}; the adapters were made for "
            "different base models (or layouts)")
      _check_same_base(i, path, x, first[path])


def _base_value(x):
  return x.w if isinstance(x, LoraWeight) else x.base


def _check_same_base(i: int, path: str, x, first) -> None:
  """Full params carry their base kernels: those must be the same weights."""
  mine, theirs = _base_value(x), _base_value(first)
  if mine is None or theirs is None or mine is theirs:
    return
  if isinstance(mine, jax.core.Tracer) or isinstance(theirs, jax.core.Tracer):
    return  # under jit: shapes were checked, values cannot be
  if jnp.asarray(mine).dtype != jnp.asarray(theirs).dtype or not bool(
      jnp.array_equal(mine, theirs)):
    raise ValueError(
        f"combine_adapters: adapter {i} at {path}: its base kernel differs from "
        "adapter 0's (values or dtype); the adapters sit on different base "
        "weights. Combine adapters of one base, e.g. lj.adapter(...) views, "
        "and attach the result to that base.")


def _check_ranks(method: str, all_nodes: list[dict]) -> None:
  if METHODS[method][0] != "factors":
    return
  for path, x in all_nodes[0].items():
    if not isinstance(x, LoraWeight):
      continue
    for i, nodes in enumerate(all_nodes[1:], 1):
      if nodes[path].rank != x.rank:
        raise ValueError(
            f"combine_adapters(method={method!r}): adapter {i} has rank "
            f"{nodes[path].rank} at {path}, adapter 0 has rank {x.rank}. This "
            "method combines the factors entry by entry and needs equal ranks; "
            "use method='cat' (exact, rank = sum of ranks) or method='svd' "
            "(best rank-r approximation, rank=r).")


# ------------------------------------------------------------ public
def combine_adapters(adapters: Sequence[Any], weights: Sequence[float],
                     method: str = "linear", *, rank: int | None = None,
                     density: float | None = None,
                     majority_sign_method: str = "total",
                     seed: int | jax.Array = 0) -> Params:
  """One adapter from a weighted combination of several (PEFT's ``add_weighted_adapter``).

  Every adapter must adapt the same kernels of the same base (same paths,
  layouts and shapes); ranks and scales may differ per adapter and per
  kernel (rsLoRA, rank/alpha patterns). Each adapter's own ``scale`` is kept
  in the result, so one adapter with weight 1.0 gives back its own ΔW: bit
  for bit (the same factors and scale) for every method but the SVD ones,
  which agree to f32 rounding. PEFT gives the result a fresh config's scale
  instead, so its ΔW is √r times too large for rsLoRA adapters (PEFT issue
  #3761).

  Methods (ΔWᵢ = scaleᵢ · aᵢ @ bᵢ per kernel and stacked layer):

  * ``"cat"``: concatenated factors, rank Σ rᵢ; ΔW = Σ wᵢ ΔWᵢ exactly.
  * ``"svd"``: the best rank-``rank`` approximation of Σ wᵢ ΔWᵢ (truncated
    SVD; ``a`` = U, ``b`` = Σ·Vᵀ; ``rank`` defaults to the largest input rank
    and is capped by the kernel's size).
  * ``"linear"``: PEFT's: ``a = Σ sign(cᵢ)√|cᵢ| aᵢ``, ``b = Σ √|cᵢ| bᵢ`` with
    cᵢ = wᵢ · scaleᵢ (the shared scale stays on the node). Needs equal ranks.
    For one adapter ΔW = w₀ ΔW₀; for several it has cross terms aᵢ @ bⱼ and
    is *not* Σ wᵢ ΔWᵢ (use ``cat`` or ``svd`` for that).
  * ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``:
    PEFT's merge rules applied to the factors ``a`` and ``b`` separately, as
    PEFT does (equal ranks); the ``*_svd`` variants (``"ties_svd"``, ...)
    apply them to the ΔWᵢ and then truncate with SVD. ``density`` is the
    fraction kept; DARE's random masks come from ``seed`` (an int or a
    ``jax.random`` key), one per adapter, kernel and factor. As in PEFT, a
    single adapter is combined with ``"linear"`` whatever the method.

  Args:
    adapters: a list of adapters: ``lj.adapter(params)`` views, loaded
      checkpoints, or LoRA params (``LoraWeight`` nodes on a base).
    weights: one number per adapter (negative subtracts).
    method: one of the names above.
    rank: the rank of the result, for the SVD methods only.
    density: for the TIES / DARE / magnitude-prune methods, in (0, 1].
    majority_sign_method: ``"total"`` or ``"frequency"`` (TIES sign election).
    seed: the DARE masks' seed.

  Returns:
    An adapter with the structure of ``adapters[0]`` (its base kernels and
    other leaves, if it has them): ``attach``, ``merge``, ``save_adapter``
    take it as they take any adapter. Leaves trained in full (``Trainable``)
    become ``base + Σ wᵢ (valueᵢ - base)``.

  Raises:
    ValueError: weights of the wrong length, unequal ranks for a factor
      method, adapters for different kernels or bases (naming the adapter
      index and the path), bad ``density`` / ``rank`` / method.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> ka, kb, kc, kd = jax.random.split(jax.random.key(0), 4)
    >>> one = lambda ka, kb, r: {"kernel": lj.LoraWeight(
    ...     None, jax.random.normal(ka, (6, r)), jax.random.normal(kb, (r, 4)),
    ...     scale=0.5, roles="io")}
    >>> a1, a2 = one(ka, kb, 2), one(kc, kd, 3)
    >>> both = lj.combine_adapters([a1, a2], [0.7, 0.3], method="cat")
    >>> both["kernel"].rank
    5
    >>> want = 0.7 * lj.delta(a1["kernel"]) + 0.3 * lj.delta(a2["kernel"])
    >>> bool(jnp.allclose(lj.delta(both["kernel"]), want, atol=1e-5))
    True
  """
  weights = _check_args(adapters, weights, method, rank, density, majority_sign_method)
  all_nodes = [_nodes(ad, i) for i, ad in enumerate(adapters)]
  _check_same_kernels(all_nodes)
  if len(adapters) == 1 and METHODS[method][1] in _PRUNED:
    method = "linear"  # PEFT: "if there is only one adapter, we can only use linear merging"
    density = None
  _check_ranks(method, all_nodes)
  opts = (method, rank, density, majority_sign_method, seed)
  combined = {}
  for path, x in all_nodes[0].items():
    nodes = [n[path] for n in all_nodes]
    combined[path] = (_combine_kernel(path, nodes, weights, opts)
                      if isinstance(x, LoraWeight) else _combine_trainable(path, nodes, weights))
  leaves, treedef = tree.flatten(adapters[0], is_leaf=is_node)
  return jax.tree_util.tree_unflatten(
      treedef, [combined.get(p, x) if is_node(x) else x for p, x in leaves])
