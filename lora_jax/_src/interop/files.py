"""Torch weight files <-> state dicts: the thin I/O layer around ``convert.py``.

Reads safetensors (a file, a sharded index or a directory; lazily, key by
key) and ``.bin``/``.pt`` only through ``torch.load(weights_only=True)``;
writes safetensors with ``{"format": "pt"}`` metadata, optionally sharded.
"""

import importlib
import json
import os
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from lora_jax._src.interop.convert import pack_state_dict, unpack_state_dict
from lora_jax._src.interop.names import NameMap
from lora_jax._src.interop.tensors import to_numpy

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_FILES = (".bin", ".pt", ".pth")


class SafetensorsDict(Mapping):
  """A read-only ``{key: np.ndarray}`` over safetensors files, read lazily.

  Each ``[key]`` reads one tensor (``safe_open(framework="np")``), so loading
  a sharded checkpoint never holds more than the converted params plus one
  tensor.
  """

  def __init__(self, files: Sequence[str]):
    self._where: dict[str, str] = {}
    self.metadata: dict[str, str] = {}
    for f in files:
      with _open_safetensors(f) as h:
        self.metadata.update(h.metadata() or {})
        for k in h.keys():
          self._where[k] = f

  def __getitem__(self, key: str) -> np.ndarray:
    f = self._where[key]
    with _open_safetensors(f) as h:
      try:
        return h.get_tensor(key)
      except Exception as e:  # SafetensorError: the data does not fit the header
        raise _damaged(f, f"reading tensor {key!r}", e) from e

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, key: object) -> bool:
    return key in self._where


def _damaged(path: str, what: str, e: Exception) -> ValueError:
  return ValueError(f"read_state_dict: {path} is not a valid safetensors file ({what} "
                    f"failed: {type(e).__name__}: {e}); the file is truncated or damaged: "
                    "download or write it again")


def _require(module: str, what: str):
  """Import an optional dependency, or say which extra installs it."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    top = module.split(".")[0]
    raise ModuleNotFoundError(
        f"{what} needs the {top} package, which is not installed. Install lora_jax's "
        f"'torch' extra: pip install 'lora_jax[torch]' (for PyTorch's CPU build, first "
        "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)",
        name=top) from e


def _open_safetensors(path: str):
  """``safe_open(path)``, with errors that name the file."""
  safe_open = _require("safetensors", f"reading {path}").safe_open
  if not os.path.isfile(path):
    raise FileNotFoundError(f"read_state_dict: {path} does not exist (or is not a file)")
  try:
    return safe_open(path, framework="np")
  except Exception as e:  # SafetensorError, OSError, ...: all mean a bad file here
    raise _damaged(path, "reading the header", e) from e


def read_json(path: str, what: str) -> Any:
  """A JSON file, with errors that name it (and the line and column)."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{what}: {path} is not valid JSON (line {e.lineno}, column "
                     f"{e.colno}: {e.msg})") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{what}: {path} is not valid JSON (not UTF-8 text: {e})") from e


def _weight_map(path: str) -> dict[str, str]:
  index = read_json(path, "read_state_dict")
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise ValueError(f"read_state_dict: {path} has no 'weight_map' of "
                     "{tensor key: shard file name}; found "
                     f"{type(weight_map).__name__ if weight_map is not None else 'none'}")
  return weight_map


def _torch_load(path: str) -> dict[str, np.ndarray]:
  torch = _require("torch", f"reading {path}")
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"read_state_dict: cannot read {path} with torch.load(weights_only="
                     f"True) ({type(e).__name__}: {str(e)[:300]}); the file is truncated, "
                     "damaged or holds more than tensors") from e
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
    weight_map = _weight_map(path)
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
  save_file = _require("safetensors.numpy", "write_state_dict").save_file
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
