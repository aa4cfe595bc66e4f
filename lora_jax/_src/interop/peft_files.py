"""PEFT adapter directories: the thin I/O layer around ``unpack_peft`` / ``pack_peft``.

Reads ``adapter_config.json`` + ``adapter_model.safetensors`` (or
``adapter_model.bin`` through ``torch.load(weights_only=True)``) and writes
the same pair, as PEFT's ``save_pretrained`` does.
"""

import json
import os
from typing import Any, Callable, Mapping, Sequence

from lora_jax._src import multihost
from lora_jax._src.inits import to_lora
from lora_jax._src.interop.files import read_json, read_state_dict, write_state_dict
from lora_jax._src.interop.peft_format import validate_config
from lora_jax._src.interop.names import NameMap
from lora_jax._src.interop.peft_pack import pack_peft
from lora_jax._src.interop.peft_unpack import unpack_peft

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"


def read_peft_adapter(adapter_dir: str | os.PathLike):
  """``(config dict, {key: np.ndarray})`` from a PEFT adapter directory.

  Reads ``adapter_model.safetensors`` (or ``adapter_model.bin`` through
  ``torch.load(weights_only=True)``).
  """
  adapter_dir = os.fspath(adapter_dir)
  cfg_file = os.path.join(adapter_dir, ADAPTER_CONFIG)
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"load_peft_adapter: no {ADAPTER_CONFIG} in {adapter_dir}")
  config = read_json(cfg_file, "load_peft_adapter")
  validate_config(config, cfg_file)
  for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
    path = os.path.join(adapter_dir, name)
    if os.path.exists(path):
      return config, read_state_dict(path)
  raise FileNotFoundError(f"load_peft_adapter: no {ADAPTER_WEIGHTS} or "
                          f"{ADAPTER_WEIGHTS_BIN} in {adapter_dir}")


def load_peft_adapter(adapter_dir: str | os.PathLike, params: Any, name_map: NameMap, *,
                      trace: Callable[[Any], Any] | None = None, dtype: Any = None,
                      ignore: Sequence[str] = (), dry_run: bool = False) -> Any:
  """Load a Hugging Face PEFT LoRA adapter onto lora_jax params.

  Args:
    adapter_dir: a directory written by PEFT's ``save_pretrained`` (or by
      ``save_peft_adapter``).
    params: the base model's params (plain; adapters already on them are
      replaced and their roles used).
    name_map: Flax path -> torch key of the base model, e.g.
      ``lora_jax.models.llama_name_map()``; stacked leaves (``{layer}``)
      take per-layer tensors. A stacked leaf holds one rank and one scale:
      layers with a smaller PEFT rank are zero-padded (exact) and per-layer
      alpha/r differences are folded into ``b``.
    trace: optional ``lambda p: model.apply(p, x)``, only for 3+-D kernels
      whose shape splits into PEFT's (in, out) ambiguously (size-1 axes).
    dtype: factor dtype; default: each kernel's dtype.
    ignore: regexes (``re.fullmatch``) of PEFT tensor keys (with or without
      ``base_model.model.``) or torch module names to skip knowingly; a
      targeted module matching one is not reported missing.
    dry_run: return a ``PeftLoadReport`` (``print`` it) of what would be
      loaded, skipped, missing or refused, instead of loading.

  Returns:
    params with ``LoraWeight`` nodes; call the model with ``lora_jax.lora``.
    With ``dry_run``: a ``PeftLoadReport``.

  PEFT's default save of adapters on ``embed_tokens`` / ``lm_head``
  (``save_embedding_layers="auto"``) adds the base weights as
  ``{module}.base_layer.weight``: they are accepted when they equal the base
  params (an error gives the max difference otherwise).

  Raises:
    ValueError: unsupported PEFT features, by name; an invalid
      ``adapter_config.json`` or a damaged weights file, by file and field.
    ConversionError: every unknown, missing or mis-shaped key at once.

  Example:
    >>> import jax, numpy as np, tempfile, lora_jax as lj
    >>> from lora_jax.interop import peft
    >>> rules = [(r"fc/kernel", "fc.weight")]
    >>> p = lj.lora_init(jax.random.key(0), {"fc": {"kernel": np.ones((3, 2), np.float32)}},
    ...                  lj.LoraConfig(rank=1, targets=".*kernel"))
    >>> d = tempfile.mkdtemp()
    >>> _ = peft.save_peft_adapter(d, p, rules)
    >>> peft.load_peft_adapter(d, lj.base(p), rules)["fc"]["kernel"].a.shape
    (3, 1)
    >>> print(peft.load_peft_adapter(d, lj.base(p), rules, ignore=["fc"], dry_run=True))
    PEFT adapter: loads
      loaded (0):
      trained (0):
      skipped (2):
        base_model.model.fc.lora_A.weight
        base_model.model.fc.lora_B.weight
      missing (0):
      unexpected (0):
      problems (0):
  """
  config, tensors = read_peft_adapter(adapter_dir)
  return unpack_peft(config, tensors, params, name_map, trace=trace, dtype=dtype,
                     ignore=ignore, dry_run=dry_run)


def save_peft_adapter(adapter_dir: str | os.PathLike, params: Any, name_map: NameMap,
                      base_model_name_or_path: str | None = None, *,
                      use_rslora: bool = False, task_type: str | None = None,
                      shapes: Mapping[str, Sequence[int]] | None = None,
                      initial: Any = None) -> list[str]:
  """Write params' adapters as a PEFT adapter (``PeftModel.from_pretrained`` loads it).

  For a PiSSA / OLoRA adapter (``LoraConfig(init="pissa")``, whose base
  kernels became ``W - s·A0@B0``) pass ``initial=lj.adapter(params)`` taken
  right after ``lora_init``: the adapter is written as plain LoRA of rank 2r
  for the *original* base (``lj.to_lora``; PEFT's
  ``path_initial_model_for_weight_conversion``).

  Writes ``adapter_config.json`` (explicit ``target_modules``; ``r``,
  ``lora_alpha`` and, where modules differ, ``rank_pattern`` /
  ``alpha_pattern``) and ``adapter_model.safetensors`` (metadata
  ``{"format": "pt"}``). See ``pack_peft`` for the arguments. With several
  processes (``jax.distributed``) every process calls it: the factors are
  gathered whole and process 0 writes the files, the same bytes as one
  process would.

  Returns:
    The paths written.

  Example:
    >>> import jax, numpy as np, os, tempfile, lora_jax as lj
    >>> from lora_jax.interop import peft
    >>> p = lj.lora_init(jax.random.key(0), {"fc": {"kernel": np.ones((3, 2), np.float32)}},
    ...                  lj.LoraConfig(rank=1, targets=".*kernel"))
    >>> d = tempfile.mkdtemp()
    >>> [os.path.basename(f) for f in peft.save_peft_adapter(d, p, [(r"fc/kernel", "fc.weight")])]
    ['adapter_config.json', 'adapter_model.safetensors']
  """
  if initial is not None:
    params = to_lora(params, initial)
  what = "save_peft_adapter"  # several processes: all call it, process 0 writes
  params = multihost.gathered(what, adapter_dir, params, multihost.gather_adapter)
  config, tensors = pack_peft(params, name_map, use_rslora=use_rslora, task_type=task_type,
                              base_model_name_or_path=base_model_name_or_path, shapes=shapes)
  adapter_dir = os.fspath(adapter_dir)

  def write() -> list[str]:
    os.makedirs(adapter_dir, exist_ok=True)
    cfg_file = os.path.join(adapter_dir, ADAPTER_CONFIG)
    with open(cfg_file, "w") as f:
      json.dump(config, f, indent=2)
    return [cfg_file] + write_state_dict(tensors, os.path.join(adapter_dir, ADAPTER_WEIGHTS))
  return multihost.write_once(what, write)
