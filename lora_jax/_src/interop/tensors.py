"""Single-tensor conversions between torch and Flax layouts (pure, numpy).

Kernels: Linear ``(out, in)`` <-> ``(in, out)`` (reshaped for DenseGeneral),
Conv ``(O, I, *k)`` <-> ``(*k, I, O)``; other leaves keep their shape or are
reshaped from / to 1-D. ``to_numpy`` reads torch tensors (bfloat16 and
float8 included) without importing torch unless given one.
"""

from typing import Any, Sequence

import jax
import ml_dtypes
import numpy as np


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


def _as_is(w: np.ndarray, shape: tuple) -> np.ndarray | None:
  """``w`` itself, or reshaped when its axes merge or split in order into ``shape``."""
  if w.shape == shape:
    return w
  if w.ndim == 1 and w.size == np.prod(shape, dtype=int):
    return w.reshape(shape)
  if w.ndim == 2 and _splits(shape, *w.shape) is not None:
    return w.reshape(shape)
  return None


def leaf_from_torch(w: np.ndarray, shape: tuple, layout: str) -> np.ndarray | None:
  """Any leaf from its torch tensor, or None if none fits.

  Args:
    w: the torch tensor (numpy).
    shape: the Flax leaf's shape.
    layout: ``"transposed"`` (a Linear / Conv weight; 1-D tensors as is),
      ``"as_is"`` or ``"conv1d"`` (see ``lora_jax.interop.Rule``).

  Example:
    >>> import numpy as np
    >>> w = np.arange(6.).reshape(2, 3)
    >>> leaf_from_torch(w, (3, 2), "transposed").shape, leaf_from_torch(w, (2, 3), "conv1d").shape
    ((3, 2), (2, 3))
  """
  if layout == "transposed" and w.ndim >= 2:
    return kernel_from_torch(w, shape)
  return _as_is(w, tuple(shape))


def leaf_to_torch(x: np.ndarray, layout: str, torch_shape) -> np.ndarray:
  """Any leaf as its torch tensor (``torch_shape`` when known); ValueError if it cannot be.

  Example:
    >>> import numpy as np
    >>> leaf_to_torch(np.zeros((3, 2)), "transposed", None).shape
    (2, 3)
    >>> leaf_to_torch(np.zeros((4, 2, 3)), "conv1d", (4, 6)).shape
    (4, 6)
  """
  if layout == "transposed" and x.ndim >= 2:
    return kernel_to_torch(x, torch_shape)
  if torch_shape is not None and tuple(torch_shape) != x.shape:
    if x.size != np.prod(torch_shape, dtype=int):
      raise ValueError(f"leaf of shape {x.shape} cannot be a torch tensor of "
                       f"shape {tuple(torch_shape)}")
    return x.reshape(torch_shape)
  if layout == "conv1d" and x.ndim > 2:
    raise ValueError(f"kernel of shape {x.shape} with layout 'conv1d' is ambiguous "
                     "((in, out) split where?); pass shapes={torch_key: torch_shape}")
  return x


def part_axis(layout: str) -> int:
  """The torch output axis a fused tensor is sliced along: 0 for Linear weights, else -1."""
  return 0 if layout == "transposed" else -1


def take_part(w: np.ndarray, part: tuple[int, int], layout: str) -> np.ndarray | None:
  """Slice ``i`` of ``n`` of a fused torch tensor along its output axis, or None.

  Example:
    >>> import numpy as np
    >>> take_part(np.arange(6.), (1, 3), "as_is")
    array([2., 3.])
  """
  i, n = part
  axis = part_axis(layout) if w.ndim > 1 else 0
  if w.shape[axis] % n:
    return None
  return np.split(w, n, axis=axis)[i]


def mismatch_hint(w: np.ndarray, shape: tuple, layout: str) -> str:
  """Why a torch tensor may not fit: another layout that would fit, if any."""
  if layout == "transposed" and _as_is(w, shape) is not None:
    return ("; it fits as stored, (in, out): a GPT-2 Conv1D weight? give its name-map "
            "rule the layout 'conv1d'")
  if layout != "transposed" and w.ndim >= 2 and kernel_from_torch(w, shape) is not None:
    return ("; it fits transposed: a torch Linear (out, in) weight? give its name-map "
            "rule the layout 'transposed' (or 'auto' for a leaf named kernel)")
  return ""


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
