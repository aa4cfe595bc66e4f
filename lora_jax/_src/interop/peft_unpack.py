"""PEFT adapter tensors -> lora_jax params: the pure ``unpack_peft``.

PEFT's ``lora_A`` ``(r, in)`` / ``lora_B`` ``(out, r)`` become ``a =
lora_A.T`` reshaped to ``in_axes + (r,)`` and ``b = lora_B.T`` reshaped to
``(r,) + out_axes`` (conv and embedding factors likewise); per-layer tensors
of a stacked (``{layer}``) kernel are stacked, ranks zero-padded.
"""

import collections
import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import layout, tree
from lora_jax._src.interop.convert import ConversionError
from lora_jax._src.interop.names import (LAYER, NameMap, as_target_map, fused_keys, leaf_layout,
                                         torch_index)
from lora_jax._src.interop.peft_params import param_leaves, unpack_params
from lora_jax._src.interop.peft_format import (PREFIX, REDONE_INITS, check_config, is_io,
                                               is_targeted, kernel_modules, pattern_value,
                                               validate_config)
from lora_jax._src.interop.tensors import leaf_from_torch, to_numpy
from lora_jax._src.inits import principal_factors
from lora_jax._src.merge import base as _base
from lora_jax._src.quant import is_quantized
from lora_jax._src.weight import LoraWeight, Trainable, is_node

_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight"
                  r"|(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)"
                  r"(?:\.[^.]+)?"
                  r"|(?P<mmodule>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?")


def _linear_split(shape: tuple, n_in: int, n_out: int) -> list[int]:
  """Every k with prod(shape[:k]) == n_in and prod(shape[k:]) == n_out."""
  return [k for k in range(1, len(shape))
          if math.prod(shape[:k]) == n_in and math.prod(shape[k:]) == n_out]


def _scale(alpha: float, r: int, rslora: bool) -> float:
  return alpha / (math.sqrt(r) if rslora else r)


def _parse_keys(tensors: Mapping[str, Any]):
  """``{module: {"A": key, "B": key}}``, embedding modules, and other keys."""
  groups: dict[str, dict[str, str]] = collections.defaultdict(dict)
  embedding, other = set(), []
  for key in tensors:
    bare = key.removeprefix(PREFIX)
    m = _KEY.fullmatch(bare)
    if m is None:
      other.append(key)
      continue
    module = m.group("module") or m.group("emodule") or m.group("mmodule")
    kind = "M" if m.group("mmodule") else (m.group("kind") or m.group("ekind"))[-1]
    if m.group("emodule"):
      embedding.add(module)
    if kind in groups[module]:
      other.append(key)  # a second adapter name, or both key forms
      continue
    groups[module][kind] = key
  return dict(groups), embedding, other


def _factors(A: np.ndarray, B: np.ndarray, shape: tuple, roles: str | None):
  """One layer's ``(a, b, roles)`` from PEFT's A and B, or an error string."""
  r = A.shape[0]
  if B.ndim < 2 or B.shape[1] != r:
    return f"lora_B {B.shape} does not have lora_A's rank {r} on axis 1"
  if A.ndim == 2:  # Linear / Embedding
    n_in, n_out = A.shape[1], B.shape[0]
    if roles is not None:
      ks = [roles.count("i")] if (is_io(roles) and math.prod(shape[:roles.count("i")]) == n_in
                                  and math.prod(shape[roles.count("i"):]) == n_out) else []
    else:
      ks = _linear_split(shape, n_in, n_out)
    if not ks:
      return (f"lora_A {A.shape} / lora_B {B.shape} (in={n_in}, out={n_out}) do not fit the "
              f"kernel of shape {shape}" + (f" with roles {roles!r}" if roles else ""))
    if len(ks) > 1:
      return (f"the kernel of shape {shape} splits into in={n_in}, out={n_out} in "
              f"several ways; pass trace= (or params with LoraWeight nodes) to fix its roles")
    k = ks[0]
    return A.T.reshape(shape[:k] + (r,)), B.T.reshape((r,) + shape[k:]), "i" * k + "o" * (len(shape) - k)
  # Conv: A (r, I, *k), B (O, r, 1, ...); Flax kernel (*k, I, O)
  nd = A.ndim
  conv_shape = tuple(A.shape[2:]) + (A.shape[1], B.shape[0])
  if (conv_shape != shape or B.ndim != nd or any(d != 1 for d in B.shape[2:])
      or (roles is not None and roles != "i" * (nd - 1) + "o")):
    return f"conv lora_A {A.shape} / lora_B {B.shape} do not fit the kernel of shape {shape}"
  a = np.transpose(A, tuple(range(2, nd)) + (1, 0))
  return a, B.reshape(B.shape[0], r).T, "i" * (nd - 1) + "o"


def _redo_init(residual: dict, path: str, module: str, w, layer: int | None, roles: str,
               r: int, scale: float, init: str, not_linear: bool) -> str | None:
  """PEFT's ``from_pretrained`` of a ``"pissa"`` / ``"olora"`` adapter redoes the
  init on the base first: the kernel (layer) becomes ``W - s·A0@B0``."""
  if not_linear:
    return f"{module}: init_lora_weights={init!r} on a non-Linear module is not supported"
  if is_quantized(w):
    return (f"{module}: init_lora_weights={init!r} rewrites the base kernel {path}, but "
            "it is quantized; load onto the float base, then quantize")
  current = jnp.asarray(residual.get(path, w))
  part = current if layer is None else current[layer]
  new = principal_factors(jax.random.key(0), part, roles, r, scale, init)[0]
  residual[path] = new if layer is None else current.at[layer].set(new)
  return None


def _magnitude(lw: LoraWeight, mags: list, stacked: bool, path: str):
  """DoRA's ``m`` (``stack + out``) from PEFT's per-module magnitude vectors;
  a stacked layer without an adapter gets ``‖W‖_c`` (an exact no-op)."""
  from lora_jax._src import dora
  n_s = lw.roles.count("s")
  want = tuple(lw.b.shape[:n_s]) + tuple(lw.b.shape[n_s + 1:])
  m = np.array(dora.column_norm(lw.replace(b=jnp.zeros_like(lw.b))))  # ‖W‖_c
  for layer, v in enumerate(mags):
    if v is None:
      continue
    one = want[1:] if stacked else want
    if v.size != math.prod(one):
      return None, (f"{path}: lora_magnitude_vector has {v.size} entries, the kernel has "
                    f"{math.prod(one)} output columns (shape {list(one)})")
    if stacked:
      m[layer] = v.reshape(one)
    else:
      m = v.reshape(one)
  return m, ""


def _stack(parts: list, n_layers: int, per_shape: tuple):
  """Stack per-layer ``(a, b, roles, scale)``; pad ranks, fold scale ratios into b."""
  present = [p for p in parts if p is not None]
  rank = max(p[0].shape[-1] for p in present)
  roles = present[0][2]
  scale = collections.Counter(p[3] for p in present).most_common(1)[0][0]
  n_in = roles.count("i")
  a_all = np.zeros((n_layers,) + per_shape[:n_in] + (rank,), np.float32)
  b_all = np.zeros((n_layers, rank) + per_shape[n_in:], np.float32)
  for layer, p in enumerate(parts):
    if p is None:
      continue  # a layer PEFT does not adapt: zero factors
    a, b, _, s = p
    r = a.shape[-1]
    a_all[layer, ..., :r] = a
    b_all[layer, :r] = b * (s / scale)
  return a_all, b_all, "s" + roles, scale


# PEFT's save_embedding_layers (default "auto" when embed_tokens / lm_head are
# targeted) writes the base weight of an adapted module as {module}.base_layer.{param}.
_BASE_COPY = re.compile(r"(.+)\.base_layer\.(\w+)")


def _ignored(key: str, skip: Sequence[re.Pattern]) -> bool:
  """Whether ``ignore=`` names this tensor key (with or without the prefix) or its module."""
  if not skip:
    return False
  bare = key.removeprefix(PREFIX)
  m = _KEY.fullmatch(bare)
  module = (m.group("module") or m.group("emodule")) if m else bare.rsplit(".", 1)[0]
  return any(r.fullmatch(x) for r in skip for x in (key, bare, module))


def _base_copy_problem(key: str, value: Any, where: tuple, by_path: Mapping[str, Any],
                       target_of) -> str | None:
  """None if a saved ``base_layer`` copy equals the base params, else why not."""
  path, layer = where
  w = by_path[path]
  if not isinstance(w, (np.ndarray, jax.Array)):
    return None  # abstract base params: nothing to compare with
  w = np.asarray(w if layer is None else w[layer])
  x = leaf_from_torch(to_numpy(value), w.shape, leaf_layout(path, target_of(path).layout))
  if x is None:
    return (f"{key}: PEFT saved this module's base weight with shape {to_numpy(value).shape}, "
            f"which does not fit the base params' {path} {w.shape} (a resized vocabulary?); "
            "load that weight into the base params first (lora_jax.interop.load_params)")
  x = x.astype(w.dtype)
  if np.array_equal(x, w):
    return None
  diff = float(np.max(np.abs(x.astype(np.float64) - w.astype(np.float64))))
  return (f"{key}: PEFT saved this module's base weight and it differs from the base "
          f"params' {path} (max |difference| {diff:.3g}); the adapter was trained on "
          "another base (or a resized / retrained embedding): load that weight into the "
          "base params first, or pass ignore=[...] to use yours")


@dataclasses.dataclass
class PeftLoadReport:
  """What ``load_peft_adapter(..., dry_run=True)`` would do; ``print`` it.

  Attributes:
    loaded: ``"flax_path <- torch modules (rank, scale)"`` adapters.
    trained: ``modules_to_save`` leaves that would be replaced.
    skipped: tensor keys skipped (``ignore=``, base copies equal to the base).
    missing: ``"flax_path <- key"`` tensors the config asks for but the file lacks.
    unexpected: tensor keys nothing would take.
    problems: everything else that would raise.
  """

  loaded: list[str]
  trained: list[str]
  skipped: list[str]
  missing: list[str]
  unexpected: list[str]
  problems: list[str]

  @property
  def ok(self) -> bool:
    """Whether loading would succeed."""
    return not (self.missing or self.unexpected or self.problems)

  def __str__(self) -> str:
    lines = [f"PEFT adapter: {'loads' if self.ok else 'would NOT load'}"]
    for name in ("loaded", "trained", "skipped", "missing", "unexpected", "problems"):
      items = getattr(self, name)
      lines.append(f"  {name} ({len(items)}):")
      lines += [f"    {x}" for x in items]
    return "\n".join(lines)


def _fan_in_fan_out_problem(config, per_path, target_of) -> list[str]:
  """PEFT writes ``fan_in_fan_out: true`` for GPT-2 ``Conv1D`` bases (weights
  stored ``(in, out)``); a name map that reads them as Linear loads the base
  transposed (silently, for square weights)."""
  if not config.get("fan_in_fan_out") or not per_path:
    return []
  layouts = {p: target_of(p).layout for p in per_path}
  if any(v == "conv1d" for v in layouts.values()):
    return []
  some = sorted(layouts)[:3]
  return [f"fan_in_fan_out=True: the adapted torch modules are GPT-2 style Conv1D "
          f"(weights stored (in, out)), but the name map reads {some} with layout "
          f"{layouts[some[0]]!r}; give their rules the layout 'conv1d' (and load the "
          "base weights with the same rules)"]


def unpack_peft(config: Mapping[str, Any], tensors: Mapping[str, Any], params: Any,
                name_map: NameMap, *, trace: Callable[[Any], Any] | None = None,
                dtype: Any = None, ignore: Sequence[str] = (), dry_run: bool = False) -> Any:
  """A PEFT adapter (config dict + tensors) on lora_jax params.

  Args:
    config: the ``adapter_config.json`` dict.
    tensors: ``{key: array}`` as in ``adapter_model.safetensors``.
    params: the base params (plain, or with lora_jax nodes: adapters already
      there are replaced, their roles are used).
    name_map: Flax path -> torch key of the *base* model (see
      ``lora_jax.interop.torch``).
    trace: optional ``lambda p: model.apply(p, x)``; only needed when a 3+-D
      kernel's shape splits into PEFT's ``(in, out)`` in several ways (size-1
      axes), and for ``target_parameters`` expert tensors stored
      ``[E, in, out]`` (roles ``"sio"``; HF's ``(E, out, in)`` is the default).
    dtype: dtype of the factors; the kernel's by default.
    ignore: regexes; a tensor whose key (with or without ``base_model.model.``)
      or torch module name ``re.fullmatch``-es one is skipped knowingly, and a
      module matching one is not reported missing.
    dry_run: return a ``PeftLoadReport`` of what would be loaded, skipped,
      missing or refused instead of the params, and raise nothing for
      key problems.

  Returns:
    params with ``LoraWeight`` nodes (and ``Trainable`` for modules_to_save),
    or with ``dry_run`` a ``PeftLoadReport``.

  Raises:
    ValueError: unsupported PEFT features (by name).
    ConversionError: unknown / missing / mis-shaped keys and rank mismatches, all at once.

  Example:
    >>> import numpy as np
    >>> params = {"fc": {"kernel": np.zeros((3, 2), np.float32)}}
    >>> cfg = {"r": 1, "lora_alpha": 2, "target_modules": ["fc"]}
    >>> t = {"base_model.model.fc.lora_A.weight": np.ones((1, 3), np.float32),
    ...      "base_model.model.fc.lora_B.weight": np.ones((2, 1), np.float32)}
    >>> lw = unpack_peft(cfg, t, params, [(r"fc/kernel", "fc.weight")])["fc"]["kernel"]
    >>> lw.a.shape, lw.b.shape, lw.scale
    ((3, 1), (1, 2), 2.0)
  """
  validate_config(config)
  check_config(config)
  base = _base(params)
  leaves, treedef = tree.flatten(base)
  by_path = dict(leaves)
  known_roles = {p: x.roles for p, x in tree.flatten(params, is_leaf=is_node)[0]
                 if isinstance(x, LoraWeight)}
  modules = kernel_modules(base, name_map)
  index = torch_index(base, name_map)
  target_of = as_target_map(name_map)
  skip = [re.compile(p) for p in ignore]
  skipped = [k for k in tensors if _ignored(k, skip)]
  param_roles = dict(known_roles)
  if trace is not None and config.get("target_parameters"):
    traced = layout.infer_roles(trace, base, sorted(param_leaves(base, name_map).values()))
    param_roles = {**traced, **known_roles}
  by_param, consumed, param_problems, param_missing = unpack_params(
      config, {k: v for k, v in tensors.items() if k not in skipped}, base, name_map,
      param_roles, dtype, PREFIX)
  param_missing = [(p, m) for p, m in param_missing if not _ignored(m.split(" ")[0], skip)]
  groups, embedding, other = _parse_keys({k: None for k in tensors
                                          if k not in skipped and k not in consumed})
  rslora = bool(config.get("use_rslora", False))
  dora = bool(config.get("use_dora", False))
  r0, alpha0 = int(config.get("r", 8)), config.get("lora_alpha", 8)
  unexpected, missing, mismatched, problems = [], [], [], []
  saved = [m.removeprefix(PREFIX) for m in config.get("modules_to_save") or ()]

  # modules_to_save: full tensors of whole modules -> Trainable leaves
  trained: dict[str, dict[int | None, np.ndarray]] = collections.defaultdict(dict)
  for key in other:
    bare = key.removeprefix(PREFIX)
    module = bare.rsplit(".", 1)[0]
    copy = _BASE_COPY.fullmatch(bare)
    if copy and copy.expand(r"\1.\2") in index:
      why = _base_copy_problem(key, tensors[key], index[copy.expand(r"\1.\2")], by_path,
                               target_of)
      (problems if why else skipped).append(why or f"{key} (equals the base weight)")
      continue
    if bare in index and any(module.endswith(m) for m in saved):
      path, layer = index[bare]
      trained[path][layer] = key
    else:
      unexpected.append(key)

  # which modules PEFT would adapt, and which the file adapts
  per_path: dict[str, dict[int | None, str]] = collections.defaultdict(dict)
  fused = fused_keys(base, name_map)
  for module, kinds in groups.items():
    if f"{module}.weight" in fused:
      problems.append(f"{module}: has LoRA tensors, but its weight is fused and split over "
                      f"Flax leaves {fused[module + '.weight']} (rules with part=); an "
                      "adapter on a fused weight cannot be split: keep that weight whole "
                      "in Flax (one kernel)")
      continue
    if module not in modules:
      unexpected += sorted(kinds.values())
      continue
    if not is_targeted(config, module):
      problems.append(f"{module}: has LoRA tensors but target_modules="
                      f"{config.get('target_modules')!r} does not select it")
      continue
    for kind in "AB":
      if kind not in kinds:
        other_kind = "lora_embedding_" if module in embedding else "lora_"
        missing.append((modules[module][0], f"{module}.{other_kind}{kind}"))
    path, layer = modules[module]
    per_path[path][layer] = module
  for module, (path, layer) in modules.items():
    if module not in groups and is_targeted(config, module) and not _ignored(module, skip):
      missing.append((path, f"{module}.lora_A / lora_B (targeted by target_modules)"))

  problems += _fan_in_fan_out_problem(config, per_path, target_of) + param_problems
  missing += param_missing
  inferred = {}
  if trace is not None:
    inferred = layout.infer_roles(trace, base, sorted(per_path))
  out = dict(leaves)
  init = config.get("init_lora_weights", True)
  residual: dict[str, Any] = {}  # path -> base kernel after PiSSA / OLoRA
  for path, layers in per_path.items():
    w = by_path[path]
    stacked = next(iter(layers)) is not None
    roles = known_roles.get(path) or inferred.get(path)
    if roles is not None and stacked:
      if not roles.startswith("s") or "s" in roles[1:]:
        problems.append(f"{path}: roles {roles!r} do not fit a stacked ({LAYER}) torch key")
        continue
      roles = roles[1:]
    elif roles is not None and "s" in roles:
      problems.append(f"{path}: roles {roles!r} have a stacked axis but the name map "
                      f"key has no {LAYER}")
      continue
    shape = tuple(w.shape[1:] if stacked else w.shape)
    parts = [None] * (w.shape[0] if stacked else 1)
    mags = [None] * len(parts)  # DoRA: PEFT's lora_magnitude_vector per layer
    for layer, module in layers.items():
      kinds = groups[module]
      if not {"A", "B"} <= set(kinds):
        continue
      if "M" in kinds and not dora:  # reported; A and B still checked
        unexpected.append(kinds["M"])
      if dora and "M" not in kinds:
        missing.append((path, f"{module}.lora_magnitude_vector (use_dora=True)"))
        continue
      if dora and (module in embedding or to_numpy(tensors[kinds["A"]]).ndim != 2):
        problems.append(f"{module}: DoRA on an embedding or conv module is not supported "
                        "(lora_jax's DoRA covers Linear modules); leave it out of "
                        "target_modules")
        continue
      if dora:
        mags[layer or 0] = to_numpy(tensors[kinds["M"]]).astype(np.float32)
      A = to_numpy(tensors[kinds["A"]])
      B = to_numpy(tensors[kinds["B"]])
      r = int(pattern_value(config.get("rank_pattern"), module, r0))
      alpha = float(pattern_value(config.get("alpha_pattern"), module, alpha0))
      if A.shape[0] != r:
        problems.append(f"{kinds['A']}: rank {A.shape[0]}, but the config gives "
                        f"{module} rank {r} (r / rank_pattern)")
        continue
      got = _factors(A, B, shape, roles)
      if isinstance(got, str):
        mismatched.append((path, module, f"{got}"))
        continue
      parts[layer or 0] = got + (_scale(alpha, r, rslora),)
      if init in REDONE_INITS:
        why = _redo_init(residual, path, module, w, layer, got[2], r, parts[layer or 0][3],
                         init, module in embedding or A.ndim != 2)
        if why:
          problems.append(why)
    if any(p is None for p in parts) and not stacked:
      continue
    if all(p is None for p in parts):
      continue
    if stacked:
      a, b, full_roles, scale = _stack(parts, w.shape[0], shape)
    else:
      a, b, full_roles, scale = parts[0]
    fdtype = dtype or w.dtype
    w = residual.get(path, w)
    out[path] = LoraWeight(w, jnp.asarray(a, fdtype), jnp.asarray(b, fdtype), scale=scale,
                           roles=full_roles, dropout=float(config.get("lora_dropout", 0.0)))
    if dora:
      m, why = _magnitude(out[path], mags, stacked, path)
      if why:
        problems.append(why)
        del out[path]
        continue
      out[path] = out[path].replace(m=jnp.asarray(m, fdtype))

  out.update(by_param)  # target_parameters (MoE experts), see peft_params
  for path, layers in trained.items():
    w = by_path[path]
    stacked = next(iter(layers)) is not None
    n = w.shape[0] if stacked else 1
    if set(layers) != (set(range(n)) if stacked else {None}):
      missing.append((path, f"modules_to_save tensors for layers "
                            f"{sorted(set(range(n)) - set(layers))}"))
      continue
    torch_layout = leaf_layout(path, target_of(path).layout)  # not `layout`: the module
    shape = tuple(w.shape[1:] if stacked else w.shape)
    vals = []
    for layer in (range(n) if stacked else [None]):
      x = to_numpy(tensors[layers[layer]])
      v = leaf_from_torch(x, shape, torch_layout)
      if v is None:
        mismatched.append((path, layers[layer], f"torch {x.shape} does not convert to {shape}"))
        break
      vals.append(v)
    else:
      value = np.stack(vals) if stacked else vals[0]
      out[path] = Trainable(jnp.asarray(value, w.dtype), w)

  problems += [f"{p} <- {m}: {why}" for p, m, why in mismatched]
  init = config.get("init_lora_weights", True)
  if init in REDONE_INITS and by_param:
    problems.append(f"init_lora_weights={init!r} with target_parameters "
                    f"{sorted(by_param)}: redoing {init} on 3-D expert parameters is not "
                    "supported; convert the adapter in PEFT first")
  if dry_run:
    sources = {p: ", ".join(sorted(m.values())) for p, m in per_path.items()}
    sources.update({p: k for k, p in param_leaves(base, name_map).items() if p in by_param})
    return PeftLoadReport(
        loaded=[f"{p} <- {sources[p]} (rank {x.rank}, "
                f"scale {x.scale:g})" for p, x in out.items() if isinstance(x, LoraWeight)],
        trained=[f"{p} <- {', '.join(sorted(trained[p].values()))}"
                 for p, x in out.items() if isinstance(x, Trainable)],
        skipped=skipped, missing=[f"{p} <- {k}" for p, k in missing],
        unexpected=unexpected, problems=problems)
  if unexpected or missing or problems:
    raise ConversionError("load_peft_adapter", unexpected=unexpected, missing=missing,
                          other=problems)
  return jax.tree_util.tree_unflatten(treedef, [out[p] for p, _ in leaves])
