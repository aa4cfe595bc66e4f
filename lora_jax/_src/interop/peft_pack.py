"""lora_jax params -> a PEFT adapter: the pure ``pack_peft``.

``lora_jax`` keeps a ``scale`` per kernel, PEFT keeps ``r`` and
``lora_alpha``: each module's alpha follows from its scale, the most common
rank / alpha become the defaults and the rest go to ``rank_pattern`` /
``alpha_pattern``; ``target_modules`` names exactly the adapted modules.
"""

import collections
import math
import re
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from lora_jax._src import tree
from lora_jax._src.interop.convert import ConversionError
from lora_jax._src.interop.names import LAYER, NameMap, as_target_map, leaf_layout, torch_keys
from lora_jax._src.interop.peft_format import PREFIX, is_io, is_targeted, kernel_modules
from lora_jax._src.interop.peft_params import (EXPERT_ROLES, adapter_keys, factors_to_peft,
                                               param_leaves)
from lora_jax._src.interop.tensors import leaf_to_torch, to_numpy
from lora_jax._src.merge import base as _base
from lora_jax._src.weight import LoraWeight, Trainable, is_node


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


def _by_layers(adapted: set[str], all_modules: set[str]) -> dict | None:
  """``{target_modules, layers_to_transform}`` when module suffixes restricted
  to some layer indexes (PEFT's rule, ``is_targeted``) select exactly
  ``adapted`` and not every layer is adapted; else None (full names are used)."""
  suffixes = sorted({m.rsplit(".", 1)[-1] for m in adapted})
  layers = set()
  for m in adapted:
    found = re.match(r".*?\.[^.]*\.(\d+)\.", m)
    if found is None:
      return None
    layers.add(int(found.group(1)))
  config = {"target_modules": suffixes, "layers_to_transform": sorted(layers)}
  if {m for m in all_modules if is_targeted(config, m)} != adapted:
    return None
  if {m for m in all_modules if is_targeted({"target_modules": suffixes}, m)} == adapted:
    return None  # every layer: no layers_to_transform needed
  return config


def _zero_layer(lw: LoraWeight, layer: int) -> bool:
  """Layer ``layer`` of a stacked adapter has A = B = 0 (an exact no-op)."""
  return not (np.any(to_numpy(lw.a[layer])) or np.any(to_numpy(lw.b[layer])))


def _to_peft(lw: LoraWeight, layer: int | None, module: str,
             torch_shape, is_embedding: bool) -> dict[str, np.ndarray]:
  a, b = to_numpy(lw.a), to_numpy(lw.b)
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
  ``fan_in_fan_out`` is true when every adapted module's name-map rule has
  layout ``"conv1d"`` (GPT-2's ``Conv1D``); the factors are the same either
  way (PEFT's ``lora_A`` is ``(r, in)`` for both).

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
  target_of = as_target_map(name_map)
  shapes = shapes or {}
  base = _base(params)
  all_modules = set(kernel_modules(base, name_map))
  tensors: dict[str, np.ndarray] = {}
  ranks, alphas, dropouts, saved, problems, conv1d = {}, {}, [], [], [], {}
  doras: dict[str, bool] = {}  # path -> DoRA or plain LoRA (PEFT has one use_dora)
  expert_params, adapted_params = param_leaves(base, name_map), []
  for path, x in tree.flatten(params, is_leaf=is_node)[0]:
    if not is_node(x):
      continue
    target = target_of(path)
    if target is None:
      problems.append(f"{path}: the name map gives no torch key")
      continue
    if target.part is not None:
      problems.append(f"{path}: its torch key {target.key!r} is a fused tensor (rule part="
                      f"{target.part}); PEFT cannot hold an adapter on a part of one")
      continue
    key, layout = target.key, leaf_layout(path, target.layout)
    shape = tuple(np.shape(x.w if isinstance(x, LoraWeight) else x.base))
    layers = list(range(shape[0])) if LAYER in key else [None]
    if isinstance(x, Trainable):
      v = to_numpy(x.value)
      for layer, k in zip(layers, torch_keys(key, shape)):
        part = v if layer is None else v[layer]
        try:
          tensors[PREFIX + k] = np.ascontiguousarray(
              leaf_to_torch(part, layout, shapes.get(k)))
        except ValueError as e:
          problems.append(f"{path} -> {k}: {e}")
        saved.append(k.rsplit(".", 1)[0])
      continue
    if isinstance(x, LoraWeight) and x.dora:
      doras[path] = True
    elif isinstance(x, LoraWeight):
      doras[path] = False
    if key in expert_params and isinstance(x, LoraWeight):
      if x.dora:
        problems.append(f"{path}: DoRA on a 3-D expert parameter; PEFT's "
                        "target_parameters has no DoRA")
        continue
      if x.roles not in EXPERT_ROLES:
        problems.append(f"{path}: roles {x.roles!r}; PEFT adapts a 3-D parameter {key!r} "
                        "as (experts, out, in) or [experts, in, out], i.e. roles 'soi' "
                        "or 'sio'")
        continue
      if x.dropout:
        problems.append(f"{path}: dropout {x.dropout}; PEFT's ParamWrapper (target_parameters) "
                        "refuses lora_dropout != 0: set the LoraWeight's dropout to 0.0")
        continue
      lora_a, lora_b = factors_to_peft(to_numpy(x.a), to_numpy(x.b))
      adapted_params.append(key)
      tensors[f"{PREFIX}{key}.lora_A.weight"] = np.ascontiguousarray(lora_a)
      tensors[f"{PREFIX}{key}.lora_B.weight"] = np.ascontiguousarray(lora_b)
      ranks[key] = x.rank
      alphas[key] = _number(x.scale * (math.sqrt(x.rank) if use_rslora else x.rank))
      dropouts.append(float(x.dropout))
      continue
    if not key.endswith(".weight"):
      problems.append(f"{path}: torch key {key!r} is not a module's .weight")
      continue
    roles = x.roles[1:] if layers[0] is not None else x.roles
    if (layers[0] is not None and not x.roles.startswith("s")) or not is_io(roles):
      problems.append(f"{path}: roles {x.roles!r} cannot be a PEFT adapter (expected "
                      f"{'s' if layers[0] is not None else ''}i+o+ for torch key {key!r})")
      continue
    is_embedding = path.rsplit("/", 1)[-1] == "embedding"
    for layer, k in zip(layers, torch_keys(key, shape)):
      module = k[:-len(".weight")]
      if layer is not None and _zero_layer(x, layer):
        continue  # outside layers_to_transform: no adapter there (PEFT's selection)
      torch_shape = shapes.get(k)
      if (torch_shape is None and roles.count("i") > 1 and roles.count("o") == 1
          and not is_embedding and layout != "conv1d"):
        problems.append(f"{path}: a kernel with roles {x.roles!r} may be a DenseGeneral "
                        f"(torch Linear) or a conv; pass shapes={{{k!r}: torch_shape}}")
        break
      peft_tensors = _to_peft(x, layer, module, torch_shape, is_embedding)
      if x.dora:
        a_key = f"{module}.lora_A.weight"
        if a_key not in peft_tensors or peft_tensors[a_key].ndim != 2:
          problems.append(f"{path}: DoRA on an embedding or conv kernel cannot be "
                          "exported (lora_jax's DoRA covers Linear modules)")
          break
        m = to_numpy(x.m)
        peft_tensors[f"{module}.lora_magnitude_vector"] = (
            m if layer is None else m[layer]).reshape(-1)
      for tk, tv in peft_tensors.items():
        tensors[PREFIX + tk] = np.ascontiguousarray(tv)
      ranks[module] = x.rank
      conv1d[module] = layout == "conv1d"
      alphas[module] = _number(x.scale * (math.sqrt(x.rank) if use_rslora else x.rank))
      dropouts.append(float(x.dropout))
  # target_parameters: nested ParamWrapper keys (see peft_params)
  for key, module in adapter_keys(adapted_params).items():
    for kind in "AB":
      tensors[f"{PREFIX}{module}.lora_{kind}.weight"] = tensors.pop(
          f"{PREFIX}{key}.lora_{kind}.weight")
  if len(set(doras.values())) > 1:
    problems.append(f"DoRA at {[p for p, d in doras.items() if d][:3]} but plain LoRA at "
                    f"{[p for p, d in doras.items() if not d][:3]}; PEFT has one use_dora "
                    "for the whole adapter: train all kernels with the same LoraConfig.dora")
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
      "layers_to_transform": None,
      **({"target_parameters": _target_modules(set(adapted_params), set(expert_params))}
         if adapted_params else {}),
      "rank_pattern": _patterns(ranks, r), "alpha_pattern": _patterns(alphas, alpha),
      "lora_dropout": max(dropouts), "bias": "none",
      "fan_in_fan_out": all(conv1d.values()),  # GPT-2 Conv1D modules (rule layout)
      "modules_to_save": sorted(set(saved)) or None,
      "init_lora_weights": True, "inference_mode": True,
      **({"use_dora": True} if any(doras.values()) else {}),
  }
  if not adapted_params:  # (PEFT's layers_to_transform for target_parameters: untested)
    config.update(_by_layers(set(ranks), all_modules) or {})
  return config, tensors
