"""Weights interop: PyTorch / safetensors state dicts <-> Flax params.

Importing this package does not import torch (torch is imported lazily, only
to read ``.bin``/``.pt`` files or convert torch tensors). Hugging Face PEFT
LoRA adapters: ``load_peft_adapter`` / ``save_peft_adapter``
(``lora_jax.interop.peft``).

>>> import jax, numpy as np
>>> from lora_jax import interop
>>> template = {"fc": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32)}}
>>> rules = [(r"fc/kernel", "fc.weight")]
>>> params = interop.unpack_state_dict({"fc.weight": np.ones((2, 3))}, template, rules)
>>> interop.pack_state_dict(params, rules)["fc.weight"].shape
(2, 3)
"""

from lora_jax.interop.peft import load_peft_adapter as load_peft_adapter
from lora_jax.interop.peft import save_peft_adapter as save_peft_adapter
from lora_jax.interop.torch import LAYER as LAYER
from lora_jax.interop.torch import ConversionError as ConversionError
from lora_jax.interop.torch import LAYOUTS as LAYOUTS
from lora_jax.interop.torch import NameMap as NameMap
from lora_jax.interop.torch import Rule as Rule
from lora_jax.interop.torch import SafetensorsDict as SafetensorsDict
from lora_jax.interop.torch import as_name_map as as_name_map
from lora_jax.interop.torch import kernel_from_torch as kernel_from_torch
from lora_jax.interop.torch import kernel_to_torch as kernel_to_torch
from lora_jax.interop.torch import load_params as load_params
from lora_jax.interop.torch import pack_state_dict as pack_state_dict
from lora_jax.interop.torch import read_state_dict as read_state_dict
from lora_jax.interop.torch import save_params as save_params
from lora_jax.interop.torch import to_numpy as to_numpy
from lora_jax.interop.torch import torch_index as torch_index
from lora_jax.interop.torch import torch_keys as torch_keys
from lora_jax.interop.torch import unpack_state_dict as unpack_state_dict
from lora_jax.interop.torch import write_state_dict as write_state_dict

__all__ = (
    "LAYER",
    "LAYOUTS",
    "ConversionError",
    "NameMap",
    "Rule",
    "SafetensorsDict",
    "as_name_map",
    "kernel_from_torch",
    "kernel_to_torch",
    "load_params",
    "load_peft_adapter",
    "pack_state_dict",
    "read_state_dict",
    "save_params",
    "save_peft_adapter",
    "to_numpy",
    "torch_index",
    "torch_keys",
    "unpack_state_dict",
    "write_state_dict",
)
