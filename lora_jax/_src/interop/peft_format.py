"""PEFT's LoRA format: key names and the config rules, re-implemented purely.

``pattern_value`` / ``is_targeted`` follow PEFT's own matching
(``rank_pattern`` / ``alpha_pattern``, ``target_modules`` and friends);
``check_config`` refuses, by name, the PEFT features lora_jax cannot express.
``kernel_modules`` gives the torch module behind every kernel, through the
same name map as the weights (``lora_jax.interop.torch``).
"""

import math
import re
from typing import Any, Mapping

import numpy as np

from lora_jax._src import tree
from lora_jax._src.interop.names import torch_index
from lora_jax._src.weight import is_node

PREFIX = "base_model.model."

# PEFT config entries that change what an adapter computes and that lora_jax
# cannot express: {key: (is-set predicate, why)}.
_REFUSED = {
    "lora_bias": (bool, "LoRA biases on lora_B are not supported"),
    "layer_replication": (bool, "layer replication is not supported"),
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
# those that PEFT's from_pretrained redoes deterministically on the base
# (exact SVD, QR) and load_peft_adapter redoes too: W -> W - s·A0@B0.
REDONE_INITS = ("pissa", "olora")


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


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _strs(x) -> bool:
  # JSON gives lists; a PEFT config in memory (``LoraConfig.to_dict()``) sets
  return isinstance(x, (list, tuple, set)) and all(isinstance(v, str) for v in x)


def _dict_of(ok):
  return lambda x: isinstance(x, dict) and all(
      isinstance(k, str) and ok(v) for k, v in x.items())


# {field: (check of a present, non-null value, what is expected)}
_FIELD_TYPES = {
    "peft_type": (lambda x: isinstance(x, str), "a string ('LORA')"),
    "r": (lambda x: _is_int(x) and x > 0, "a positive integer"),
    "lora_alpha": (_is_num, "a finite number"),
    "lora_dropout": (lambda x: _is_num(x) and 0 <= x < 1, "a number in [0, 1)"),
    "use_rslora": (lambda x: isinstance(x, bool), "true or false"),
    "fan_in_fan_out": (lambda x: isinstance(x, bool), "true or false"),
    "bias": (lambda x: isinstance(x, str), "a string ('none')"),
    "target_modules": (lambda x: isinstance(x, str) or _strs(x),
                       "a regex string or a list (or set) of module names"),
    "exclude_modules": (lambda x: isinstance(x, str) or _strs(x),
                        "a regex string or a list of module names"),
    "modules_to_save": (_strs, "a list of module names"),
    "rank_pattern": (_dict_of(lambda v: _is_int(v) and v > 0),
                     "a dict {pattern: positive integer rank}"),
    "alpha_pattern": (_dict_of(_is_num), "a dict {pattern: number}"),
    "layers_to_transform": (lambda x: _is_int(x) or (isinstance(x, (list, tuple)) and all(
        _is_int(v) for v in x)), "an integer or a list of integers"),
    "layers_pattern": (lambda x: isinstance(x, str) or _strs(x),
                       "a string or a list of strings"),
    "init_lora_weights": (lambda x: isinstance(x, (bool, str)), "true, false or a string"),
}
_REQUIRED = ("target_modules",)


def validate_config(config: Any, where: str = "adapter_config") -> None:
  """Check the types and ranges of the ``adapter_config.json`` fields lora_jax reads.

  Args:
    config: the parsed ``adapter_config.json``.
    where: the file (or other source) named in the error.

  Raises:
    ValueError: naming ``where`` and every field that is missing or of the
      wrong type, with what was expected and what was found.

  Example:
    >>> validate_config({"r": "8", "target_modules": ["q_proj"]}, "a/adapter_config.json")
    Traceback (most recent call last):
    ...
    ValueError: a/adapter_config.json: invalid PEFT adapter config:
      field 'r' must be a positive integer; found '8' (str)
  """
  if not isinstance(config, Mapping):
    raise ValueError(f"{where}: a PEFT adapter config must be a JSON object; found "
                     f"{type(config).__name__}")
  problems = [f"field {k!r} is missing (expected {_FIELD_TYPES[k][1]})"
              for k in _REQUIRED if k not in config]
  for key, (ok, expected) in _FIELD_TYPES.items():
    value = config.get(key)
    if value is not None and not ok(value):
      problems.append(f"field {key!r} must be {expected}; found {value!r} "
                      f"({type(value).__name__})")
  if problems:
    raise ValueError(f"{where}: invalid PEFT adapter config:\n  " + "\n  ".join(problems))


def check_config(config: Mapping[str, Any]) -> None:
  """Refuse PEFT configs that lora_jax cannot load faithfully.

  Raises:
    ValueError: naming every unsupported feature that is set.

  Example:
    >>> check_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16})
    >>> check_config({"peft_type": "LORA", "lora_bias": True})
    Traceback (most recent call last):
    ...
    ValueError: PEFT adapter uses features lora_jax does not support:
      lora_bias=True: LoRA biases on lora_B are not supported
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
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS) and (
      init not in REDONE_INITS):
    problems.append(
        f"init_lora_weights={init!r}: this adapter assumes a modified base model; "
        "convert it in PEFT with save_pretrained(..., "
        "path_initial_model_for_weight_conversion=...) first (lora_jax redoes "
        f"only the deterministic {' and '.join(REDONE_INITS)} on loading)")
  if problems:
    raise ValueError("PEFT adapter uses features lora_jax does not support:\n  "
                     + "\n  ".join(problems))


def is_io(roles: str) -> bool:
  """Whether ``roles`` are input axes then output axes (PEFT's Linear / Embedding)."""
  return re.fullmatch(r"i+o+", roles) is not None


def kernel_modules(base_params, name_map) -> dict[str, tuple[str, int | None]]:
  """``{module: (flax_path, layer)}`` for every kernel / embedding weight."""
  out = {}
  leaves = dict(tree.flatten(base_params, is_leaf=is_node)[0])  # a QuantizedWeight whole
  for key, (path, layer) in torch_index(base_params, name_map).items():
    per = np.ndim(leaves[path]) - (layer is not None)
    if key.endswith(".weight") and per >= 2:
      out[key[:-len(".weight")]] = (path, layer)
  return out
