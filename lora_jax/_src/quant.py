"""QLoRA's frozen base: ``quantize`` / ``dequantize`` and ``QuantizedWeight``.

``quantize(params, QuantConfig(...))`` replaces each selected kernel by a
``QuantizedWeight``: a pytree node of packed codes and scales (formats in
``_src/quant_formats.py``, bit-compatible with bitsandbytes). Stacked axes
(``s``, e.g. an ``nn.scan`` layer axis) lead every array of the node, so
``lax.scan`` slices codes and scales together with the layer, and each layer
is quantized on its own. ``lora()`` dequantizes a QuantizedWeight inside the
operation that consumes it (see ``_src/quant_rules.py``); codes and scales
are frozen (no gradient, no optimizer state).

Training: the codes are integers, so take gradients with
``jax.grad(loss, allow_int=True)`` (the codes get ``float0`` gradients, which
``lj.optimizer`` turns into no-op updates: ``optax.apply_updates`` leaves them
as they are), or with respect to the trainable part only
(``trainable, frozen = lj.split(params)``). Plain ``jax.grad`` raises JAX's
"grad requires real- or complex-valued inputs ... set allow_int to True".
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import layout, tree
from lora_jax._src import quant_formats as fmt
from lora_jax._src.config import _pattern_lookup, compile_layouts, matcher
from lora_jax._src.types import Params, Spec
from lora_jax._src.weight import ROLES, FrozenKernel, _outside_lora

KINDS = tuple(fmt.CODEBOOKS)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Which kernels to quantize, and how.

  Attributes:
    kind: ``"nf4"`` (bitsandbytes NormalFloat4), ``"int4"`` or ``"int8"``
      (symmetric linear, absmax-scaled).
    block_size: values per scale, along the kernel's input axis; it must
      divide the (flattened) input size of every selected kernel.
    double_quant: quantize the float32 block scales too (bitsandbytes'
      ``compress_statistics``: 8-bit dynamic codes in blocks of 256).
    targets: regex (``re.fullmatch`` on '/'-joined paths), list of regexes,
      or callable ``(path, leaf) -> bool`` selecting the kernels.
    exclude: same forms; selected paths matching it stay as they are.
    compute_dtype: dtype the kernels are dequantized to (``None``: each
      kernel's own dtype).
    layouts: ``{regex: roles}`` for kernels of 3+ axes (roles as in
      ``LoraConfig.layouts``: ``"sio"`` for a scanned ``(layers, in, out)``);
      ``quantize(..., trace=...)`` reads them from the model instead.

  Example:
    >>> import lora_jax as lj
    >>> lj.QuantConfig(kind="nf4", block_size=64).double_quant
    True
  """

  kind: str = "nf4"
  block_size: int = 64
  double_quant: bool = True
  targets: Spec = r".*kernel"
  exclude: Spec = None
  compute_dtype: Any = None
  layouts: Mapping[str, str] | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"QuantConfig.kind must be one of {KINDS}, got {self.kind!r}")
    if (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
        or self.block_size < 2 or self.block_size % 2):
      raise ValueError("QuantConfig.block_size must be an even int >= 2 (bitsandbytes "
                       f"uses 32..4096), got {self.block_size!r}")
    # checked and compiled once; selects runs for every leaf
    object.__setattr__(self, "_targets", matcher(self.targets, "targets"))
    object.__setattr__(self, "_exclude", matcher(self.exclude, "exclude"))
    object.__setattr__(self, "_layouts", compile_layouts(self.layouts, "QuantConfig"))

  def selects(self, path: str, leaf: Any) -> bool:
    return self._targets(path, leaf) and not self._exclude(path, leaf)


def _perm(roles: str):
  """Axis order (stack, out..., in...) of a kernel with ``roles``."""
  pick = lambda r: [d for d, x in enumerate(roles) if x == r]
  return pick("s") + pick("o") + pick("i")


@jax.tree_util.register_pytree_with_keys_class
class QuantizedWeight(FrozenKernel):
  """A frozen kernel stored as packed blockwise codes and scales.

  Attributes:
    codes: uint8, ``stack + (out, in // 2)`` (4-bit, packed) or
      ``stack + (out, in)`` (8-bit); ``out``/``in`` are the flattened output
      and input axes, in torch's ``(out, in)`` order.
    absmax: per-block scales ``stack + (out, in // block_size)``: float32, or
      uint8 codes with double quantization.
    absmax2: float32 ``stack + (n_blocks,)`` scales of the absmax codes
      (double quantization; else None).
    offset: float32 ``stack`` mean of the absmax (double quantization).
    kind, block_size: the format.
    roles: the kernel's axis roles (``s``, ``i``, ``o``), stacked axes first.
    dtype: the dtype ``dequantize()`` returns (QuantConfig.compute_dtype).

  Example:
    >>> import jax.numpy as jnp, lora_jax as lj
    >>> q = lj.quantize({"kernel": jnp.ones((64, 8))}, lj.QuantConfig())["kernel"]
    >>> q.shape, q.kind, q.dequantize().dtype
    ((64, 8), 'nf4', dtype('float32'))
  """

  __slots__ = ("codes", "absmax", "absmax2", "offset", "kind", "block_size",
               "inner_shape", "inner_roles", "dtype")

  def __init__(self, codes, absmax, absmax2, offset, *, kind: str, block_size: int,
               inner_shape: tuple, inner_roles: str, dtype):
    self.codes, self.absmax, self.absmax2, self.offset = codes, absmax, absmax2, offset
    self.kind, self.block_size = kind, block_size
    self.inner_shape, self.inner_roles = tuple(inner_shape), inner_roles
    self.dtype = jnp.dtype(dtype)

  def tree_flatten_with_keys(self):
    k = jax.tree_util.GetAttrKey
    children = ((k("codes"), self.codes), (k("absmax"), self.absmax),
                (k("absmax2"), self.absmax2), (k("offset"), self.offset))
    return children, (self.kind, self.block_size, self.inner_shape,
                      self.inner_roles, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux, children):
    kind, block_size, inner_shape, inner_roles, dtype = aux
    return cls(*children, kind=kind, block_size=block_size,
               inner_shape=inner_shape, inner_roles=inner_roles, dtype=dtype)

  @property
  def double_quant(self) -> bool:
    return self.absmax2 is not None

  @property
  def stack_shape(self) -> tuple[int, ...]:
    """The leading stacked axes (fewer after ``lax.scan`` sliced some off)."""
    return tuple(self.codes.shape[:-2])

  @property
  def shape(self) -> tuple[int, ...]:
    return self.stack_shape + self.inner_shape

  @property
  def roles(self) -> str:
    return "s" * len(self.stack_shape) + self.inner_roles

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    """Parameters of the kernel it stands for (as ``lj.summary`` counts them)."""
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))

  def scales(self) -> jax.Array:
    """The float32 block scales (dequantizing the absmax codes if needed)."""
    if not self.double_quant:
      return self.absmax
    return fmt.dequantize_absmax(self.absmax, self.absmax2, self.offset)

  def dequantize(self, dtype=None) -> jax.Array:
    """The kernel, in ``dtype`` (default ``self.dtype``), with its own axes."""
    from lora_jax._src import explicit
    s = explicit.quantized_kernel_sharding(self)
    if s is not None:  # explicit axes: typed like the kernel it stands for
      return explicit.in_auto_axes(lambda q: q._dequantize(dtype), s.spec, self.codes)(self)
    return self._dequantize(dtype)

  def _dequantize(self, dtype=None) -> jax.Array:
    m = fmt.dequantize_blocks(self.codes, self.scales(), self.kind,
                              dtype or self.dtype)
    roles = self.roles
    perm = _perm(roles)
    m = m.reshape(tuple(self.shape[d] for d in perm))
    return jnp.transpose(m, np.argsort(perm))

  def __repr__(self) -> str:
    dq = ", double_quant" if self.double_quant else ""
    return (f"QuantizedWeight({self.kind}{list(self.shape)}, block_size="
            f"{self.block_size}{dq}, roles={self.roles!r}, dtype={self.dtype})")

  # Not an array: fail loudly where user code treats it as one.
  def __jax_array__(self):
    raise _outside_lora("QuantizedWeight")

  def __array__(self, *args, **kwargs):
    raise _outside_lora("QuantizedWeight")


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedWeight)


def quantize_array(w, roles: str, config: QuantConfig, path: str = "kernel") -> QuantizedWeight:
  """Quantize one kernel whose axes have ``roles`` (stacked axes first)."""
  w = jnp.asarray(w)
  _check_kernel(path, w, roles, config)
  perm = _perm(roles)
  ns = roles.count("s")
  stack = w.shape[:ns]
  outs = int(np.prod([w.shape[d] for d in perm if roles[d] == "o"]))
  ins = int(np.prod([w.shape[d] for d in perm if roles[d] == "i"]))
  m = jnp.transpose(w, perm).reshape((-1, outs, ins))
  parts = _quantize_layers(m, config.kind, config.block_size, config.double_quant)
  codes, absmax, absmax2, offset = [
      None if x is None else x.reshape(stack + x.shape[1:]) for x in parts]
  return QuantizedWeight(codes, absmax, absmax2, offset, kind=config.kind,
                         block_size=config.block_size, inner_shape=w.shape[ns:],
                         inner_roles=roles[ns:], dtype=config.compute_dtype or w.dtype)


def _quantize_layers(m, kind: str, block_size: int, double_quant: bool):
  """Quantize ``m`` (layers, out, in) one layer at a time: the float32
  temporaries are one layer's (a loop inside one XLA program would let
  XLA:CPU hoist the float32 convert of the whole stack out of it)."""
  one = functools.partial(_quantize_layer, kind=kind, block_size=block_size,
                          double_quant=double_quant)
  from lora_jax._src import explicit
  if explicit.explicit_sharding(m) is not None:  # explicit axes: the compiler shards
    n = 2 if not double_quant else 4             # (quantize places the result after)
    one = explicit.in_auto_axes(
        lambda x, f=one: f(x)[:n], (jax.sharding.PartitionSpec(),) * n, m)
    outs = [tuple(one(m[k])) + (None,) * (4 - n) for k in range(m.shape[0])]
  else:
    outs = [one(m[k]) for k in range(m.shape[0])]
  return [None if outs[0][j] is None else jnp.stack([o[j] for o in outs])
          for j in range(4)]


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize_layer(layer, kind: str, block_size: int, double_quant: bool):
  codes, absmax = fmt.quantize_blocks(layer, kind, block_size)
  if not double_quant:
    return codes, absmax, None, None
  return (codes,) + fmt.quantize_absmax(absmax)


def _check_kernel(path: str, w, roles: str, config: QuantConfig) -> None:
  if w.ndim < 2:
    raise ValueError(
        f"quantize: target {path} has shape {tuple(w.shape)}; only kernels of 2+ "
        "axes (in, out) are quantized. Narrow QuantConfig.targets (or add it to "
        "QuantConfig.exclude): biases and norm scales stay in full precision.")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"quantize: target {path} has dtype {w.dtype}; expected a "
                     "floating-point kernel")
  if len(roles) != w.ndim or not set(roles) <= ROLES or "i" not in roles or "o" not in roles:
    raise ValueError(f"quantize: layout {roles!r} for {path} does not fit its shape "
                     f"{tuple(w.shape)} (one of 's', 'i', 'o' per axis, with i and o)")
  if roles.lstrip("s").count("s"):
    raise ValueError(f"quantize: {path} has layout {roles!r}; stacked axes must come "
                     "first (as nn.scan / nnx.scan stack them)")
  ins = int(np.prod([d for d, r in zip(w.shape, roles) if r == "i"]))
  if ins % config.block_size:
    raise ValueError(
        f"quantize: {path} has shape {tuple(w.shape)} (layout {roles!r}): its input "
        f"size {ins} is not a multiple of block_size={config.block_size}, so blocks "
        "would straddle output rows. Pick a block_size that divides it (e.g. "
        f"{_divisor(ins)}) or leave it out with QuantConfig(exclude=...).")


def _divisor(n: int) -> int:
  for b in (64, 32, 128, 256, 16, 8, 4, 2):
    if n % b == 0:
      return b
  return 2


def _roles(path: str, leaf, config: QuantConfig, inferred: dict) -> str:
  roles = _pattern_lookup(config._layouts, path) or inferred.get(path)
  if roles is None and np.ndim(leaf) == 2:
    roles = "io"
  if roles is None and np.ndim(leaf) >= 2:
    raise ValueError(
        f"quantize: cannot tell the layout of {path} with shape {tuple(leaf.shape)}: "
        "(layers, in, out), (in, heads, head_dim) and (heads, head_dim, out) look "
        "alike. Pass `quantize(..., trace=lambda p: model.apply(p, x))` or "
        "QuantConfig(layouts={regex: roles}) with roles such as 'sio', 'ioo', 'iio'.")
  return roles or "i" * np.ndim(leaf)


def quantize(params: Params, config: QuantConfig, *,
             trace: Callable[[Params], Any] | None = None) -> Params:
  """Replace each kernel ``config`` selects by a ``QuantizedWeight``.

  A kernel with a sharding keeps it: codes and scales are sharded along the
  kernel's stacked and output axes.

  Args:
    params: a pytree of arrays (Flax params, NNX state, a dict).
    config: a ``QuantConfig``.
    trace: optional ``lambda p: model.apply(p, x)``, traced abstractly to read
      the axis roles of kernels of 3+ axes (as ``lora_init`` does).

  Returns:
    The params with ``QuantizedWeight`` nodes; other leaves are unchanged.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> p = {"dense": {"kernel": jnp.ones((128, 16)), "bias": jnp.zeros(16)}}
    >>> q = lj.quantize(p, lj.QuantConfig(kind="nf4", block_size=64))
    >>> q["dense"]["kernel"].codes.shape, q["dense"]["kernel"].codes.dtype
    ((16, 64), dtype('uint8'))
  """
  if not isinstance(config, QuantConfig):
    raise TypeError(f"quantize: config must be a QuantConfig, got {type(config).__name__}")
  from lora_jax._src.weight import is_node  # a LoraWeight's w is quantized too
  is_leaf = lambda x: is_quantized(x) or is_node(x)
  leaves, treedef = tree.flatten(params, is_leaf=is_leaf)
  picked = [k for k, (p, x) in enumerate(leaves)
            if tree.is_array(x) and config.selects(p, x)]
  if not picked:
    raise ValueError(
        f"quantize: targets={config.targets!r} matched no array leaf. Paths are "
        "'/'-joined keys matched with re.fullmatch; some that exist:"
        f"{tree.some_paths([p for p, _ in leaves])}")
  inferred = {}
  if trace is not None:
    want = [leaves[k][0] for k in picked if np.ndim(leaves[k][1]) > 2]
    inferred = layout.infer_roles(trace, params, want) if want else {}
  out = [x for _, x in leaves]
  for k in picked:
    path, w = leaves[k]
    q = quantize_array(w, _roles(path, w, config, inferred), config, path)
    out[k] = _place_like(q, w)
  return jax.tree_util.tree_unflatten(treedef, out)


def _place_like(q: QuantizedWeight, w) -> QuantizedWeight:
  """Shard codes and scales along the kernel's stacked and output axes."""
  from lora_jax._src import quant_sharding
  return quant_sharding.place_like(q, w)


def dequantize(params: Params, dtype=None) -> Params:
  """Replace every ``QuantizedWeight`` by its dequantized kernel.

  Also inside ``LoraWeight`` nodes (their ``w``).

  Args:
    params: params holding QuantizedWeight nodes.
    dtype: the dtype of the kernels (default: each node's ``dtype``).

  Example:
    >>> import jax.numpy as jnp, lora_jax as lj
    >>> q = lj.quantize({"kernel": jnp.ones((64, 4))}, lj.QuantConfig(kind="int8"))
    >>> lj.dequantize(q)["kernel"].tolist()[0]
    [1.0, 1.0, 1.0, 1.0]
  """
  return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x,
                      params, is_leaf=is_quantized)


def quantization_error(w, q: QuantizedWeight) -> dict:
  """Relative Frobenius error and max abs error of ``q`` against ``w``."""
  w = jnp.asarray(w, jnp.float32)
  d = q.dequantize(jnp.float32) - w
  rel = jnp.linalg.norm(d) / jnp.maximum(jnp.linalg.norm(w), 1e-30)
  return {"rel_frobenius": float(rel), "max_abs": float(jnp.max(jnp.abs(d)))}


def dense(w):
  """``w`` itself, or its dequantized kernel if it is a QuantizedWeight."""
  return w.dequantize() if is_quantized(w) else w


def abstract_quantized(params: Params) -> Params:
  """``params`` with each QuantizedWeight seen as a ShapeDtypeStruct (for traces)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x,
      params, is_leaf=is_quantized)


def merge_requantized(params: Params, merge: Callable) -> tuple[Params, dict]:
  """``merge`` with each adapted quantized kernel quantized again (see merge)."""
  from lora_jax._src.weight import LoraWeight, is_node
  leaves, treedef = tree.flatten(params, is_leaf=is_node)
  merged = jax.tree_util.tree_leaves(merge(params), is_leaf=is_node)
  out, report = [], {}
  for (path, x), m in zip(leaves, merged):
    if isinstance(x, LoraWeight) and is_quantized(x.w):
      q = x.w
      config = QuantConfig(kind=q.kind, block_size=q.block_size,
                           double_quant=q.double_quant, compute_dtype=q.dtype)
      new = _place_like(quantize_array(m, q.roles, config, path), m)
      report[path] = quantization_error(m, new)
      out.append(new)
    else:
      out.append(x if is_quantized(x) else m)
  return jax.tree_util.tree_unflatten(treedef, out), report
