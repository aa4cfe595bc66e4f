"""Compact Flax models for examples and interop tests (no torch import).

>>> import jax.numpy as jnp
>>> from lora_jax.models import Llama, LlamaConfig, init_params
>>> cfg = LlamaConfig.tiny()
>>> Llama(cfg).apply({"params": init_params(cfg)}, jnp.zeros((1, 4), jnp.int32)).shape
(1, 4, 128)
"""

from lora_jax.models.llama import Llama as Llama
from lora_jax.models.llama import LlamaAttention as LlamaAttention
from lora_jax.models.llama import LlamaBlock as LlamaBlock
from lora_jax.models.llama import LlamaConfig as LlamaConfig
from lora_jax.models.llama import LlamaMLP as LlamaMLP
from lora_jax.models.llama import generate as generate
from lora_jax._src.models.llama_bnb import load_bnb_llama as load_bnb_llama
from lora_jax.models.llama import generate_cached as generate_cached
from lora_jax.models.llama import init_cache as init_cache
from lora_jax.models.llama import init_params as init_params
from lora_jax.models.llama import llama_name_map as llama_name_map
from lora_jax.models.llama import llama_rules as llama_rules
from lora_jax.models.llama import load_hf_llama as load_hf_llama
from lora_jax.models.llama import rotary as rotary
from lora_jax.models.llama import save_hf_llama as save_hf_llama
from lora_jax.models.llama import to_hf_state_dict as to_hf_state_dict
from lora_jax.models.moe import Mixtral as Mixtral
from lora_jax.models.moe import MixtralConfig as MixtralConfig
from lora_jax.models.moe import MixtralExperts as MixtralExperts
from lora_jax.models.moe import MixtralSparseMoe as MixtralSparseMoe
from lora_jax.models.moe import grouped_linear as grouped_linear
from lora_jax.models.moe import init_moe_params as init_moe_params
from lora_jax.models.moe import route as route
from lora_jax.models.moe import load_hf_mixtral as load_hf_mixtral
from lora_jax.models.moe import mixtral_name_map as mixtral_name_map
from lora_jax.models.moe import mixtral_rules as mixtral_rules
from lora_jax.models.moe import to_hf_mixtral_state_dict as to_hf_mixtral_state_dict

__all__ = (
    "Llama",
    "LlamaAttention",
    "LlamaBlock",
    "LlamaConfig",
    "LlamaMLP",
    "Mixtral",
    "MixtralConfig",
    "MixtralExperts",
    "MixtralSparseMoe",
    "generate",
    "generate_cached",
    "grouped_linear",
    "init_cache",
    "init_moe_params",
    "init_params",
    "llama_name_map",
    "llama_rules",
    "load_bnb_llama",
    "load_hf_llama",
    "load_hf_mixtral",
    "mixtral_name_map",
    "mixtral_rules",
    "rotary",
    "route",
    "save_hf_llama",
    "to_hf_mixtral_state_dict",
    "to_hf_state_dict",
)
