"""PEFT ``target_parameters`` adapters on 3-D expert tensors (``lora.ParamWrapper``).

PEFT 0.21 adapts a 3-D ``nn.Parameter`` with one rank-``r`` adapter per
expert. Its axis order depends on the torch module's ``is_transposed``:
transformers' MoE experts (Mixtral, Qwen3-MoE: ``is_transposed=False``)
store ``(E, out, in)``, e.g. Mixtral's ``mlp.experts.gate_up_proj``
``(E, 2·ff, d)``, so PEFT swaps its ``[E, in, out]`` reading of the shape;
modules with ``is_transposed=True`` store ``[E, in, out]`` (vLLM's fused-MoE
kernels use the transposed order again: convert before serving there). The
adapter is two Linear weights either way:

* ``lora_A.weight`` ``(E·r, in)``: expert-major rows, ``A_e = rows e·r .. e·r+r-1``;
* ``lora_B.weight`` ``(out, r·E)``: rank-major columns, column ``k·E + e``;

and ``ΔW[e] = (alpha / r) · B_e @ A_e`` (``(out, in)``, or its transpose for
``[E, in, out]``). lora_jax holds the same adapter as a ``LoraWeight`` with
roles ``"soi"`` (``(E, out, in)`` tensors) or ``"sio"`` (``[E, in, out]``):
``a`` ``(E, in, r)``, ``b`` ``(E, r, out)`` in both cases. Several targeted
parameters of one module are nested ``ParamWrapper``s: the one declared
first in the torch module is innermost, so its keys carry one ``.base_layer``
per parameter wrapped around it.
"""

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from lora_jax._src import tree
from lora_jax._src.interop.names import LAYER, as_target_map
from lora_jax._src.interop.peft_format import pattern_value
from lora_jax._src.interop.tensors import to_numpy
from lora_jax._src.weight import LoraWeight

# HF MoE expert modules declare their parameters in this order (PEFT nests
# the wrappers in declaration order); other names follow, sorted.
_DECLARED = ("gate_up_proj", "gate_up_proj_bias", "gate_proj", "up_proj", "down_proj",
             "down_proj_bias")


def _declared(name: str):
  return (_DECLARED.index(name), "") if name in _DECLARED else (len(_DECLARED), name)


def param_leaves(base: Any, name_map) -> dict[str, str]:
  """``{torch_key: flax_path}`` of 3-D leaves that are a torch ``nn.Parameter``
  (not a module's ``.weight``): the tensors PEFT adapts by ``target_parameters``."""
  target_of = as_target_map(name_map)
  out = {}
  for path, x in tree.flatten(base)[0]:
    t = target_of(path)
    if (t is not None and np.ndim(x) == 3 and t.part is None and LAYER not in t.key
        and not t.key.endswith(".weight")):
      out[t.key] = path
  return out


def adapter_keys(params: list[str]) -> dict[str, str]:
  """``{param_key: PEFT module prefix}``: ``.base_layer`` once per outer wrapper.

  Example:
    >>> sorted(adapter_keys(["m.experts.down_proj", "m.experts.gate_up_proj"]).items())
    [('m.experts.down_proj', 'm.experts'), ('m.experts.gate_up_proj', 'm.experts.base_layer')]
  """
  by_module: dict[str, list[str]] = {}
  for key in params:
    by_module.setdefault(key.rpartition(".")[0], []).append(key)
  out = {}
  for module, keys in by_module.items():
    keys.sort(key=lambda k: _declared(k.rpartition(".")[2]))
    for i, key in enumerate(keys):
      out[key] = module + ".base_layer" * (len(keys) - 1 - i)
  return out


def is_param_targeted(config: Mapping[str, Any], key: str) -> bool:
  """PEFT's match: the key itself or a ``.``-suffix of it is in ``target_parameters``."""
  return any(key == t or key.endswith(f".{t}") for t in config.get("target_parameters") or ())


def _in_out(shape: tuple, roles: str) -> tuple[int, int, int]:
  """``(E, in, out)`` of a 3-D expert tensor with roles ``"soi"`` or ``"sio"``."""
  e, d1, d2 = shape
  return (e, d2, d1) if roles == "soi" else (e, d1, d2)


def factors_from_peft(A: np.ndarray, B: np.ndarray, shape: tuple, roles: str = "soi"):
  """``(a (E, in, r), b (E, r, out))`` from PEFT's ``lora_A`` / ``lora_B``, or an error.

  Example:
    >>> a, b = factors_from_peft(np.zeros((8, 3)), np.zeros((5, 8)), (4, 5, 3))
    >>> a.shape, b.shape
    ((4, 3, 2), (4, 2, 5))
  """
  e, n_in, n_out = _in_out(shape, roles)
  if (A.ndim != 2 or B.ndim != 2 or A.shape[1] != n_in or B.shape[0] != n_out
      or A.shape[0] % e or B.shape[1] != A.shape[0]):
    return (f"lora_A {A.shape} / lora_B {B.shape} do not fit the expert tensor {shape} "
            f"(roles {roles!r}): expected (E·r, in={n_in}) and (out={n_out}, E·r) with E={e}")
  r = A.shape[0] // e
  return (A.reshape(e, r, n_in).transpose(0, 2, 1), B.reshape(n_out, r, e).transpose(2, 1, 0))


def factors_to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's ``(lora_A (E·r, in), lora_B (out, r·E))`` from ``a (E, in, r)``, ``b (E, r, out)``.

  Example:
    >>> A, B = factors_to_peft(np.zeros((4, 3, 2)), np.zeros((4, 2, 5)))
    >>> A.shape, B.shape
    ((8, 3), (5, 8))
  """
  e, n_in, r = a.shape
  return (a.transpose(0, 2, 1).reshape(e * r, n_in),
          b.transpose(2, 1, 0).reshape(b.shape[2], r * e))


EXPERT_ROLES = ("soi", "sio")


def _unmatched(config: Mapping[str, Any], params: Mapping[str, str]) -> list[str]:
  return [f"target_parameters entry {t!r} matches no 3-D expert tensor the name map "
          f"gives a torch parameter key (not a .weight); those are: {sorted(params)[:5] or 'none'}"
          for t in config.get("target_parameters") or ()
          if not any(is_param_targeted({"target_parameters": [t]}, k) for k in params)]


def unpack_params(config: Mapping[str, Any], tensors: Mapping[str, Any], base: Any,
                  name_map, roles_of: Mapping[str, str], dtype: Any, prefix: str):
  """The ``target_parameters`` part of a PEFT adapter.

  Args:
    config, tensors, base, name_map, dtype: as for ``unpack_peft``.
    roles_of: known or traced roles by Flax path; ``"soi"`` (HF's
      ``(E, out, in)``) where absent.
    prefix: PEFT's key prefix (``base_model.model.``).

  Returns:
    ``({flax_path: LoraWeight}, consumed tensor keys, problems, missing)``;
    ``missing`` holds ``(flax_path, what)`` pairs.
  """
  params = param_leaves(base, name_map)
  targeted = [k for k in params if is_param_targeted(config, k)]
  leaves = dict(tree.flatten(base)[0])
  out, consumed, problems, missing = {}, set(), _unmatched(config, params), []
  for key, module in adapter_keys(targeted).items():
    path = params[key]
    names = {kind: f"{prefix}{module}.lora_{kind}.weight" for kind in "AB"}
    absent = [n for n in names.values() if n not in tensors]
    missing += [(path, f"{n} (targeted by target_parameters)") for n in absent]
    if absent:
      continue
    consumed |= set(names.values())
    got = _one(config, key, leaves[path], roles_of.get(path, "soi"),
               to_numpy(tensors[names["A"]]), to_numpy(tensors[names["B"]]), dtype)
    if isinstance(got, str):
      problems.append(f"{path} <- {names['A']}: {got}")
    else:
      out[path] = got
  return out, consumed, problems, missing


def _one(config, key: str, w, roles: str, A, B, dtype):
  """One expert tensor's LoraWeight, or an error string."""
  if roles not in EXPERT_ROLES:
    return (f"roles {roles!r}; PEFT adapts a 3-D parameter as (experts, out, in) or "
            "[experts, in, out], i.e. roles 'soi' or 'sio'")
  got = factors_from_peft(A, B, tuple(w.shape), roles)
  if isinstance(got, str):
    return got
  a, b = got
  r = int(pattern_value(config.get("rank_pattern"), key, config.get("r", 8)))
  alpha = float(pattern_value(config.get("alpha_pattern"), key, config.get("lora_alpha", 8)))
  if a.shape[-1] != r:
    return f"rank {a.shape[-1]} per expert, but the config gives {key} rank {r} (r / rank_pattern)"
  rslora = bool(config.get("use_rslora", False))
  fdtype = dtype or w.dtype
  return LoraWeight(w, jnp.asarray(a, fdtype), jnp.asarray(b, fdtype),
                    scale=alpha / (math.sqrt(r) if rslora else r), roles=roles)
