"""lora_init: put LoraWeight nodes where the config selects kernels."""

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import layout, sharding, tree
from lora_jax._src.config import LoraConfig, layer_index
from lora_jax._src.inits import is_base_changing, principal_factors
from lora_jax._src.quant import abstract_quantized, is_quantized
from lora_jax._src.types import Params
from lora_jax._src.weight import LoraWeight, Trainable, factor_shapes, is_node, max_rank


def _init_a(key, shape, roles: str, rank: int, init: str, dtype):
  fan_in = int(np.prod([d for d, r in zip(shape, roles) if r == "i"]))
  a_shape, _ = factor_shapes(shape, roles, rank)
  if init == "kaiming":  # torch kaiming_uniform_(a=sqrt(5)) on a (r, fan_in) weight
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
  else:  # PEFT's "gaussian": std 1/r
    a = jax.random.normal(key, a_shape, jnp.float32) / rank
  return a.astype(dtype)


def _layer_mask(path: str, w, roles: str, layers):
  """``True`` (every layer), ``False`` (skip the kernel) or a 0/1 mask over the
  first stacked axis, for ``LoraConfig.layers_to_transform``."""
  if layers is None:
    return True
  if roles.startswith("s"):
    if max(layers) >= w.shape[0]:
      raise ValueError(
          f"lora_init: layers_to_transform={list(layers)} but {path} stacks "
          f"{w.shape[0]} layers (shape {tuple(w.shape)}, roles {roles!r}); indexes "
          f"must be < {w.shape[0]}")
    return jnp.asarray(np.isin(np.arange(w.shape[0]), layers))
  index = layer_index(path)
  return index is not None and index in layers


def _roles(path: str, leaf, config: LoraConfig, inferred: dict,
           why: dict | None = None) -> str:
  if is_quantized(leaf):
    return leaf.roles  # fixed when it was quantized
  roles = config.layout_for(path) or inferred.get(path)
  if roles is None and np.ndim(leaf) == 2:
    roles = "io"
  if roles is None and why is not None:  # a trace was given and did not settle it
    raise ValueError(
        f"lora_init: the trace could not tell the layout of {path}: "
        f"{why.get(path, 'it never reached the traced model')}. Name it in "
        "LoraConfig(layouts={regex: roles}) with one role per axis: 's' "
        "stacked (one adapter per entry), 'i' input, 'o' output, e.g. 'sio', "
        "'ioo', 'iio', 'iiio'.")
  if roles is None:
    raise ValueError(
        f"lora_init: cannot tell the layout of {path} with shape "
        f"{tuple(leaf.shape)}: (layers, in, out), (in, heads, head_dim), "
        "(heads, head_dim, out) and conv kernels look alike. Pass "
        "`lora_init(..., trace=lambda p: model.apply(p, x))` to read it from "
        "the model, or LoraConfig(layouts={regex: roles}) with roles such as "
        "'sio', 'ioo', 'iio', 'iiio'.")
  if len(roles) != np.ndim(leaf):
    raise ValueError(f"lora_init: layout {roles!r} for {path} has {len(roles)} "
                     f"axes but the kernel has shape {tuple(leaf.shape)}")
  return roles


def _check_leaf(path: str, leaf) -> None:
  if isinstance(leaf, (LoraWeight, Trainable)):
    raise ValueError(f"lora_init: {path} already holds a {type(leaf).__name__}; "
                     "call lora_init on plain params (see lora_jax.merge / base)")
  if not hasattr(leaf, "shape") or np.ndim(leaf) < 2:
    raise ValueError(
        f"lora_init: target {path} has shape {tuple(np.shape(leaf))}; LoRA needs "
        "a kernel with at least 2 axes (in, out). Narrow LoraConfig.targets "
        "(biases and norm scales are 1-D; use `trainable=` to train them).")
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise ValueError(f"lora_init: target {path} has dtype {leaf.dtype}; "
                     "expected a floating-point kernel")


def lora_init(key: jax.Array, params: Params, config: LoraConfig, *,
              trace: Callable[[Params], Any] | None = None) -> Params:
  """Replace each selected kernel by a ``LoraWeight(w, a, b)``.

  ``b`` is zero, so under ``lora(fn)`` every adapted product is exactly
  ``x·W`` (the LoRA branch adds exact zeros) and the model's output equals
  the base model's to floating-point rounding: usually bit for bit, within
  a few ulps of the output's scale where XLA rounds the surrounding ops
  differently (it may fuse a base product with the next add into one FMA
  only while no branch is added, e.g. a size-1 contraction before a bias or
  BatchNorm; eagerly, ops that ``jax.numpy`` runs as one compiled call, such
  as ``var``, run one by one). Leaves selected by ``config.trainable``
  become ``Trainable(value, base)``.

  With ``init="pissa"`` / ``"pissa_niter_K"`` / ``"olora"`` ``a`` and ``b``
  start at the kernel's principal part and ``w`` becomes ``W - s·a@b`` (the
  output is then equal to float32 rounding, not bit for bit); keep
  ``lj.adapter(params)`` from right here to convert later (``lj.to_lora``).
  With ``config.layers_to_transform`` only those layers are adapted: other
  kernels stay plain, and a stacked kernel's other layers hold ``a = b = 0``.

  Args:
    key: a PRNG key for the ``a`` factors.
    params: any pytree of arrays: a Flax Linen params dict, an NNX ``State``,
      a plain dict.
    config: a ``LoraConfig``.
    trace: optional function of ``params`` that runs the model, e.g.
      ``lambda p: model.apply(p, x)``. It is traced abstractly (no FLOPs) to
      read every kernel's axis roles (stacked / in / out) from the matmul,
      conv or gather that consumes it. Needed for kernels of 3+ axes unless
      ``config.layouts`` names them.

  Returns:
    The params with LoraWeight / Trainable nodes.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
    >>> lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=2))
    >>> lp["dense"]["kernel"].a.shape, lp["dense"]["kernel"].b.shape
    ((16, 2), (2, 8))
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"lora_init: config must be a LoraConfig, got {type(config).__name__}")
  leaves, treedef = tree.flatten(params, is_leaf=is_node)
  paths = [p for p, _ in leaves]
  targets = [k for k, (p, x) in enumerate(leaves) if config.selects(p, x)]
  trained = [k for k, (p, x) in enumerate(leaves) if config.trains(p, x)]
  if not targets:
    raise ValueError(
        f"lora_init: targets={config.targets!r} matched no leaf. Paths are "
        f"'/'-joined keys matched with re.fullmatch; some that exist:"
        f"{tree.some_paths(paths)}")
  both = sorted(set(targets) & set(trained))
  if both:
    raise ValueError("lora_init: these leaves are selected both as LoRA targets "
                     f"and as trainable: {[paths[k] for k in both]}")
  for k in targets:
    _check_leaf(*leaves[k])
  for k in trained:
    if is_quantized(leaves[k][1]):
      raise ValueError(
          f"lora_init: {paths[k]} is a QuantizedWeight and cannot be trained in "
          "full (its codes are integers). Drop it from LoraConfig.trainable, give "
          "it an adapter (targets), or keep it out of QuantConfig.targets.")
  inferred, why = {}, None
  if trace is not None:
    why = {}
    inferred = layout.infer_roles(trace, abstract_quantized(params),
                                  [paths[k] for k in targets], why)

  out = [x for _, x in leaves]
  keys = jax.random.split(key, len(targets))
  adapted, too_large = 0, []
  for key_k, k in zip(keys, targets):
    path, w = leaves[k]
    roles = _roles(path, w, config, inferred, why)
    mask = _layer_mask(path, w, roles, config.layers_to_transform)
    if mask is False:
      continue
    adapted += 1
    rank = config.rank_for(path)
    if rank > max_rank(w.shape, roles):
      too_large.append((path, rank, tuple(w.shape), roles, max_rank(w.shape, roles)))
      continue
    dtype = config.dtype or w.dtype
    scale = config.scale_for(path)
    if is_base_changing(config.init):
      if is_quantized(w):
        raise ValueError(
            f"lora_init: init={config.init!r} rewrites {path} as W - s·A@B, but it is "
            "quantized; initialize PiSSA / OLoRA on the float kernels, then quantize "
            "the residual base (as PEFT advises)")
      w_res, a, b = principal_factors(key_k, w, roles, rank, scale, config.init)
      if mask is not True:  # the layers outside layers_to_transform keep W, A = B = 0
        w_res = jnp.where(mask.reshape((-1,) + (1,) * (w.ndim - 1)), w_res, w)
      concrete = isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer)
      w = jax.device_put(w_res, w.sharding) if concrete else w_res  # keep w's placement
      a, b = a.astype(dtype), b.astype(dtype)
    else:
      a = _init_a(key_k, w.shape, roles, rank, config.init, dtype)
      b = jnp.zeros(factor_shapes(w.shape, roles, rank)[1], dtype)
    if mask is not True:
      a = a * mask.reshape((-1,) + (1,) * (a.ndim - 1)).astype(dtype)
      b = b * mask.reshape((-1,) + (1,) * (b.ndim - 1)).astype(dtype)
    a, b = sharding.place_factors(w, a, b, roles)
    out[k] = LoraWeight(w, a, b, scale=scale, roles=roles, dropout=float(config.dropout))
    if config.dora:
      out[k] = out[k].replace(m=_magnitude(path, out[k]).astype(dtype))
  if too_large:
    raise ValueError(_rank_error(too_large))
  if not adapted:
    raise ValueError(
        f"lora_init: layers_to_transform={list(config.layers_to_transform)} left no "
        f"target: none of the {len(targets)} selected kernels is stacked (roles "
        "starting with 's') or has a layer index in its path ('N' or 'name_N') in "
        f"that list; selected: {[paths[k] for k in targets][:6]}")
  for k in trained:
    out[k] = Trainable(out[k], out[k])
  return jax.tree_util.tree_unflatten(treedef, out)


def _rank_error(too_large) -> str:
  """One message for every kernel whose rank exceeds what its shape allows."""
  lines = [f"  rank {rank} for {path} is larger than the kernel allows: shape {shape} "
           f"with roles {roles!r} has rank at most {limit}"
           for path, rank, shape, roles, limit in too_large]
  fix = {re.escape(path): limit for path, _, _, _, limit in too_large}
  return (f"lora_init: the rank is too large for {len(too_large)} kernel(s) (at most the "
          "smaller of the kernel's flattened input and output sizes):\n" + "\n".join(lines)
          + "\nLower LoraConfig.rank, or give these kernels their own rank with "
          f"LoraConfig(rank_pattern={fix!r}) (first full match wins), or leave them out "
          "with exclude=.")


def _magnitude(path: str, lw: LoraWeight):
  """DoRA's ``m`` at init: ``‖W + s·A@B‖_c`` (``‖W‖_c`` as B = 0; with PiSSA /
  OLoRA the original kernel's norm), so that ``W'`` is the original kernel."""
  from lora_jax._src import dora
  if is_quantized(lw.w):
    raise ValueError(
        f"lora_init: dora=True for {path}, but it is quantized; DoRA's column norm "
        "needs the float kernel. Use dora=False on quantized kernels, or "
        "dequantize them (lora_jax.dequantize) first")
  return dora.column_norm(lw)
