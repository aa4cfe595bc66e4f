"""Hugging Face PEFT LoRA adapters <-> lora_jax params.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with, for each adapted torch module ``m``::

  base_model.model.{m}.lora_A.weight          (r, in)     Linear
  base_model.model.{m}.lora_B.weight          (out, r)
  base_model.model.{m}.lora_embedding_A       (r, vocab)  Embedding
  base_model.model.{m}.lora_embedding_B       (dim, r)
  base_model.model.{m}.lora_A.weight          (r, I, *k)  Conv (lora_B: (O, r, 1, ...))
  base_model.model.{m}.{param}                modules_to_save (full tensors)

(PEFT 0.21 writes no adapter name into the keys; ``lora_A.default.weight``
and keys without the ``base_model.model.`` prefix are read too.) The scale
is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with per-module
``rank_pattern`` / ``alpha_pattern`` matched as PEFT does: the first pattern
``p`` for which ``re.match(rf"(.*\\.)?({p})$", module)`` holds.

The torch module ``m`` of a Flax kernel comes from the same name map as the
weights (``lora_jax.interop.torch``): the map sends ``.../q_proj/kernel`` to
``model.layers.0.self_attn.q_proj.weight``, so ``m`` is that key without
``.weight``. The factors convert as

  ``a = lora_A.T`` reshaped to ``in_axes + (r,)``,
  ``b = lora_B.T`` reshaped to ``(r,) + out_axes``,

for 2-D kernels, DenseGeneral kernels (the in / out axes are the flattened
torch ``in`` / ``out``) and stacked kernels (a name-map key holding
``{layer}``: per-layer tensors stacked on the leading axis).

The conversion is a pair of pure functions, ``unpack_peft`` /
``pack_peft``, over ``(config dict, {key: array})``; ``load_peft_adapter`` /
``save_peft_adapter`` add the file I/O. Unlike PEFT, unknown, missing and
mis-shaped keys are errors (one ``ConversionError`` lists them all), and
PEFT features lora_jax cannot express (DoRA, LoRA biases, ...) are refused
by name.

This module imports torch / safetensors only inside the I/O functions.
"""

import collections
import json
import math
import os
import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import layout, tree
from lora_jax._src.merge import base as _base
from lora_jax._src.weight import LoraWeight, Trainable, is_node
from lora_jax.interop import torch as _interop
from lora_jax.interop.torch import LAYER, ConversionError, NameMap

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."

# PEFT config entries that change what an adapter computes and that lora_jax
# cannot express: {key: (is-set predicate, why)}.
_REFUSED = {
    "use_dora": (bool, "DoRA (weight-decomposed LoRA) is not supported"),
    "lora_bias": (bool, "LoRA biases on lora_B are not supported"),
    "layer_replication": (bool, "layer replication is not supported"),
    "target_parameters": (bool, "LoRA on nn.Parameter targets is not supported"),
    "trainable_token_indices": (bool, "trainable tokens are not supported"),
    "use_qalora": (bool, "QALoRA is not supported"),
    "alora_invocation_tokens": (bool, "activated LoRA (aLoRA) is not supported"),
    "arrow_config": (bool, "Arrow routing is not supported"),
    "use_bdlora": (bool, "block-diagonal LoRA is not supported"),
    "kasa_config": (bool, "KaSA is not supported"),
    "monteclora_config": (bool, "MonteCLoRA is not supported"),
    "velora_config": (bool, "VeLoRA is not supported"),
    "megatron_config": (bool, "Megatron parallel layers are not supported"),
}
# init_lora_weights values whose adapters assume a modified base model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight"
                  r"|(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)"
                  r"(?:\.[^.]+)?")


# --- PEFT's matching rules (pure re-implementations) ---------------------------

def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
  """A ``rank_pattern`` / ``alpha_pattern`` lookup exactly as PEFT does it.

  The first key ``p`` (in dict order) with ``re.match(rf"(.*\\.)?({p})$",
  module)`` wins (``peft.utils.other.get_pattern_key``).

  Example:
    >>> pattern_value({"down_proj": 8}, "model.layers.0.mlp.down_proj", 4)
    8
    >>> pattern_value({"layers.1.self_attn.q_proj": 2}, "model.layers.0.self_attn.q_proj", 4)
    4
  """
  for key in patterns or {}:
    if re.match(rf"(.*\.)?({key})$", module):
      return patterns[key]
  return default


def is_targeted(config: Mapping[str, Any], module: str) -> bool:
  """Whether a PEFT LoRA config targets the torch module ``module``.

  Follows ``peft.tuners.tuners_utils.check_target_module_exists``:
  ``exclude_modules``, ``modules_to_save``, ``target_modules`` (a regex
  fullmatch, or a list matched by exact name or ``.name`` suffix) and
  ``layers_to_transform`` / ``layers_pattern``.

  Example:
    >>> is_targeted({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj")
    True
    >>> is_targeted({"target_modules": ["q_proj"], "layers_to_transform": [1]},
    ...             "model.layers.0.self_attn.q_proj")
    False
  """
  exclude = config.get("exclude_modules")
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, module):
        return False
    elif module in exclude or any(module.endswith(f".{e}") for e in exclude):
      return False
  for m in config.get("modules_to_save") or ():
    if re.match(rf"(^|.*\.){m}($|\..*)", module):
      return False
  targets = config.get("target_modules")
  if targets is None:
    return False
  if isinstance(targets, str):
    return re.fullmatch(targets, module) is not None
  if module in targets:
    return True
  found = any(module.endswith(f".{t}") for t in targets)
  indexes = config.get("layers_to_transform")
  if found and indexes is not None and (indexes != [] if isinstance(indexes, list) else True):
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
      match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
      for p in [pattern] if isinstance(pattern, str) else pattern:
        match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
        if match is not None:
          break
    if match is None:
      return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes
  return found


def check_config(config: Mapping[str, Any]) -> None:
  """Refuse PEFT configs that lora_jax cannot load faithfully.

  Raises:
    ValueError: naming every unsupported feature that is set.

  Example:
    >>> check_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16})
    >>> check_config({"peft_type": "LORA", "use_dora": True})
    Traceback (most recent call last):
    ...
    ValueError: PEFT adapter uses features lora_jax does not support:
      use_dora=True: DoRA (weight-decomposed LoRA) is not supported
  """
  problems = []
  kind = config.get("peft_type", "LORA")
  if kind != "LORA":
    problems.append(f"peft_type={kind!r}: only LoRA adapters (peft_type 'LORA') are supported")
  for key, (is_set, why) in _REFUSED.items():
    value = config.get(key)
    if value is not None and is_set(value):
      problems.append(f"{key}={value!r}: {why}")
  if config.get("bias", "none") != "none":
    problems.append(f"bias={config['bias']!r}: only bias='none' is supported "
                    "(train biases with LoraConfig(trainable=...) instead)")
  init = config.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    problems.append(
        f"init_lora_weights={init!r}: this adapter assumes a modified base model; "
        "convert it in PEFT with save_pretrained(..., "
        "path_initial_model_for_weight_conversion=...) first")
  if problems:
    raise ValueError("PEFT adapter uses features lora_jax does not support:\n  "
                     + "\n  ".join(problems))


# --- layouts ----------------------------------------------------------------------

def _is_io(roles: str) -> bool:
  return re.fullmatch(r"i+o+", roles) is not None


def _linear_split(shape: tuple, n_in: int, n_out: int) -> list[int]:
  """Every k with prod(shape[:k]) == n_in and prod(shape[k:]) == n_out."""
  return [k for k in range(1, len(shape))
          if math.prod(shape[:k]) == n_in and math.prod(shape[k:]) == n_out]


def _scale(alpha: float, r: int, rslora: bool) -> float:
  return alpha / (math.sqrt(r) if rslora else r)


# --- torch -> lora_jax ------------------------------------------------------------

def _parse_keys(tensors: Mapping[str, Any]):
  """``{module: {"A": key, "B": key}}``, embedding modules, and other keys."""
  groups: dict[str, dict[str, str]] = collections.defaultdict(dict)
  embedding, other = set(), []
  for key in tensors:
    bare = key.removeprefix(PREFIX)
    m = _KEY.fullmatch(bare)
    if m is None:
      other.append(key)
      continue
    module = m.group("module") or m.group("emodule")
    kind = (m.group("kind") or m.group("ekind"))[-1]
    if m.group("emodule"):
      embedding.add(module)
    if kind in groups[module]:
      other.append(key)  # a second adapter name, or both key forms
      continue
    groups[module][kind] = key
  return dict(groups), embedding, other


def _modules(base_params, name_map):
  """``{module: (flax_path, layer)}`` for every kernel / embedding weight."""
  out = {}
  leaves = dict(tree.flatten(base_params)[0])
  for key, (path, layer) in _interop.torch_index(base_params, name_map).items():
    per = np.ndim(leaves[path]) - (layer is not None)
    if key.endswith(".weight") and per >= 2:
      out[key[:-len(".weight")]] = (path, layer)
  return out


def _factors(A: np.ndarray, B: np.ndarray, shape: tuple, roles: str | None):
  """One layer's ``(a, b, roles)`` from PEFT's A and B, or an error string."""
  r = A.shape[0]
  if B.ndim < 2 or B.shape[1] != r:
    return f"lora_B {B.shape} does not have lora_A's rank {r} on axis 1"
  if A.ndim == 2:  # Linear / Embedding
    n_in, n_out = A.shape[1], B.shape[0]
    if roles is not None:
      ks = [roles.count("i")] if (_is_io(roles) and math.prod(shape[:roles.count("i")]) == n_in
                                  and math.prod(shape[roles.count("i"):]) == n_out) else []
    else:
      ks = _linear_split(shape, n_in, n_out)
    if not ks:
      return (f"lora_A {A.shape} / lora_B {B.shape} (in={n_in}, out={n_out}) do not fit the "
              f"kernel of shape {shape}" + (f" with roles {roles!r}" if roles else ""))
    if len(ks) > 1:
      return (f"the kernel of shape {shape} splits into in={n_in}, out={n_out} in "
              f"several ways; pass trace= (or params with LoraWeight nodes) to fix its roles")
    k = ks[0]
    return A.T.reshape(shape[:k] + (r,)), B.T.reshape((r,) + shape[k:]), "i" * k + "o" * (len(shape) - k)
  # Conv: A (r, I, *k), B (O, r, 1, ...); Flax kernel (*k, I, O)
  nd = A.ndim
  conv_shape = tuple(A.shape[2:]) + (A.shape[1], B.shape[0])
  if (conv_shape != shape or B.ndim != nd or any(d != 1 for d in B.shape[2:])
      or (roles is not None and roles != "i" * (nd - 1) + "o")):
    return f"conv lora_A {A.shape} / lora_B {B.shape} do not fit the kernel of shape {shape}"
  a = np.transpose(A, tuple(range(2, nd)) + (1, 0))
  return a, B.reshape(B.shape[0], r).T, "i" * (nd - 1) + "o"


def _stack(parts: list, n_layers: int, per_shape: tuple):
  """Stack per-layer ``(a, b, roles, scale)``; pad ranks, fold scale ratios into b."""
  present = [p for p in parts if p is not None]
  rank = max(p[0].shape[-1] for p in present)
  roles = present[0][2]
  scale = collections.Counter(p[3] for p in present).most_common(1)[0][0]
  n_in = roles.count("i")
  a_all = np.zeros((n_layers,) + per_shape[:n_in] + (rank,), np.float32)
  b_all = np.zeros((n_layers, rank) + per_shape[n_in:], np.float32)
  for layer, p in enumerate(parts):
    if p is None:
      continue  # a layer PEFT does not adapt: zero factors
    a, b, _, s = p
    r = a.shape[-1]
    a_all[layer, ..., :r] = a
    b_all[layer, :r] = b * (s / scale)
  return a_all, b_all, "s" + roles, scale


def unpack_peft(config: Mapping[str, Any], tensors: Mapping[str, Any], params: Any,
                name_map: NameMap, *, trace: Callable[[Any], Any] | None = None,
                dtype: Any = None) -> Any:
  """A PEFT adapter (config dict + tensors) on lora_jax params.

  Args:
    config: the ``adapter_config.json`` dict.
    tensors: ``{key: array}`` as in ``adapter_model.safetensors``.
    params: the base params (plain, or with lora_jax nodes: adapters already
      there are replaced, their roles are used).
    name_map: Flax path -> torch key of the *base* model (see
      ``lora_jax.interop.torch``).
    trace: optional ``lambda p: model.apply(p, x)``; only needed when a 3+-D
      kernel's shape splits into PEFT's ``(in, out)`` in several ways (size-1
      axes).
    dtype: dtype of the factors; the kernel's by default.

  Returns:
    params with ``LoraWeight`` nodes (and ``Trainable`` for modules_to_save).

  Raises:
    ValueError: unsupported PEFT features (by name).
    ConversionError: unknown / missing / mis-shaped keys and rank mismatches, all at once.

  Example:
    >>> import numpy as np
    >>> params = {"fc": {"kernel": np.zeros((3, 2), np.float32)}}
    >>> cfg = {"r": 1, "lora_alpha": 2, "target_modules": ["fc"]}
    >>> t = {"base_model.model.fc.lora_A.weight": np.ones((1, 3), np.float32),
    ...      "base_model.model.fc.lora_B.weight": np.ones((2, 1), np.float32)}
    >>> lw = unpack_peft(cfg, t, params, [(r"fc/kernel", "fc.weight")])["fc"]["kernel"]
    >>> lw.a.shape, lw.b.shape, lw.scale
    ((3, 1), (1, 2), 2.0)
  """
  check_config(config)
  base = _base(params)
  leaves, treedef = tree.flatten(base)
  by_path = dict(leaves)
  known_roles = {p: x.roles for p, x in tree.flatten(params, is_leaf=is_node)[0]
                 if isinstance(x, LoraWeight)}
  modules = _modules(base, name_map)
  index = _interop.torch_index(base, name_map)
  groups, embedding, other = _parse_keys(tensors)
  rslora = bool(config.get("use_rslora", False))
  r0, alpha0 = int(config.get("r", 8)), config.get("lora_alpha", 8)
  unexpected, missing, mismatched, problems = [], [], [], []
  saved = [m.removeprefix(PREFIX) for m in config.get("modules_to_save") or ()]

  # modules_to_save: full tensors of whole modules -> Trainable leaves
  trained: dict[str, dict[int | None, np.ndarray]] = collections.defaultdict(dict)
  for key in other:
    bare = key.removeprefix(PREFIX)
    module = bare.rsplit(".", 1)[0]
    if bare in index and any(module.endswith(m) for m in saved):
      path, layer = index[bare]
      trained[path][layer] = key
    else:
      unexpected.append(key)

  # which modules PEFT would adapt, and which the file adapts
  per_path: dict[str, dict[int | None, str]] = collections.defaultdict(dict)
  for module, kinds in groups.items():
    if module not in modules:
      unexpected += sorted(kinds.values())
      continue
    if not is_targeted(config, module):
      problems.append(f"{module}: has LoRA tensors but target_modules="
                      f"{config.get('target_modules')!r} does not select it")
      continue
    for kind in "AB":
      if kind not in kinds:
        other_kind = "lora_embedding_" if module in embedding else "lora_"
        missing.append((modules[module][0], f"{module}.{other_kind}{kind}"))
    path, layer = modules[module]
    per_path[path][layer] = module
  for module, (path, layer) in modules.items():
    if module not in groups and is_targeted(config, module):
      missing.append((path, f"{module}.lora_A / lora_B (targeted by target_modules)"))

  inferred = {}
  if trace is not None:
    inferred = layout.infer_roles(trace, base, sorted(per_path))
  out = dict(leaves)
  for path, layers in per_path.items():
    w = by_path[path]
    stacked = next(iter(layers)) is not None
    roles = known_roles.get(path) or inferred.get(path)
    if roles is not None and stacked:
      if not roles.startswith("s") or "s" in roles[1:]:
        problems.append(f"{path}: roles {roles!r} do not fit a stacked ({LAYER}) torch key")
        continue
      roles = roles[1:]
    elif roles is not None and "s" in roles:
      problems.append(f"{path}: roles {roles!r} have a stacked axis but the name map "
                      f"key has no {LAYER}")
      continue
    shape = tuple(w.shape[1:] if stacked else w.shape)
    parts = [None] * (w.shape[0] if stacked else 1)
    for layer, module in layers.items():
      kinds = groups[module]
      if set(kinds) != {"A", "B"}:
        continue
      A = _interop.to_numpy(tensors[kinds["A"]])
      B = _interop.to_numpy(tensors[kinds["B"]])
      r = int(pattern_value(config.get("rank_pattern"), module, r0))
      alpha = float(pattern_value(config.get("alpha_pattern"), module, alpha0))
      if A.shape[0] != r:
        problems.append(f"{kinds['A']}: rank {A.shape[0]}, but the config gives "
                        f"{module} rank {r} (r / rank_pattern)")
        continue
      got = _factors(A, B, shape, roles)
      if isinstance(got, str):
        mismatched.append((path, module, f"{got}"))
        continue
      parts[layer or 0] = got + (_scale(alpha, r, rslora),)
    if any(p is None for p in parts) and not stacked:
      continue
    if all(p is None for p in parts):
      continue
    if stacked:
      a, b, full_roles, scale = _stack(parts, w.shape[0], shape)
    else:
      a, b, full_roles, scale = parts[0]
    fdtype = dtype or w.dtype
    out[path] = LoraWeight(w, jnp.asarray(a, fdtype), jnp.asarray(b, fdtype), scale=scale,
                           roles=full_roles, dropout=float(config.get("lora_dropout", 0.0)))

  for path, layers in trained.items():
    w = by_path[path]
    stacked = next(iter(layers)) is not None
    n = w.shape[0] if stacked else 1
    if set(layers) != (set(range(n)) if stacked else {None}):
      missing.append((path, f"modules_to_save tensors for layers "
                            f"{sorted(set(range(n)) - set(layers))}"))
      continue
    is_kernel = path.rsplit("/", 1)[-1] == "kernel"
    shape = tuple(w.shape[1:] if stacked else w.shape)
    vals = []
    for layer in (range(n) if stacked else [None]):
      x = _interop.to_numpy(tensors[layers[layer]])
      v = _interop._from_torch(x, shape, is_kernel)  # pylint: disable=protected-access
      if v is None:
        mismatched.append((path, layers[layer], f"torch {x.shape} does not convert to {shape}"))
        break
      vals.append(v)
    else:
      value = np.stack(vals) if stacked else vals[0]
      out[path] = Trainable(jnp.asarray(value, w.dtype), w)

  if unexpected or missing or mismatched or problems:
    raise ConversionError(
        "load_peft_adapter", unexpected=unexpected, missing=missing,
        other=problems + [f"{p} <- {m}: {why}" for p, m, why in mismatched])
  return jax.tree_util.tree_unflatten(treedef, [out[p] for p, _ in leaves])


# --- lora_jax -> torch ------------------------------------------------------------

def _number(x: float):
  """An alpha as JSON: an int when it is one (to rounding)."""
  x = float(round(x, 9))
  return int(x) if x.is_integer() else x


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
  """PEFT patterns for modules whose value differs from ``default``.

  A module-name suffix (``down_proj``) is used where every module with that
  suffix shares the value, else the full module name.
  """
  by_suffix = collections.defaultdict(dict)
  for module, v in values.items():
    by_suffix[module.rsplit(".", 1)[-1]][module] = v
  out = {}
  for suffix, group in sorted(by_suffix.items()):
    distinct = set(group.values())
    if distinct == {default}:
      continue
    if len(distinct) == 1:
      out[suffix] = distinct.pop()
    else:
      out.update({m: v for m, v in sorted(group.items()) if v != default})
  return out


def _target_modules(adapted: set[str], all_modules: set[str]) -> list[str]:
  """Module-name suffixes where the adapter covers every module with that
  suffix, full names elsewhere: PEFT then targets exactly ``adapted``."""
  by_suffix = collections.defaultdict(set)
  for m in all_modules:
    by_suffix[m.rsplit(".", 1)[-1]].add(m)
  out = []
  for suffix, group in sorted(by_suffix.items()):
    covered = group & adapted
    if not covered:
      continue
    out += [suffix] if covered == group else sorted(covered)
  return out


def _to_peft(lw: LoraWeight, layer: int | None, module: str,
             torch_shape, is_embedding: bool) -> dict[str, np.ndarray]:
  a, b = _interop.to_numpy(lw.a), _interop.to_numpy(lw.b)
  if layer is not None:
    a, b = a[layer], b[layer]
  r = a.shape[-1]
  conv = torch_shape is not None and len(torch_shape) > 2
  if is_embedding:
    return {f"{module}.lora_embedding_A": a.reshape(-1, r).T,
            f"{module}.lora_embedding_B": b.reshape(r, -1).T}
  if conv:
    A = np.transpose(a, (a.ndim - 1, a.ndim - 2) + tuple(range(a.ndim - 2)))
    B = b.T.reshape(b.shape[1], r, *([1] * (a.ndim - 2)))
    return {f"{module}.lora_A.weight": A, f"{module}.lora_B.weight": B}
  return {f"{module}.lora_A.weight": a.reshape(-1, r).T,
          f"{module}.lora_B.weight": b.reshape(r, -1).T}


def pack_peft(params: Any, name_map: NameMap, *, use_rslora: bool = False,
              base_model_name_or_path: str | None = None, task_type: str | None = None,
              shapes: Mapping[str, Sequence[int]] | None = None):
  """lora_jax params -> ``(adapter_config dict, {key: np.ndarray})`` in PEFT's format.

  ``lora_jax`` keeps a ``scale`` per kernel, PEFT keeps ``r`` and
  ``lora_alpha``: each module gets ``alpha = scale * r`` (``scale *
  sqrt(r)`` with ``use_rslora``); the most common rank and alpha become
  ``r`` / ``lora_alpha`` and the others go to ``rank_pattern`` /
  ``alpha_pattern``. ``Trainable`` leaves become ``modules_to_save``.

  Args:
    params: params with ``LoraWeight`` (and ``Trainable``) nodes.
    name_map: Flax path -> torch key of the base model.
    use_rslora: write ``use_rslora: true`` (alphas follow).
    base_model_name_or_path: recorded in the config.
    task_type: e.g. ``"CAUSAL_LM"`` (``PeftModel.from_pretrained`` then builds
      the task model class); None by default.
    shapes: ``{torch_key: shape}`` of the base model's tensors; needed only
      for kernels with several input axes and one output axis, which may be
      a DenseGeneral (torch Linear) or a conv.

  Example:
    >>> import jax, numpy as np, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"fc": {"kernel": np.ones((3, 2), np.float32)}},
    ...                  lj.LoraConfig(rank=1, alpha=4, targets=".*kernel"))
    >>> cfg, t = pack_peft(p, [(r"fc/kernel", "fc.weight")])
    >>> cfg["target_modules"], cfg["r"], cfg["lora_alpha"], sorted(t)
    (['fc'], 1, 4, ['base_model.model.fc.lora_A.weight', 'base_model.model.fc.lora_B.weight'])
  """
  name = _interop.as_name_map(name_map)
  shapes = shapes or {}
  base = _base(params)
  all_modules = set(_modules(base, name_map))
  tensors: dict[str, np.ndarray] = {}
  ranks, alphas, dropouts, saved, problems = {}, {}, [], [], []
  for path, x in tree.flatten(params, is_leaf=is_node)[0]:
    if not is_node(x):
      continue
    key = name(path)
    if key is None:
      problems.append(f"{path}: the name map gives no torch key")
      continue
    shape = tuple(np.shape(x.w if isinstance(x, LoraWeight) else x.base))
    layers = list(range(shape[0])) if LAYER in key else [None]
    if isinstance(x, Trainable):
      v = _interop.to_numpy(x.value)
      is_kernel = path.rsplit("/", 1)[-1] == "kernel"
      for layer, k in zip(layers, _interop.torch_keys(key, shape)):
        part = v if layer is None else v[layer]
        try:
          tensors[PREFIX + k] = np.ascontiguousarray(
              _interop._to_torch(part, is_kernel, shapes.get(k)))  # pylint: disable=protected-access
        except ValueError as e:
          problems.append(f"{path} -> {k}: {e}")
        saved.append(k.rsplit(".", 1)[0])
      continue
    if not key.endswith(".weight"):
      problems.append(f"{path}: torch key {key!r} is not a module's .weight")
      continue
    roles = x.roles[1:] if layers[0] is not None else x.roles
    if (layers[0] is not None and not x.roles.startswith("s")) or not _is_io(roles):
      problems.append(f"{path}: roles {x.roles!r} cannot be a PEFT adapter (expected "
                      f"{'s' if layers[0] is not None else ''}i+o+ for torch key {key!r})")
      continue
    is_embedding = path.rsplit("/", 1)[-1] == "embedding"
    for layer, k in zip(layers, _interop.torch_keys(key, shape)):
      module = k[:-len(".weight")]
      torch_shape = shapes.get(k)
      if torch_shape is None and roles.count("i") > 1 and roles.count("o") == 1 and not is_embedding:
        problems.append(f"{path}: a kernel with roles {x.roles!r} may be a DenseGeneral "
                        f"(torch Linear) or a conv; pass shapes={{{k!r}: torch_shape}}")
        break
      for tk, tv in _to_peft(x, layer, module, torch_shape, is_embedding).items():
        tensors[PREFIX + tk] = np.ascontiguousarray(tv)
      ranks[module] = x.rank
      alphas[module] = _number(x.scale * (math.sqrt(x.rank) if use_rslora else x.rank))
      dropouts.append(float(x.dropout))
  if problems:
    raise ConversionError("save_peft_adapter", other=problems)
  if not ranks:
    raise ValueError("save_peft_adapter: params hold no LoraWeight (use lora_jax.lora_init "
                     "or load_peft_adapter first)")
  r = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
  if len(set(dropouts)) > 1:
    warnings.warn(f"save_peft_adapter: dropout rates differ {sorted(set(dropouts))}; "
                  "PEFT has one lora_dropout, writing the largest", stacklevel=3)
  config = {
      "peft_type": "LORA", "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "r": r, "lora_alpha": alpha, "use_rslora": bool(use_rslora),
      "target_modules": _target_modules(set(ranks), all_modules),
      "rank_pattern": _patterns(ranks, r), "alpha_pattern": _patterns(alphas, alpha),
      "lora_dropout": max(dropouts), "bias": "none", "fan_in_fan_out": False,
      "modules_to_save": sorted(set(saved)) or None,
      "init_lora_weights": True, "inference_mode": True,
  }
  return config, tensors


# --- files ------------------------------------------------------------------------

def read_peft_adapter(adapter_dir: str | os.PathLike):
  """``(config dict, {key: np.ndarray})`` from a PEFT adapter directory.

  Reads ``adapter_model.safetensors`` (or ``adapter_model.bin`` through
  ``torch.load(weights_only=True)``).
  """
  adapter_dir = os.fspath(adapter_dir)
  cfg_file = os.path.join(adapter_dir, ADAPTER_CONFIG)
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"load_peft_adapter: no {ADAPTER_CONFIG} in {adapter_dir}")
  with open(cfg_file) as f:
    config = json.load(f)
  for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
    path = os.path.join(adapter_dir, name)
    if os.path.exists(path):
      return config, _interop.read_state_dict(path)
  raise FileNotFoundError(f"load_peft_adapter: no {ADAPTER_WEIGHTS} or "
                          f"{ADAPTER_WEIGHTS_BIN} in {adapter_dir}")


def load_peft_adapter(adapter_dir: str | os.PathLike, params: Any, name_map: NameMap, *,
                      trace: Callable[[Any], Any] | None = None, dtype: Any = None) -> Any:
  """Load a Hugging Face PEFT LoRA adapter onto lora_jax params.

  Args:
    adapter_dir: a directory written by PEFT's ``save_pretrained`` (or by
      ``save_peft_adapter``).
    params: the base model's params (plain; adapters already on them are
      replaced and their roles used).
    name_map: Flax path -> torch key of the base model, e.g.
      ``lora_jax.models.llama_name_map()``; stacked leaves (``{layer}``)
      take per-layer tensors. A stacked leaf holds one rank and one scale:
      layers with a smaller PEFT rank are zero-padded (exact) and per-layer
      alpha/r differences are folded into ``b``.
    trace: optional ``lambda p: model.apply(p, x)``, only for 3+-D kernels
      whose shape splits into PEFT's (in, out) ambiguously (size-1 axes).
    dtype: factor dtype; default: each kernel's dtype.

  Returns:
    params with ``LoraWeight`` nodes; call the model with ``lora_jax.lora``.

  Raises:
    ValueError: unsupported PEFT features, by name.
    ConversionError: every unknown, missing or mis-shaped key at once.

  Example:
    >>> import jax, numpy as np, tempfile, lora_jax as lj
    >>> from lora_jax.interop import peft
    >>> rules = [(r"fc/kernel", "fc.weight")]
    >>> p = lj.lora_init(jax.random.key(0), {"fc": {"kernel": np.ones((3, 2), np.float32)}},
    ...                  lj.LoraConfig(rank=1, targets=".*kernel"))
    >>> d = tempfile.mkdtemp()
    >>> _ = peft.save_peft_adapter(d, p, rules)
    >>> peft.load_peft_adapter(d, lj.base(p), rules)["fc"]["kernel"].a.shape
    (3, 1)
  """
  config, tensors = read_peft_adapter(adapter_dir)
  return unpack_peft(config, tensors, params, name_map, trace=trace, dtype=dtype)


def save_peft_adapter(adapter_dir: str | os.PathLike, params: Any, name_map: NameMap,
                      base_model_name_or_path: str | None = None, *,
                      use_rslora: bool = False, task_type: str | None = None,
                      shapes: Mapping[str, Sequence[int]] | None = None) -> list[str]:
  """Write params' adapters as a PEFT adapter (``PeftModel.from_pretrained`` loads it).

  Writes ``adapter_config.json`` (explicit ``target_modules``; ``r``,
  ``lora_alpha`` and, where modules differ, ``rank_pattern`` /
  ``alpha_pattern``) and ``adapter_model.safetensors`` (metadata
  ``{"format": "pt"}``). See ``pack_peft`` for the arguments.

  Returns:
    The paths written.

  Example:
    >>> import jax, numpy as np, os, tempfile, lora_jax as lj
    >>> from lora_jax.interop import peft
    >>> p = lj.lora_init(jax.random.key(0), {"fc": {"kernel": np.ones((3, 2), np.float32)}},
    ...                  lj.LoraConfig(rank=1, targets=".*kernel"))
    >>> d = tempfile.mkdtemp()
    >>> [os.path.basename(f) for f in peft.save_peft_adapter(d, p, [(r"fc/kernel", "fc.weight")])]
    ['adapter_config.json', 'adapter_model.safetensors']
  """
  config, tensors = pack_peft(params, name_map, use_rslora=use_rslora, task_type=task_type,
                              base_model_name_or_path=base_model_name_or_path, shapes=shapes)
  adapter_dir = os.fspath(adapter_dir)
  os.makedirs(adapter_dir, exist_ok=True)
  cfg_file = os.path.join(adapter_dir, ADAPTER_CONFIG)
  with open(cfg_file, "w") as f:
    json.dump(config, f, indent=2)
  return [cfg_file] + _interop.write_state_dict(tensors, os.path.join(adapter_dir, ADAPTER_WEIGHTS))
