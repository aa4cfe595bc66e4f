"""Hugging Face glue for the Flax ``Llama``: name map, loading and saving HF checkpoints.

``llama_rules`` / ``llama_name_map`` map Flax paths to ``LlamaForCausalLM``
state-dict keys; ``load_hf_llama`` / ``to_hf_state_dict`` / ``save_hf_llama``
compose them with ``lora_jax.interop.torch``. No torch import: safetensors
are read and written with ``safetensors.numpy``.
"""

import json
import os
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from lora_jax._src import multihost
from lora_jax._src.interop.convert import pack_state_dict, unpack_state_dict
from lora_jax._src.interop.files import read_json, read_state_dict, write_state_dict
from lora_jax._src.interop.names import as_name_map
from lora_jax._src.models.llama import LlamaConfig, init_params

_LAYER_RULES = (
    (r"self_attn/(q|k|v|o)_proj/kernel", r"self_attn.\1_proj.weight"),
    (r"self_attn/(q|k|v|o)_proj/bias", r"self_attn.\1_proj.bias"),
    (r"mlp/(gate|up|down)_proj/kernel", r"mlp.\1_proj.weight"),
    (r"mlp/(gate|up|down)_proj/bias", r"mlp.\1_proj.bias"),
    (r"(input_layernorm|post_attention_layernorm)/scale", r"\1.weight"),
)


def llama_rules(prefix: str = "model.") -> list[tuple[str, str]]:
  """The (regex, replacement) rules from Flax ``Llama`` paths to HF keys.

  They cover both layouts: ``layers_(\\d+)/...`` maps to
  ``model.layers.\\1....`` and the scanned ``layers/...`` to
  ``model.layers.{layer}....`` (one torch tensor per layer). An optional
  leading ``params/`` is accepted. ``prefix`` is what precedes ``layers``,
  ``embed_tokens`` and ``norm`` in the torch keys (HF: ``"model."``).

  Example:
    >>> from lora_jax.interop import as_name_map
    >>> m = as_name_map(llama_rules())
    >>> m("layers_3/mlp/up_proj/kernel"), m("layers/norm/scale")
    ('model.layers.3.mlp.up_proj.weight', None)
    >>> m("layers/self_attn/q_proj/kernel")
    'model.layers.{layer}.self_attn.q_proj.weight'
  """
  p = prefix.replace("\\", "\\\\")
  rules = [(r"(?:params/)?embed_tokens/embedding", p + "embed_tokens.weight"),
           (r"(?:params/)?norm/scale", p + "norm.weight"),
           (r"(?:params/)?lm_head/kernel", "lm_head.weight")]
  for pat, rep in _LAYER_RULES:
    rules.append((r"(?:params/)?layers_(\d+)/" + pat,
                  p + r"layers.\g<1>." + rep.replace("\\1", "\\2")))
    rules.append((r"(?:params/)?layers/" + pat, p + "layers.{layer}." + rep))
  return rules


def llama_name_map(config: LlamaConfig | None = None) -> Callable[[str], str | None]:
  """Flax ``Llama`` path -> HF ``LlamaForCausalLM`` state-dict key.

  The same map serves both ``scan_layers`` settings (see ``llama_rules``);
  ``config`` is accepted for symmetry and future variants.

  Example:
    >>> llama_name_map()("layers_0/self_attn/k_proj/kernel")
    'model.layers.0.self_attn.k_proj.weight'
  """
  del config
  return as_name_map(llama_rules())


def _tied_ignore(config: LlamaConfig) -> tuple[str, ...]:
  # A tied HF model's state_dict() still lists lm_head.weight (the same tensor).
  return (r"lm_head\.weight",) if config.tie_word_embeddings else ()


def load_hf_llama(source: str | os.PathLike | Mapping[str, Any],
                  config: LlamaConfig | None = None, *, strict: bool = True,
                  **overrides):
  """Load a Hugging Face Llama checkpoint into ``(LlamaConfig, params)``.

  Args:
    source: a local HF model directory (``config.json`` + ``model.safetensors``
      or a sharded ``model.safetensors.index.json``), a weights file, or a
      state dict of torch tensors / numpy arrays.
    config: the ``LlamaConfig``; read from ``config.json`` when None (then
      ``source`` must be a directory).
    strict: raise on missing / unexpected / mis-shaped keys (one error).
    **overrides: ``LlamaConfig`` fields to change (``scan_layers=True``,
      ``dtype=jnp.bfloat16`` for compute, ``param_dtype=jnp.bfloat16``: the
      weights are cast to ``param_dtype``).

  Returns:
    ``(config, params)`` with ``params`` for ``Llama(config).apply({"params": params}, ids)``.

  Example:
    >>> import numpy as np
    >>> cfg = LlamaConfig.tiny(num_hidden_layers=1)
    >>> sd = to_hf_state_dict(init_params(cfg), cfg)
    >>> cfg2, params = load_hf_llama(sd, cfg.replace(scan_layers=True))
    >>> params["layers"]["self_attn"]["q_proj"]["kernel"].shape
    (1, 32, 32)
  """
  if config is None:
    if isinstance(source, Mapping):
      raise ValueError("load_hf_llama: pass config= when loading from a state dict")
    path = os.fspath(source)
    cfg_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path),
                            "config.json")
    if not os.path.exists(cfg_file):
      raise FileNotFoundError(f"load_hf_llama: no config.json next to {path}; "
                              "pass config=LlamaConfig(...)")
    hf = read_json(cfg_file, "load_hf_llama")
    try:
      config = LlamaConfig.from_hf(hf, **overrides)
    except (ValueError, TypeError, NotImplementedError) as e:
      raise type(e)(f"{cfg_file}: {e}") from e
  elif overrides:
    config = config.replace(**overrides)
  state = source if isinstance(source, Mapping) else read_state_dict(source)
  params = unpack_state_dict(
      state, init_params(config, abstract=True), llama_name_map(config), strict=strict,
      ignore=_tied_ignore(config))
  return config, params


def to_hf_state_dict(params: Any, config: LlamaConfig, *,
                     dtype: Any = None) -> dict[str, np.ndarray]:
  """Flax ``Llama`` params -> HF ``LlamaForCausalLM`` state dict (numpy).

  Merge LoRA adapters first (``lora_jax.merge``). A tied model has no
  ``lm_head.weight`` entry, as in HF's own files.

  Example:
    >>> cfg = LlamaConfig.tiny(num_hidden_layers=1)
    >>> sd = to_hf_state_dict(init_params(cfg), cfg)
    >>> sd["model.layers.0.self_attn.k_proj.weight"].shape   # (kv * hd, d)
    (16, 32)
  """
  return pack_state_dict(params, llama_name_map(config), dtype=dtype)


def save_hf_llama(params: Any, config: LlamaConfig, directory: str | os.PathLike,
                  *, dtype: Any = None, max_shard_size: int | None = None) -> list[str]:
  """Write ``config.json`` + safetensors that ``LlamaForCausalLM.from_pretrained`` loads.

  With several processes (``jax.distributed``) every process calls it: each
  tensor is gathered whole (every process holds the full model in host
  memory for the moment) and process 0 writes the files.

  Returns:
    The paths written.

  Example:
    >>> import tempfile, os
    >>> cfg = LlamaConfig.tiny(num_hidden_layers=1)
    >>> d = tempfile.mkdtemp()
    >>> sorted(os.path.basename(p) for p in save_hf_llama(init_params(cfg), cfg, d))
    ['config.json', 'model.safetensors']
  """
  directory = os.fspath(directory)
  params = multihost.gathered("save_hf_llama", directory, params)  # several processes
  hf = config.to_hf_dict()
  if dtype is not None:
    hf["torch_dtype"] = jnp.dtype(dtype).name
  state = to_hf_state_dict(params, config, dtype=dtype)

  def write() -> list[str]:
    os.makedirs(directory, exist_ok=True)
    cfg_path = os.path.join(directory, "config.json")
    with open(cfg_path, "w") as f:
      json.dump(hf, f, indent=2)
    return [cfg_path] + write_state_dict(state, directory, max_shard_size=max_shard_size)
  return multihost.write_once("save_hf_llama", write)
