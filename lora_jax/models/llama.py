"""A compact Flax Linen Llama-style decoder that matches Hugging Face's Llama.

RMSNorm, rotary embeddings (HF's ``rotate_half`` convention, ``rope_theta``),
grouped-query attention with a causal mask, a SwiGLU MLP and a tied or untied
``lm_head``. Parameter names mirror Hugging Face's, so the PyTorch name map is
a handful of rules (``llama_name_map``)::

  embed_tokens/embedding                      model.embed_tokens.weight
  layers_{i}/self_attn/{q,k,v,o}_proj/kernel  model.layers.{i}.self_attn.q_proj.weight
  layers_{i}/mlp/{gate,up,down}_proj/kernel   model.layers.{i}.mlp.gate_proj.weight
  layers_{i}/input_layernorm/scale            model.layers.{i}.input_layernorm.weight
  layers_{i}/post_attention_layernorm/scale   model.layers.{i}.post_attention_layernorm.weight
  norm/scale                                  model.norm.weight
  lm_head/kernel                              lm_head.weight

With ``scan_layers=True`` the blocks are stacked with ``nn.scan``: a single
``layers/...`` subtree whose leaves carry a leading layer axis (a q_proj
kernel is ``(L, d, heads * head_dim)``). Kernels are plain ``nn.Dense``
``(in, out)`` matrices, the transpose of torch's ``Linear.weight``.

This module does not import torch; ``load_hf_llama`` reads safetensors with
``safetensors.numpy``. The code lives in ``lora_jax/_src/models/``:
``llama.py`` (the Flax model and its KV cache), ``generate.py`` (sampling
for any ``(params, ids) -> logits``, and ``generate_cached`` for any model
that takes ``cache=`` and ``positions=``) and ``llama_hf.py`` (the Hugging
Face name map, loading and saving).

>>> import jax.numpy as jnp
>>> from lora_jax.models import llama
>>> cfg = llama.LlamaConfig.tiny(num_hidden_layers=1)
>>> params = llama.init_params(cfg)
>>> sd = llama.to_hf_state_dict(params, cfg)              # HF keys, torch layouts
>>> sd["model.layers.0.self_attn.q_proj.weight"].shape
(32, 32)
>>> _, back = llama.load_hf_llama(sd, cfg)
>>> apply = lambda p, ids: llama.Llama(cfg).apply({"params": p}, ids)
>>> llama.generate(apply, back, jnp.array([[1, 2]]), 3).shape
(1, 5)
"""

from lora_jax._src.models.generate import generate as generate
from lora_jax._src.models.generate import generate_cached as generate_cached
from lora_jax._src.models.llama import Llama as Llama
from lora_jax._src.models.llama import LlamaAttention as LlamaAttention
from lora_jax._src.models.llama import LlamaBlock as LlamaBlock
from lora_jax._src.models.llama import LlamaConfig as LlamaConfig
from lora_jax._src.models.llama import LlamaMLP as LlamaMLP
from lora_jax._src.models.llama import init_cache as init_cache
from lora_jax._src.models.llama import init_params as init_params
from lora_jax._src.models.llama import rotary as rotary
from lora_jax._src.models.llama_hf import llama_name_map as llama_name_map
from lora_jax._src.models.llama_hf import llama_rules as llama_rules
from lora_jax._src.models.llama_hf import load_hf_llama as load_hf_llama
from lora_jax._src.models.llama_hf import save_hf_llama as save_hf_llama
from lora_jax._src.models.llama_hf import to_hf_state_dict as to_hf_state_dict

__all__ = (
    "Llama",
    "LlamaAttention",
    "LlamaBlock",
    "LlamaConfig",
    "LlamaMLP",
    "generate",
    "generate_cached",
    "init_cache",
    "init_params",
    "llama_name_map",
    "llama_rules",
    "load_hf_llama",
    "rotary",
    "save_hf_llama",
    "to_hf_state_dict",
)
