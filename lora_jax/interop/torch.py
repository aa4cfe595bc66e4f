"""PyTorch / safetensors weights <-> Flax params.

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
leaf with no torch counterpart. It is a callable or a list of
``(regex, replacement)`` rules: the first regex that ``re.fullmatch``-es the
path wins and ``match.expand(replacement)`` gives the key. A key holding
``{layer}`` (``LAYER``) names a *stacked* leaf (``nn.scan``): its leading axis
gathers the torch tensors with ``{layer}`` = 0, 1, ..., L - 1.

**Conversions** are chosen from the Flax leaf's name and the shapes:

===========================  ======================  =========================
Flax leaf                    torch tensor            conversion
===========================  ======================  =========================
``.../kernel`` (in, out)     Linear (out, in)        transpose
``.../kernel`` (d, h, hd)    Linear (h*hd, d)        transpose, reshape
``.../kernel`` (h, hd, d)    Linear (d, h*hd)        transpose, reshape
``.../kernel`` (kh, kw, I, O)  Conv (O, I, kh, kw)   move axes (any # spatial)
anything else                same shape              as is (``embedding``,
                                                     ``scale``, ``bias``, ...)
``bias`` etc. (h, hd)        1-D (h*hd,)             reshape
===========================  ======================  =========================

``ConvTranspose`` kernels (spatially flipped in Flax) are not converted.

This module imports torch only inside the functions that need it.
"""

import json
import os
import re
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lora_jax._src import tree
from lora_jax._src.weight import is_node

LAYER = "{layer}"
NameMap = Union[Callable[[str], Union[str, None]], Sequence[tuple[str, str]]]
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_FILES = (".bin", ".pt", ".pth")
_SHOW = 50


# --- name maps ----------------------------------------------------------------

def as_name_map(spec: NameMap) -> Callable[[str], str | None]:
  """Normalise a name map (callable or ``(regex, replacement)`` rules).

  Args:
    spec: a callable ``path -> key | None`` (returned as is), or a sequence of
      ``(regex, replacement)`` pairs; the first regex that fullmatches the path
      gives ``match.expand(replacement)``; no match gives ``None``.

  Returns:
    A callable ``path -> torch key | None``.

  Example:
    >>> m = as_name_map([(r"layers_(\\d+)/dense/kernel", r"blocks.\\1.fc.weight")])
    >>> m("layers_2/dense/kernel"), m("other")
    ('blocks.2.fc.weight', None)
  """
  if callable(spec):
    return spec
  try:
    rules = [(re.compile(p), r) for p, r in spec]
  except (TypeError, ValueError, re.error) as e:
    raise TypeError("name_map must be a callable path -> key, or a list of "
                    f"(regex, replacement) pairs; got {spec!r} ({e})") from e

  def name(path: str) -> str | None:
    for pattern, replacement in rules:
      m = pattern.fullmatch(path)
      if m:
        return m.expand(replacement)
    return None

  return name


def torch_keys(key: str, shape: Sequence[int]) -> list[str]:
  """The torch keys behind one Flax leaf: ``[key]``, or one per layer.

  Example:
    >>> torch_keys("h.{layer}.w", (3, 4, 4))
    ['h.0.w', 'h.1.w', 'h.2.w']
  """
  if LAYER not in key:
    return [key]
  if not shape:
    raise ValueError(f"torch key {key!r} is stacked ({LAYER}) but the leaf is a scalar")
  return [key.replace(LAYER, str(i)) for i in range(shape[0])]


def torch_index(template: Any, name_map: NameMap) -> dict[str, tuple[str, int | None]]:
  """``{torch_key: (flax_path, layer)}`` for every tensor the template takes.

  The inverse view of a name map, for code that starts from torch keys (e.g.
  a PEFT adapter's ``...q_proj.lora_A.weight``: look up ``...q_proj.weight``).
  ``layer`` is the index along a stacked leaf's leading axis, else None.

  Example:
    >>> import jax, numpy as np
    >>> t = {"h": {"kernel": jax.ShapeDtypeStruct((2, 4, 4), np.float32)}}
    >>> torch_index(t, [(r"h/kernel", "h.{layer}.weight")])["h.1.weight"]
    ('h/kernel', 1)
  """
  name = as_name_map(name_map)
  out = {}
  for path, leaf in tree.flatten(template, is_leaf=is_node)[0]:
    key = name(path)
    if key is None:
      continue
    stacked = LAYER in key
    for n, k in enumerate(torch_keys(key, tuple(leaf.shape))):
      out[k] = (path, n if stacked else None)
  return out


# --- single-tensor conversions -------------------------------------------------

def _splits(shape: Sequence[int], n_in: int, n_out: int) -> int | None:
  """The k with prod(shape[:k]) == n_in and prod(shape[k:]) == n_out."""
  for k in range(1, len(shape)):
    if np.prod(shape[:k]) == n_in and np.prod(shape[k:]) == n_out:
      return k
  return None


def kernel_from_torch(w: np.ndarray, shape: Sequence[int]) -> np.ndarray | None:
  """A torch Linear / Conv weight as a Flax kernel of ``shape``, or None.

  Linear ``(out, in)`` becomes ``(in, out)``, reshaped when ``shape`` splits
  ``in`` and ``out`` into several axes (DenseGeneral). Conv ``(O, I, *k)``
  becomes ``(*k, I, O)``.

  Example:
    >>> import numpy as np
    >>> w = np.arange(24.).reshape(6, 4)            # q_proj (heads*hd, d)
    >>> kernel_from_torch(w, (4, 2, 3)).shape       # DenseGeneral (d, heads, hd)
    (4, 2, 3)
    >>> kernel_from_torch(np.zeros((8, 3, 5, 5)), (5, 5, 3, 8)).shape
    (5, 5, 3, 8)
  """
  shape = tuple(shape)
  if w.ndim == 2:
    k = w.T
    if k.shape == shape:
      return k
    if _splits(shape, *k.shape) is not None:
      return k.reshape(shape)
    return None
  if w.ndim >= 3 and len(shape) == w.ndim:
    k = np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))
    return k if k.shape == shape else None
  return None


def kernel_to_torch(k: np.ndarray, torch_shape: Sequence[int] | None = None) -> np.ndarray:
  """A Flax kernel as a torch Linear ``(out, in)`` or Conv ``(O, I, *k)`` weight.

  Args:
    k: the kernel.
    torch_shape: the torch weight's shape. Needed for kernels of 3+ axes,
      which may be a DenseGeneral (a 2-D Linear in torch) or a conv.

  Example:
    >>> import numpy as np
    >>> kernel_to_torch(np.zeros((4, 2, 3)), (6, 4)).shape
    (6, 4)
    >>> kernel_to_torch(np.zeros((5, 5, 3, 8))  , (8, 3, 5, 5)).shape
    (8, 3, 5, 5)
  """
  if torch_shape is None:
    if k.ndim != 2:
      raise ValueError(
          f"kernel of shape {k.shape} is ambiguous (DenseGeneral or conv); "
          "pass shapes={torch_key: torch_shape}")
    return k.T
  torch_shape = tuple(torch_shape)
  if len(torch_shape) == 2:
    n_out, n_in = torch_shape
    if _splits(k.shape, n_in, n_out) is None and k.shape != (n_in, n_out):
      raise ValueError(f"kernel of shape {k.shape} cannot be a torch Linear "
                       f"weight of shape {torch_shape}")
    return k.reshape(n_in, n_out).T
  w = np.transpose(k, (k.ndim - 1, k.ndim - 2) + tuple(range(k.ndim - 2)))
  if w.shape != torch_shape:
    raise ValueError(f"kernel of shape {k.shape} cannot be a torch conv weight "
                     f"of shape {torch_shape}")
  return w


def _from_torch(w: np.ndarray, shape: tuple, is_kernel: bool) -> np.ndarray | None:
  if is_kernel and w.ndim >= 2:
    return kernel_from_torch(w, shape)
  if w.shape == shape:
    return w
  if w.ndim == 1 and w.size == np.prod(shape, dtype=int):
    return w.reshape(shape)
  return None


def _to_torch(x: np.ndarray, is_kernel: bool, torch_shape) -> np.ndarray:
  if is_kernel and x.ndim >= 2:
    return kernel_to_torch(x, torch_shape)
  if torch_shape is not None and tuple(torch_shape) != x.shape:
    if x.size != np.prod(torch_shape, dtype=int):
      raise ValueError(f"leaf of shape {x.shape} cannot be a torch tensor of "
                       f"shape {tuple(torch_shape)}")
    return x.reshape(torch_shape)
  return x


_TORCH_VIEWS = {  # torch dtypes numpy lacks: reinterpret the bits
    "bfloat16": ("int16", ml_dtypes.bfloat16),
    "float8_e4m3fn": ("int8", ml_dtypes.float8_e4m3fn),
    "float8_e5m2": ("int8", ml_dtypes.float8_e5m2),
}


def to_numpy(x: Any) -> np.ndarray:
  """A torch tensor (any device, bfloat16 included) or array-like as numpy.

  Example:
    >>> to_numpy([1.0, 2.0]).dtype
    dtype('float64')
  """
  if type(x).__module__.split(".")[0] == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    x = x.detach().cpu()
    name = str(x.dtype).removeprefix("torch.")
    if name in _TORCH_VIEWS:
      bits, dtype = _TORCH_VIEWS[name]
      return x.view(getattr(torch, bits)).numpy().view(dtype)
    return x.numpy()
  if isinstance(x, jax.Array):
    return np.asarray(jax.device_get(x))
  return np.asarray(x)


# --- errors -------------------------------------------------------------------

def _listing(title: str, items: list[str]) -> str:
  shown = "".join(f"\n    {s}" for s in items[:_SHOW])
  more = f"\n    ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
  return f"\n  {title} ({len(items)}):{shown}{more}"


class ConversionError(ValueError):
  """Keys that did not line up, all of them, in one error.

  Attributes:
    unmapped: Flax paths the name map sent to no torch key.
    missing: ``(flax_path, torch_key)`` pairs whose torch key is absent.
    unexpected: torch keys no Flax leaf asked for.
    mismatched: ``(flax_path, torch_key, torch_shape, flax_shape)``.
  """

  def __init__(self, where: str, *, unmapped=(), missing=(), unexpected=(),
               mismatched=(), other=()):
    self.unmapped, self.missing = list(unmapped), list(missing)
    self.unexpected, self.mismatched = list(unexpected), list(mismatched)
    self.other = list(other)
    msg = f"{where}: the weights do not line up with the Flax params."
    if self.unmapped:
      msg += _listing("Flax leaves the name map maps to no torch key", self.unmapped)
    if self.missing:
      msg += _listing("missing torch keys (flax path <- torch key)",
                      [f"{p} <- {k}" for p, k in self.missing])
    if self.unexpected:
      msg += _listing("unexpected torch keys (no Flax leaf maps to them; "
                      "pass ignore=[regex] to skip)", self.unexpected)
    if self.mismatched:
      msg += _listing("shape mismatches", [
          f"{p} <- {k}: torch {tuple(ts)} does not convert to Flax {tuple(fs)}"
          for p, k, ts, fs in self.mismatched])
    if self.other:
      msg += _listing("other problems", self.other)
    super().__init__(msg)


# --- torch -> flax --------------------------------------------------------------

def _target_dtype(policy: Any, leaf: Any, value: np.ndarray):
  if isinstance(policy, str) and policy == "template":
    return leaf.dtype
  if isinstance(policy, str) and policy == "keep":
    return value.dtype
  return jnp.dtype(policy)


def _place(value: np.ndarray, leaf: Any, policy: Any) -> jax.Array:
  value = value.astype(_target_dtype(policy, leaf, value), copy=False)
  sharding = getattr(leaf, "sharding", None)
  if sharding is not None:
    return jax.device_put(value, sharding)
  return jnp.asarray(value)


def _check_policy(dtype: Any) -> None:
  if isinstance(dtype, str) and dtype in ("template", "keep"):
    return
  try:
    jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"dtype must be 'template', 'keep' or a dtype; got {dtype!r}") from e


def unpack_state_dict(state_dict: Mapping[str, Any], template: Any,
                      name_map: NameMap, *, dtype: Any = "template",
                      strict: bool = True, ignore: Sequence[str] = ()) -> Any:
  """Torch-style state dict -> Flax params shaped like ``template``.

  Args:
    state_dict: ``{torch_key: tensor}``, torch tensors or numpy arrays (or a
      lazy mapping from ``read_state_dict``).
    template: the Flax params tree, arrays or ``jax.ShapeDtypeStruct`` (e.g.
      ``jax.eval_shape(model.init, key, x)["params"]``); its shapes decide
      the conversions, its dtypes the ``"template"`` dtype policy and its
      shardings (where set) where each leaf is placed.
    name_map: Flax path -> torch key (see the module docstring).
    dtype: ``"template"`` casts to each template leaf's dtype; ``"keep"``
      keeps the torch dtype; a dtype casts everything to it.
    strict: raise one ``ConversionError`` listing every unmapped, missing,
      unexpected and mis-shaped key. With ``strict=False`` unexpected keys
      are skipped and leaves that could not be loaded keep the template's
      value (a warning lists them; abstract template leaves still raise).
    ignore: regexes (fullmatch) of torch keys to skip silently.

  Returns:
    Params with the template's structure.

  Raises:
    ConversionError: on any problem, listing all of them.

  Example:
    >>> import jax, numpy as np
    >>> template = {"fc": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32),
    ...                    "bias": jax.ShapeDtypeStruct((2,), np.float32)}}
    >>> sd = {"fc.weight": np.ones((2, 3)), "fc.bias": np.zeros(2)}
    >>> p = unpack_state_dict(sd, template, [(r"fc/kernel", "fc.weight"),
    ...                                      (r"fc/bias", "fc.bias")])
    >>> p["fc"]["kernel"].shape, p["fc"]["kernel"].dtype
    ((3, 2), dtype('float32'))
  """
  _check_policy(dtype)
  name = as_name_map(name_map)
  skip = [re.compile(p) for p in ignore]
  leaves, treedef = tree.flatten(template)
  used: set[str] = set()
  unmapped, missing, mismatched, out = [], [], [], []
  for path, leaf in leaves:
    out.append(None)
    key = name(path)
    if key is None:
      unmapped.append(path)
      continue
    shape = tuple(leaf.shape)
    keys = torch_keys(key, shape)
    absent = [k for k in keys if k not in state_dict]
    missing += [(path, k) for k in absent]
    used.update(keys)
    if absent:
      continue
    per = shape[1:] if LAYER in key else shape
    is_kernel = path.rsplit("/", 1)[-1] == "kernel"
    parts = []
    for k in keys:
      w = to_numpy(state_dict[k])
      v = _from_torch(w, per, is_kernel)
      if v is None:
        mismatched.append((path, k, w.shape, per))
        break
      parts.append(v)
    else:
      value = np.stack(parts) if LAYER in key else parts[0]
      out[-1] = _place(value, leaf, dtype)
  unexpected = [k for k in state_dict
                if k not in used and not any(r.fullmatch(k) for r in skip)]
  problems = dict(unmapped=unmapped, missing=missing, mismatched=mismatched)
  if strict and (unmapped or missing or mismatched or unexpected):
    raise ConversionError("unpack_state_dict", unexpected=unexpected, **problems)
  failed = [k for k, x in enumerate(out) if x is None]
  if failed:
    if any(not isinstance(leaves[k][1], (jax.Array, np.ndarray)) for k in failed):
      raise ConversionError("unpack_state_dict (abstract template leaves cannot "
                            "be kept)", **problems)
    warnings.warn(str(ConversionError("unpack_state_dict: kept the template value "
                                      "for", **problems)), stacklevel=2)
    for k in failed:
      out[k] = jnp.asarray(leaves[k][1])
  return jax.tree_util.tree_unflatten(treedef, out)


# --- flax -> torch --------------------------------------------------------------

def pack_state_dict(params: Any, name_map: NameMap, *,
                    shapes: Mapping[str, Sequence[int]] | None = None,
                    dtype: Any = None, strict: bool = True) -> dict[str, np.ndarray]:
  """Flax params -> torch-style state dict of (C-contiguous) numpy arrays.

  Args:
    params: plain Flax params (``lora_jax.merge`` adapters in first).
    name_map: Flax path -> torch key (see the module docstring).
    shapes: ``{torch_key: shape}`` of the torch tensors, e.g.
      ``{k: v.shape for k, v in torch_model.state_dict().items()}``. Needed
      only for kernels of 3+ axes (DenseGeneral vs conv).
    dtype: cast every tensor to this dtype (default: keep).
    strict: raise for leaves the name map sends nowhere; ``False`` skips them.

  Returns:
    ``{torch_key: np.ndarray}``.

  Example:
    >>> import numpy as np
    >>> params = {"fc": {"kernel": np.ones((3, 2), np.float32)}}
    >>> pack_state_dict(params, [(r"fc/kernel", "fc.weight")])["fc.weight"].shape
    (2, 3)
  """
  name = as_name_map(name_map)
  shapes = shapes or {}
  out: dict[str, np.ndarray] = {}
  unmapped, other = [], []
  for path, leaf in tree.flatten(params, is_leaf=is_node)[0]:
    if is_node(leaf):
      raise TypeError(f"pack_state_dict: {path} holds a {type(leaf).__name__}; "
                      "fold adapters in with lora_jax.merge(params) first")
    key = name(path)
    if key is None:
      unmapped.append(path)
      continue
    x = to_numpy(leaf)
    if dtype is not None:
      x = x.astype(jnp.dtype(dtype))
    keys = torch_keys(key, x.shape)
    is_kernel = path.rsplit("/", 1)[-1] == "kernel"
    for k, part in zip(keys, list(x) if LAYER in key else [x]):
      if k in out:
        other.append(f"{path} -> {k}: two Flax leaves map to this key")
        continue
      try:
        out[k] = np.ascontiguousarray(_to_torch(part, is_kernel, shapes.get(k)))
      except ValueError as e:
        other.append(f"{path} -> {k}: {e}")
  if other or (strict and unmapped):
    raise ConversionError("pack_state_dict", unmapped=unmapped if strict else (),
                          other=other)
  return out


# --- files ----------------------------------------------------------------------

class SafetensorsDict(Mapping):
  """A read-only ``{key: np.ndarray}`` over safetensors files, read lazily.

  Each ``[key]`` reads one tensor (``safe_open(framework="np")``), so loading
  a sharded checkpoint never holds more than the converted params plus one
  tensor.
  """

  def __init__(self, files: Sequence[str]):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._where: dict[str, str] = {}
    self.metadata: dict[str, str] = {}
    for f in files:
      with safe_open(f, framework="np") as h:
        self.metadata.update(h.metadata() or {})
        for k in h.keys():
          self._where[k] = f

  def __getitem__(self, key: str) -> np.ndarray:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(self._where[key], framework="np") as h:
      return h.get_tensor(key)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, key: object) -> bool:
    return key in self._where


def _torch_load(path: str) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
  if not isinstance(sd, Mapping):
    raise ValueError(f"read_state_dict: {path} holds a {type(sd).__name__}, not a state dict")
  return {k: to_numpy(v) for k, v in sd.items()}


def _find_weights(directory: str) -> str:
  names = sorted(os.listdir(directory))
  for n in (SAFETENSORS_INDEX, SAFETENSORS, "pytorch_model.bin.index.json",
            "pytorch_model.bin"):
    if n in names:
      return os.path.join(directory, n)
  single = [n for n in names if n.endswith(".safetensors")]
  if len(single) == 1:
    return os.path.join(directory, single[0])
  raise FileNotFoundError(
      f"read_state_dict: no {SAFETENSORS}, {SAFETENSORS_INDEX} or single "
      f"*.safetensors file in {directory}; it holds {names}")


def read_state_dict(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
  """Read torch weights from disk without running any pickled code.

  Args:
    path: a ``.safetensors`` file; a ``*.index.json`` of shards; a directory
      holding either (``model.safetensors.index.json`` first); or a
      ``.bin``/``.pt``/``.pth`` file, read with ``torch.load(weights_only=True)``.

  Returns:
    ``{key: np.ndarray}`` (safetensors are read lazily, key by key).

  Example:
    >>> import numpy as np, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = write_state_dict({"w": np.ones((2, 2), np.float32)}, d)
    >>> dict(read_state_dict(d))["w"].shape
    (2, 2)
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = _find_weights(path)
  if path.endswith(".json"):
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    base = os.path.dirname(path)
    files = sorted({os.path.join(base, f) for f in weight_map.values()})
    if all(f.endswith(".safetensors") for f in files):
      return SafetensorsDict(files)
    out = {}
    for f in files:
      out.update(read_state_dict(f))
    return out
  if path.endswith(".safetensors"):
    return SafetensorsDict([path])
  if path.endswith(_TORCH_FILES):
    return _torch_load(path)
  raise ValueError(f"read_state_dict: don't know how to read {path}; expected "
                   ".safetensors, an index .json, a directory or .bin/.pt/.pth")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _bytes(size: int | str) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
  if not m:
    raise ValueError(f"max_shard_size: cannot read {size!r}; use bytes or '5GB', '200MB'")
  return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _shards(state: dict[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
  shards, current, size = [], {}, 0
  for k, v in state.items():
    if current and size + v.nbytes > limit:
      shards.append(current)
      current, size = {}, 0
    current[k] = v
    size += v.nbytes
  return shards + [current] if current else shards


def write_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike, *,
                     max_shard_size: int | str | None = None,
                     metadata: Mapping[str, str] | None = None) -> list[str]:
  """Write a state dict as safetensors that ``transformers`` / torch read.

  Args:
    state_dict: ``{key: array or torch tensor}``.
    path: a directory (written as ``model.safetensors``, or shards
      ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``)
      or a ``*.safetensors`` file path (a single file).
    max_shard_size: bytes (or ``"5GB"``, ``"200KB"``) per shard; None: one file.
    metadata: extra string metadata; ``{"format": "pt"}`` is always set.

  Returns:
    The paths written.

  Example:
    >>> import numpy as np, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> sd = {f"w{i}": np.ones(256, np.float32) for i in range(3)}
    >>> sorted(os.path.basename(p) for p in write_state_dict(sd, d, max_shard_size=2048))
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  meta = {**(metadata or {}), "format": "pt"}
  state = {k: np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    if max_shard_size is not None:
      raise ValueError("write_state_dict: sharding needs a directory path")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(state, path, metadata=meta)
    return [path]
  os.makedirs(path, exist_ok=True)
  shards = [state] if max_shard_size is None else _shards(state, _bytes(max_shard_size))
  if len(shards) <= 1:
    file = os.path.join(path, SAFETENSORS)
    save_file(state, file, metadata=meta)
    return [file]
  written, weight_map = [], {}
  for n, shard in enumerate(shards, 1):
    file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, file), metadata=meta)
    written.append(os.path.join(path, file))
    weight_map.update({k: file for k in shard})
  index = os.path.join(path, SAFETENSORS_INDEX)
  total = sum(v.nbytes for v in state.values())
  with open(index, "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return written + [index]


def load_params(source: str | os.PathLike | Mapping[str, Any], template: Any,
                name_map: NameMap, **kwargs) -> Any:
  """``read_state_dict`` (when ``source`` is a path) then ``unpack_state_dict``.

  Example:
    >>> import jax, numpy as np, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = write_state_dict({"fc.weight": np.ones((2, 3), np.float32)}, d)
    >>> t = {"fc": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32)}}
    >>> load_params(d, t, [(r"fc/kernel", "fc.weight")])["fc"]["kernel"].shape
    (3, 2)
  """
  state = source if isinstance(source, Mapping) else read_state_dict(source)
  return unpack_state_dict(state, template, name_map, **kwargs)


def save_params(params: Any, path: str | os.PathLike, name_map: NameMap, *,
                shapes: Mapping[str, Sequence[int]] | None = None,
                dtype: Any = None, max_shard_size: int | str | None = None,
                metadata: Mapping[str, str] | None = None) -> list[str]:
  """``pack_state_dict`` then ``write_state_dict``; returns the paths written.

  Example:
    >>> import numpy as np, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> p = {"fc": {"kernel": np.ones((3, 2), np.float32)}}
    >>> [os.path.basename(f) for f in save_params(p, d, [(r"fc/kernel", "fc.weight")])]
    ['model.safetensors']
  """
  state = pack_state_dict(params, name_map, shapes=shapes, dtype=dtype)
  return write_state_dict(state, path, max_shard_size=max_shard_size, metadata=metadata)
