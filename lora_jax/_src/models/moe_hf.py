"""Hugging Face glue for the Flax ``Mixtral``: name map, loading and saving HF weights.

transformers 5 stores each block's experts as two fused 3-D parameters,
``mlp.experts.gate_up_proj`` ``(E, 2·ff, d)`` and ``mlp.experts.down_proj``
``(E, d, ff)`` (torch ``(out, in)`` per expert); the Flax model keeps them in
that layout (``"as_is"``), so no tensor is transposed on the way in or out.
The router is ``mlp.gate.weight`` ``(E, d)``, a Linear weight.
"""

from typing import Any, Callable, Mapping

import numpy as np

from lora_jax._src.interop.convert import pack_state_dict, unpack_state_dict
from lora_jax._src.interop.names import as_target_map
from lora_jax._src.models.moe import MixtralConfig, init_moe_params

_LAYER_RULES = (
    (r"self_attn/(q|k|v|o)_proj/kernel", r"self_attn.\1_proj.weight", "auto"),
    (r"(input_layernorm|post_attention_layernorm)/scale", r"\1.weight", "auto"),
    (r"mlp/gate/kernel", r"mlp.gate.weight", "auto"),
    (r"mlp/experts/(gate_up_proj|down_proj)", r"mlp.experts.\1", "as_is"),
)


def mixtral_rules(prefix: str = "model.") -> list[tuple[str, str, str]]:
  """The (regex, replacement, layout) rules from Flax ``Mixtral`` paths to HF keys.

  Example:
    >>> from lora_jax.interop import as_name_map
    >>> m = as_name_map(mixtral_rules())
    >>> m("layers_1/mlp/experts/gate_up_proj"), m("layers_0/mlp/gate/kernel")
    ('model.layers.1.mlp.experts.gate_up_proj', 'model.layers.0.mlp.gate.weight')
  """
  p = prefix.replace("\\", "\\\\")
  rules = [(r"(?:params/)?embed_tokens/embedding", p + "embed_tokens.weight", "auto"),
           (r"(?:params/)?norm/scale", p + "norm.weight", "auto"),
           (r"(?:params/)?lm_head/kernel", "lm_head.weight", "auto")]
  for pat, rep, layout in _LAYER_RULES:
    rules.append((r"(?:params/)?layers_(\d+)/" + pat,
                  p + r"layers.\g<1>." + rep.replace("\\1", "\\2"), layout))
  return rules


def mixtral_name_map(config: MixtralConfig | None = None) -> Callable[[str], Any]:
  """Flax ``Mixtral`` path -> HF ``MixtralForCausalLM`` ``Target(key, layout)``.

  Example:
    >>> mixtral_name_map()("layers_0/mlp/experts/down_proj")
    Target(key='model.layers.0.mlp.experts.down_proj', layout='as_is', part=None)
  """
  del config
  return as_target_map(mixtral_rules())


def _tied_ignore(config: MixtralConfig) -> tuple[str, ...]:
  return (r"lm_head\.weight",) if config.tie_word_embeddings else ()


def load_hf_mixtral(state_dict: Mapping[str, Any], config: MixtralConfig, *,
                    strict: bool = True):
  """HF ``MixtralForCausalLM`` state dict (torch tensors or numpy) -> Flax params.

  Args:
    state_dict: ``model.state_dict()`` or ``lora_jax.interop.read_state_dict(path)``.
    config: the ``MixtralConfig`` (``MixtralConfig.from_hf`` reads HF's).
    strict: raise on missing / unexpected / mis-shaped keys (one error).

  Returns:
    Params for ``Mixtral(config).apply({"params": params}, ids)``.

  Example:
    >>> cfg = MixtralConfig.tiny(num_hidden_layers=1)
    >>> sd = to_hf_mixtral_state_dict(init_moe_params(cfg), cfg)
    >>> load_hf_mixtral(sd, cfg)["layers_0"]["mlp"]["gate"]["kernel"].shape   # (d, E)
    (32, 4)
  """
  return unpack_state_dict(state_dict, init_moe_params(config, abstract=True),
                           mixtral_name_map(config), strict=strict,
                           ignore=_tied_ignore(config))


def to_hf_mixtral_state_dict(params: Any, config: MixtralConfig, *,
                             dtype: Any = None) -> dict[str, np.ndarray]:
  """Flax ``Mixtral`` params -> HF ``MixtralForCausalLM`` state dict (numpy).

  Merge LoRA adapters first (``lora_jax.merge``).

  Example:
    >>> cfg = MixtralConfig.tiny(num_hidden_layers=1)
    >>> sd = to_hf_mixtral_state_dict(init_moe_params(cfg), cfg)
    >>> sd["model.layers.0.mlp.experts.gate_up_proj"].shape   # (E, 2 ff, d)
    (4, 96, 32)
  """
  return pack_state_dict(params, mixtral_name_map(config), dtype=dtype)
