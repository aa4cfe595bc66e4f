"""Load a Hugging Face Llama saved with a bitsandbytes 4-bit ``quantization_config``.

``transformers`` writes such a checkpoint (``LlamaForCausalLM.from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` then
``save_pretrained``) with, for each quantized ``Linear`` weight ``k``::

  k                                  uint8 (out * in / 2, 1)  packed NF4 codes
  k.absmax                           float32 (n_blocks,), or uint8 with double quant
  k.nested_absmax, k.nested_quant_map   double quantization (blocks of 256)
  k.quant_map                        the NF4 codebook
  k.quant_state.bitsandbytes__nf4    JSON: blocksize, shape, nested_offset, ...

These are exactly a ``QuantizedWeight``'s arrays (``lora_jax``'s NF4 layout
is bitsandbytes'), so they are loaded as they are: nothing is dequantized.
"""

import json
import os

import jax.numpy as jnp
import numpy as np

from lora_jax._src import quant_formats as fmt
from lora_jax._src import tree
from lora_jax._src.interop.convert import unpack_state_dict
from lora_jax._src.interop.files import read_state_dict
from lora_jax._src.interop.names import LAYER, as_name_map, torch_keys
from lora_jax._src.models.llama import LlamaConfig, init_params
from lora_jax._src.models.llama_hf import _tied_ignore, llama_name_map
from lora_jax._src.quant import QuantizedWeight

_STATE = ".quant_state.bitsandbytes__nf4"
_AUX = (".absmax", ".nested_absmax", ".nested_quant_map", ".quant_map", _STATE)


def _nf4_weight(state, key: str, where: str):
  """``(codes, absmax, absmax2, offset, block_size, (out, in))`` of one torch weight."""
  info = json.loads(bytes(np.asarray(state[key + _STATE])).decode())
  out_f, in_f = info["shape"]
  bs = int(info["blocksize"])
  if info.get("quant_type") != "nf4" or not np.array_equal(
      np.asarray(state[key + ".quant_map"], np.float32), fmt.NF4):
    raise ValueError(f"{where}: {key} is not NF4 (quant_type {info.get('quant_type')!r}); "
                     "only NF4 checkpoints load as lora_jax QuantizedWeights")
  if in_f % bs:
    raise ValueError(f"{where}: {key} has in_features {in_f}, not a multiple of its "
                     f"blocksize {bs}: its blocks straddle rows, which lora_jax's layout "
                     "cannot hold; load the dequantized model instead")
  codes = np.asarray(state[key], np.uint8).reshape(out_f, in_f // 2)
  absmax = np.asarray(state[key + ".absmax"]).reshape(out_f, in_f // bs)
  absmax2 = offset = None
  if "nested_offset" in info:
    if int(info.get("nested_blocksize", 256)) != fmt.NESTED_BLOCK or not np.array_equal(
        np.asarray(state[key + ".nested_quant_map"], np.float32), fmt.DYNAMIC):
      raise ValueError(f"{where}: {key}'s double quantization is not bitsandbytes' "
                       "dynamic 8-bit map in blocks of 256")
    absmax2 = np.asarray(state[key + ".nested_absmax"], np.float32)
    offset = np.float32(info["nested_offset"])
  return codes, absmax, absmax2, offset, bs, (out_f, in_f)


def load_bnb_llama(directory: str | os.PathLike, **overrides):
  """``(LlamaConfig, params)`` from a bitsandbytes-4-bit (NF4) HF Llama checkpoint.

  The NF4 projections become ``QuantizedWeight`` nodes (stacked per layer with
  ``scan_layers=True``), ready for ``lj.lora_init`` / ``lj.lora``; the other
  weights (embeddings, norms, lm_head) load as arrays.

  Args:
    directory: the ``save_pretrained`` directory.
    **overrides: ``LlamaConfig`` fields (``scan_layers=True``, ``dtype=...``).

  Returns:
    ``(config, params)``; each QuantizedWeight dequantizes to the checkpoint's
    ``bnb_4bit_compute_dtype``.

  Example:
    >>> load_bnb_llama("no/such/dir")
    Traceback (most recent call last):
    ...
    FileNotFoundError: load_bnb_llama: no config.json in no/such/dir
  """
  path = os.fspath(directory)
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"load_bnb_llama: no config.json in {path}")
  with open(cfg_file) as f:
    hf = json.load(f)
  qc = hf.get("quantization_config") or {}
  if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
    raise ValueError(f"load_bnb_llama: {cfg_file} has no bitsandbytes 4-bit "
                     f"quantization_config (found {qc or None}); use load_hf_llama")
  config = LlamaConfig.from_hf(hf, **overrides)
  compute = jnp.dtype(qc.get("bnb_4bit_compute_dtype") or "float32")
  state = read_state_dict(path)
  template = init_params(config, abstract=True)
  name = as_name_map(llama_name_map(config))
  leaves, treedef = tree.flatten(template)
  quantized = {}
  for p, leaf in leaves:
    key = name(p)
    keys = torch_keys(key, tuple(leaf.shape)) if key else []
    if keys and all(k + _STATE in state for k in keys):
      quantized[p] = keys
  plain_state = {k: v for k, v in state.items()
                 if not any(k[:-len(s)] in state and k.endswith(s) for s in _AUX)
                 and k + _STATE not in state}
  rest = [None if p in quantized else leaf for p, leaf in leaves]
  loaded = unpack_state_dict(plain_state, treedef.unflatten(rest), llama_name_map(config),
                             ignore=_tied_ignore(config))
  out = tree.flatten(loaded, is_leaf=lambda x: x is None)[0]
  values = []
  for (p, leaf), (_, x) in zip(leaves, out):
    if p not in quantized:
      values.append(x)
      continue
    parts = [_nf4_weight(state, k, path) for k in quantized[p]]
    stack = lambda j: None if parts[0][j] is None else jnp.asarray(
        np.stack([q[j] for q in parts]) if LAYER in name(p) else parts[0][j])
    out_f, in_f = parts[0][5]
    values.append(QuantizedWeight(stack(0), stack(1), stack(2), stack(3), kind="nf4",
                                  block_size=parts[0][4], inner_shape=(in_f, out_f),
                                  inner_roles="io", dtype=compute))
  return config, treedef.unflatten(values)
