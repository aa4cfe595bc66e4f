"""PEFT's LoRA format: key names and the config rules, re-implemented purely.

``pattern_value`` / ``is_targeted`` follow PEFT's own matching
(``rank_pattern`` / ``alpha_pattern``, ``target_modules`` and friends);
``check_config`` refuses, by name, the PEFT features lora_jax cannot express.
``kernel_modules`` gives the torch module behind every kernel, through the
same name map as the weights (``lora_jax.interop.torch``).
"""

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
