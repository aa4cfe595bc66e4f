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

GPT-2 style ``Conv1D`` modules (weights stored ``(in, out)``) need name-map
rules with layout ``"conv1d"`` (``lora_jax.interop.Rule``); their factors are
PEFT's usual ``lora_A`` / ``lora_B`` and ``fan_in_fan_out`` follows the
layout. PEFT's default save of adapters on ``embed_tokens`` / ``lm_head``
also writes ``{module}.base_layer.weight``: accepted when equal to the base
params. ``load_peft_adapter(..., ignore=[regex], dry_run=True)`` skips keys
or modules knowingly and reports what would load.

PiSSA / OLoRA: an adapter PEFT saved with ``init_lora_weights="pissa"`` or
``"olora"`` loads as PEFT's ``from_pretrained`` loads it (the init is redone
on the base, which becomes ``W - s·A0@B0``; ``"pissa_niter_K"`` is random and
refused); ``save_peft_adapter(..., initial=lj.adapter(params_at_init))``
writes a lora_jax PiSSA / OLoRA adapter as plain LoRA of rank 2r on the
original base (PEFT's ``path_initial_model_for_weight_conversion``). Stacked
layers outside ``layers_to_transform`` (A = B = 0) are not written, and the
config says ``layers_to_transform`` when that is how PEFT would select them.

The conversion is a pair of pure functions, ``unpack_peft`` /
``pack_peft``, over ``(config dict, {key: array})``; ``load_peft_adapter`` /
``save_peft_adapter`` add the file I/O. Unlike PEFT, unknown, missing and
mis-shaped keys are errors (one ``ConversionError`` lists them all), and
PEFT features lora_jax cannot express (DoRA, LoRA biases, ...) are refused
by name.

This module imports torch / safetensors only inside the I/O functions. The
code lives in ``lora_jax/_src/interop/``: ``peft_format.py`` (PEFT's key
names and config rules), ``peft_unpack.py`` / ``peft_pack.py`` (the pure
pair) and ``peft_files.py`` (adapter directories).

>>> import jax, numpy as np, lora_jax as lj
>>> from lora_jax.interop import peft
>>> rules = [(r"fc/kernel", "fc.weight")]
>>> p = lj.lora_init(jax.random.key(0), {"fc": {"kernel": np.ones((3, 2), np.float32)}},
...                  lj.LoraConfig(rank=1, alpha=2, targets=".*kernel"))
>>> config, tensors = peft.pack_peft(p, rules)          # adapter_config dict, {key: array}
>>> peft.unpack_peft(config, tensors, lj.base(p), rules)["fc"]["kernel"].scale
2.0
"""

from lora_jax._src.interop.convert import ConversionError as ConversionError
from lora_jax._src.interop.peft_files import ADAPTER_CONFIG as ADAPTER_CONFIG
from lora_jax._src.interop.peft_files import ADAPTER_WEIGHTS as ADAPTER_WEIGHTS
from lora_jax._src.interop.peft_files import ADAPTER_WEIGHTS_BIN as ADAPTER_WEIGHTS_BIN
from lora_jax._src.interop.peft_files import load_peft_adapter as load_peft_adapter
from lora_jax._src.interop.peft_files import read_peft_adapter as read_peft_adapter
from lora_jax._src.interop.peft_files import save_peft_adapter as save_peft_adapter
from lora_jax._src.interop.peft_format import PREFIX as PREFIX
from lora_jax._src.interop.peft_format import check_config as check_config
from lora_jax._src.interop.peft_format import is_targeted as is_targeted
from lora_jax._src.interop.peft_format import pattern_value as pattern_value
from lora_jax._src.interop.peft_format import validate_config as validate_config
from lora_jax._src.interop.peft_pack import pack_peft as pack_peft
from lora_jax._src.interop.peft_stack import load_peft_stack as load_peft_stack
from lora_jax._src.interop.peft_stack import save_peft_stack as save_peft_stack
from lora_jax._src.interop.peft_unpack import PeftLoadReport as PeftLoadReport
from lora_jax._src.interop.peft_unpack import unpack_peft as unpack_peft

__all__ = (
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "ADAPTER_WEIGHTS_BIN",
    "PREFIX",
    "ConversionError",
    "PeftLoadReport",
    "check_config",
    "is_targeted",
    "load_peft_adapter",
    "load_peft_stack",
    "pack_peft",
    "pattern_value",
    "read_peft_adapter",
    "save_peft_adapter",
    "save_peft_stack",
    "unpack_peft",
    "validate_config",
)
