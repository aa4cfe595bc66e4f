r"""PyTorch / safetensors weights <-> Flax params.

The conversion is a pair of pure functions over in-memory dicts:

* ``unpack_state_dict(state_dict, template, name_map)`` -> Flax params,
* ``pack_state_dict(params, name_map)`` -> a torch-style state dict of numpy
  arrays,

and file I/O is a thin layer around them: ``read_state_dict`` (safetensors
file, sharded index or directory; ``.bin``/``.pt`` only through
``torch.load(weights_only=True)``) and ``write_state_dict`` (safetensors with
``{"format": "pt"}`` metadata, optionally sharded with an index).

**Name maps.** A name map takes a Flax leaf path (the '/'-joined key path,
as in ``LoraConfig.targets``) to a torch state-dict key, or ``None`` for a
leaf with no torch counterpart. It is a callable or a list of rules: the
first regex that ``re.fullmatch``-es the path wins and
``match.expand(key)`` gives the key. A rule is a tuple
``(regex, key)``, ``(regex, key, layout)`` or ``(regex, key, layout, part)``,
or a ``Rule`` with those fields. A key holding ``{layer}`` (``LAYER``) names
a *stacked* leaf (``nn.scan``): its leading axis gathers the torch tensors
with ``{layer}`` = 0, 1, ..., L - 1.

**Layouts** (``LAYOUTS``) say how the torch tensor is stored:

* ``"auto"`` (default): a leaf named ``kernel`` is a torch ``Linear`` /
  ``Conv`` weight (``"transposed"``), any other leaf ``"as_is"``;
* ``"transposed"``: torch ``Linear`` ``(out, in)`` / ``Conv`` ``(O, I, *k)``;
* ``"as_is"``: the Flax array itself, reshaped only where axes merge or split
  in order;
* ``"conv1d"``: GPT-2's ``Conv1D``, stored ``(in, out)``: as is, and PEFT
  adapters on it are ``fan_in_fan_out``. A square Conv1D weight read as
  ``"auto"`` loads silently transposed: give GPT-2 style models this layout.

**Fused tensors.** ``part=(i, n)`` makes the leaf the ``i``-th of ``n``
equal slices of the torch tensor along its output axis (axis 0 of a Linear
weight or a bias, the last axis of a ``conv1d`` weight): loading slices,
saving concatenates. ``nn.MultiheadAttention`` into Flax's
``MultiHeadDotProductAttention``::

  rules = [Rule(f"{n}/{leaf}", f"in_proj_{t}", part=(i, 3))
           for i, n in enumerate(("query", "key", "value"))
           for leaf, t in (("kernel", "weight"), ("bias", "bias"))]
  rules += [("out/kernel", "out_proj.weight"), ("out/bias", "out_proj.bias")]

and GPT-2::

  (r"h_(\d+)/(attn|mlp)/(c_\w+)/kernel", r"transformer.h.\1.\2.\3.weight", "conv1d")

**Conversions** are chosen from the layout and the shapes:

===========================  ======================  =========================
Flax leaf                    torch tensor            conversion
===========================  ======================  =========================
``.../kernel`` (in, out)     Linear (out, in)        transpose
``.../kernel`` (d, h, hd)    Linear (h*hd, d)        transpose, reshape
``.../kernel`` (h, hd, d)    Linear (d, h*hd)        transpose, reshape
``.../kernel`` (kh, kw, I, O)  Conv (O, I, kh, kw)   move axes (any # spatial)
``conv1d`` (in, out)         Conv1D (in, out)        as is (reshape for
                                                     DenseGeneral)
anything else                same shape              as is (``embedding``,
                                                     ``scale``, ``bias``, ...)
``bias`` etc. (h, hd)        1-D (h*hd,)             reshape
===========================  ======================  =========================

``ConvTranspose`` kernels (spatially flipped in Flax) are not converted.

This module imports torch only inside the functions that need it. The code
lives in ``lora_jax/_src/interop/``: ``names.py`` (name maps),
``tensors.py`` (single-tensor conversions), ``convert.py`` (the pure
pack/unpack pair) and ``files.py`` (reading and writing files).

>>> import jax, numpy as np, tempfile
>>> from lora_jax.interop import torch as lj_torch
>>> rules = [(r"fc/kernel", "fc.weight")]
>>> template = {"fc": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32)}}
>>> params = lj_torch.unpack_state_dict({"fc.weight": np.ones((2, 3))}, template, rules)
>>> d = tempfile.mkdtemp()
>>> _ = lj_torch.save_params(params, d, rules)              # model.safetensors
>>> lj_torch.load_params(d, template, rules)["fc"]["kernel"].shape
(3, 2)
"""

from lora_jax._src.interop.convert import ConversionError as ConversionError
from lora_jax._src.interop.convert import pack_state_dict as pack_state_dict
from lora_jax._src.interop.convert import unpack_state_dict as unpack_state_dict
from lora_jax._src.interop.files import SAFETENSORS as SAFETENSORS
from lora_jax._src.interop.files import SAFETENSORS_INDEX as SAFETENSORS_INDEX
from lora_jax._src.interop.files import SafetensorsDict as SafetensorsDict
from lora_jax._src.interop.files import load_params as load_params
from lora_jax._src.interop.files import read_state_dict as read_state_dict
from lora_jax._src.interop.files import save_params as save_params
from lora_jax._src.interop.files import write_state_dict as write_state_dict
from lora_jax._src.interop.names import LAYER as LAYER
from lora_jax._src.interop.names import LAYOUTS as LAYOUTS
from lora_jax._src.interop.names import NameMap as NameMap
from lora_jax._src.interop.names import Rule as Rule
from lora_jax._src.interop.names import as_name_map as as_name_map
from lora_jax._src.interop.names import torch_index as torch_index
from lora_jax._src.interop.names import torch_keys as torch_keys
from lora_jax._src.interop.tensors import kernel_from_torch as kernel_from_torch
from lora_jax._src.interop.tensors import kernel_to_torch as kernel_to_torch
from lora_jax._src.interop.tensors import to_numpy as to_numpy

__all__ = (
    "LAYER",
    "LAYOUTS",
    "SAFETENSORS",
    "SAFETENSORS_INDEX",
    "ConversionError",
    "NameMap",
    "Rule",
    "SafetensorsDict",
    "as_name_map",
    "kernel_from_torch",
    "kernel_to_torch",
    "load_params",
    "pack_state_dict",
    "read_state_dict",
    "save_params",
    "to_numpy",
    "torch_index",
    "torch_keys",
    "unpack_state_dict",
    "write_state_dict",
)
