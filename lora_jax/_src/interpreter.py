"""The interpreter core of ``lora(fn)``: the lazy value and ``eval_jaxpr``.

A ``LoraWeight`` flows through a jaxpr as a lazy value ``V = w + s·A⊗B``
(``_Lazy``). ``eval_jaxpr`` evaluates the jaxpr equation by equation: an
equation with no lazy input is bound as it is; one with a lazy input goes to
the rule registered for its primitive in ``RULES`` (filled by the rule
modules: ``rules``, ``quant_rules``, ``control_rules``, ``custom_rules``,
``shard_map_rules``), or to ``fallback``, which materializes ``W + ΔW``
(warned; refused with ``strict=True``, naming the primitive, the kernel and
the model's line). Every other place a merged kernel is formed (a kernel
leaving a loop body or the function) goes through ``concrete(..., ctx)``,
warned or refused alike.

This module imports no rule module: rules import it and register themselves,
as JAX's own ``ad.primitive_jvps`` table is filled.
"""

import functools
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core
from jax.extend import random as jex_random
from jax.extend import source_info_util

from lora_jax._src import compat
from lora_jax._src.quant import dense
from lora_jax._src.stack import StackedLora
from lora_jax._src.weight import LoraWeight

ADAPTER = "n"


class LoraFallbackWarning(UserWarning):
  """A LoraWeight reached an operation with no factored rule."""


@jax.tree_util.register_pytree_node_class
class _Lazy:
  """``V = w + scale · einsum(a[a_dims], b[b_dims])`` summed over the rank.

  ``a_dims``/``b_dims`` name, for each axis of ``a``/``b``, the axis of ``V``
  it stands for, or ``None`` for the rank axis. The factors keep the layout
  they are stored in (``a``: stack + in + (r,), ``b``: stack + (r,) + out),
  so no copy of them is made. Every axis of ``V`` is in ``a_dims`` or
  ``b_dims`` or both (a stacked axis is in both).
  """

  __slots__ = ("w", "a", "b", "a_dims", "b_dims", "scale", "dropout", "path", "dora")

  def __init__(self, w, a, b, a_dims, b_dims, scale, dropout, path, dora=False):
    self.w, self.a, self.b = w, a, b
    self.a_dims, self.b_dims = tuple(a_dims), tuple(b_dims)
    self.scale, self.dropout, self.path, self.dora = scale, dropout, path, dora

  def tree_flatten(self):
    return (self.w, self.a, self.b), (self.a_dims, self.b_dims, self.scale,
                                      self.dropout, self.path, self.dora)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)

  def replace(self, **kw) -> "_Lazy":
    f = {s: getattr(self, s) for s in self.__slots__}
    f.update(kw)
    return _Lazy(**f)

  @property
  def shape(self):
    return self.w.shape

  @property
  def ndim(self):
    return self.w.ndim

  @property
  def stacked(self) -> bool:
    """True for a stack of adapters: the factors' ``ADAPTER`` axis picks one."""
    return ADAPTER in self.a_dims

  @classmethod
  def from_stack(cls, s: StackedLora, path: str) -> "_Lazy":
    """A stack: factors ``(N, ...)``, the scales an array ``(N,)``."""
    v = cls.from_weight(s, path, scale=s.scales, dropout=0.0)
    return v.replace(a_dims=(ADAPTER,) + v.a_dims, b_dims=(ADAPTER,) + v.b_dims)

  @classmethod
  def from_weight(cls, lw: LoraWeight, path: str, scale=None, dropout=None) -> "_Lazy":
    s = [d for d, r in enumerate(lw.roles) if r == "s"]
    i = [d for d, r in enumerate(lw.roles) if r == "i"]
    o = [d for d, r in enumerate(lw.roles) if r == "o"]
    is_dora = getattr(lw, "m", None) is not None  # a stack has no m
    a, b = _dora_factors(lw) if is_dora else (lw.a, lw.b)
    return cls(lw.w, a, b, s + i + [None], s + [None] + o,
               lw.scale if scale is None else scale,
               lw.dropout if dropout is None else dropout, path, is_dora)

  def dora_parts(self):
    """A DoRA value's ``(a, b · g, g)``: its factors without the extra rank
    entry, and the column scale ``g = m / ‖W + ΔW‖_c`` (``b``'s layout, rank
    axis of size 1). See ``_dora_factors``."""
    ka, kb = self.a_dims.index(None), self.b_dims.index(None)
    r = self.a.shape[ka] - 1
    take = lambda x, k, lo, hi: lax.slice_in_dim(x, lo, hi, axis=k)
    return take(self.a, ka, 0, r), take(self.b, kb, 0, r), take(self.b, kb, r, r + 1)

  def materialize(self):
    """``stop_gradient(w) + ΔW`` in w's dtype (ΔW accumulated in float32)."""
    if self.stacked:
      raise NotImplementedError(
          f"lora: {self.path} holds a stack of adapters and reached an operation "
          "with no factored rule, or left the function as an array; a stack has "
          "no single W + ΔW. Use the kernel only in matmuls / einsums, convs and "
          "embedding lookups, or run one member alone (lj.unstack_adapters).")
    letters = "abcdefghijklmnopqstuvwxyz"[:self.ndim]
    sa = subscripts(self.a_dims, letters)
    sb = subscripts(self.b_dims, letters)
    d = jnp.einsum(f"{sa},{sb}->{letters}", self.a, self.b,
                   preferred_element_type=jnp.float32)
    w = jax.lax.stop_gradient(dense(self.w)).astype(jnp.float32)
    if self.dora:  # W' = W·g + s·A·(B·g): the extra rank entry adds 0 to d
      g = self.dora_parts()[2]
      w = jnp.einsum(f"{sb},{letters}->{letters}", g.astype(jnp.float32), w)
    return (w + self.scale * d).astype(self.w.dtype)


def _dora_factors(lw: LoraWeight):
  """A DoRA node's factors for the interpreter: ``a`` with a zero rank entry
  appended, ``b · g`` with ``g = m / ‖W + ΔW‖_c`` appended as that entry.

  ``a_ext @ b_ext = a @ (b · g)`` (the extra term is zero), so every lazy view
  rule (transpose, reshape, slice, scan ...) carries ``g`` along in ``b``'s
  layout with no rule of its own; consumers read it back with
  ``_Lazy.dora_parts``. The norm is computed factored (``dora.column_norm``).
  """
  from lora_jax._src import dora
  n_s = lw.roles.count("s")
  g = dora.column_scale(lw)
  a = jnp.concatenate([lw.a, jnp.zeros_like(lw.a[..., :1])], axis=-1)
  b = jnp.concatenate([(lw.b.astype(jnp.float32) * g).astype(lw.b.dtype),
                       g.astype(lw.b.dtype)], axis=n_s)
  return a, b


def subscripts(dims, letters) -> str:
  """Einsum subscripts of a factor: V's letter per axis, ``r`` for the rank."""
  return "".join("r" if d is None else letters[d] for d in dims)


class _Context:
  """Per-call interpreter state: strictness and the dropout random stream.

  Dropout masks come from one stream of random words per call: the words
  ``threefry(k, c)`` for counters ``c = 0, 1, ...`` of a single key ``k``
  derived once from ``lora_rng``, each site taking the next ``x.size``
  counters (as if one long ``jax.random.bits`` were cut into pieces). Every
  site draws its own mask, as PEFT's per-module dropout does, but without a
  key derivation per site: deriving a key and drawing with it per site made
  XLA compile a small CNN's train step about 4x slower than without dropout.
  """

  def __init__(self, strict: bool, rng):
    self.strict, self.rng, self.subkeys, self.offset = strict, rng, 0, 0
    self.pair = None if rng is None else _threefry_pair(jax.random.fold_in(rng, 0))
    self.adapter_ids = None  # (B,) int: each example's stack member, -1 = base
    self.stack = None  # stack_strategies.CallState: strategy, rows sorted once per call
    self.grouped = {}  # id(value) -> (value, examples, rows per example): see track_rows

  def track_rows(self, eqn, invals, outs) -> None:
    """Remember a reshape that folds an input's leading axes into its axis 0.

    With a stack, example ``i`` of ``adapter_ids`` is row ``i`` of the input
    that meets a kernel. A model that flattens ``(B, T, d)`` to ``(B·T, d)``
    before its matmuls keeps each example's tokens as ``T`` consecutive rows
    (row-major order), so the matmul rule can fold them back
    (``row_group``) instead of refusing. Only a fold of leading axes counts:
    ``(T, B, d) -> (T·B, d)`` leaves axis 0 the time axis, and the rule
    still names the mismatch.
    """
    name = eqn.primitive.name
    if name != "reshape":
      self._keep_rows(eqn, invals, outs)
      return
    x, y = invals[0], outs[0]
    if not hasattr(y, "shape") or is_lazy(x) or not x.ndim or not y.ndim:
      return
    n, g = self.row_group(x) or (x.shape[0], 1)
    size = 1
    for k, d in enumerate(x.shape):
      size *= d
      if size == y.shape[0] and (k or g > 1):  # a fold, or folded rows kept
        self.grouped[id(y)] = (y, n, g * size // x.shape[0])
        return
      if size >= y.shape[0]:
        return

  def _keep_rows(self, eqn, invals, outs) -> None:
    """Folded rows stay folded through an op that keeps them: one whose
    output has a folded input's shape (elementwise ops, activations, norms;
    not one that reorders axis 0), or a matmul that keeps the lhs' axis 0."""
    if not self.grouped or eqn.primitive.name in _MIXES_ROWS:
      return
    for i, x in enumerate(invals):
      group = None if is_lazy(x) else self.row_group(x)
      if group is None:
        continue
      if eqn.primitive.name == "dot_general":
        (lc, _), (lb, _) = eqn.params["dimension_numbers"]
        if i or 0 in tuple(lc) + tuple(lb):
          continue
        keep = lambda y: True
      else:
        keep = lambda y, shape=x.shape: y.shape == shape
      for y in outs:
        if not is_lazy(y) and hasattr(y, "shape") and y.ndim and keep(y):
          self.grouped[id(y)] = (y, *group)
      return

  def row_group(self, x):
    """``(examples, rows per example)`` of a value ``track_rows`` saw, or None."""
    got = self.grouped.get(id(x))
    return got[1:] if got is not None and got[0] is x else None

  def child(self, rng) -> "_Context":
    ctx = _Context(self.strict, rng)
    ctx.adapter_ids, ctx.stack, ctx.grouped = self.adapter_ids, self.stack, self.grouped
    return ctx

  def next_key(self):
    """A key for a sub-stream (a scan's steps), never the site stream's."""
    self.subkeys += 1
    return jax.random.fold_in(self.rng, self.subkeys)

  def bits(self, n: int):
    """The stream's next ``n`` random uint32 words."""
    if self.pair is False:  # a key of another PRNG implementation
      return jax.random.bits(self.next_key(), (n,), jnp.uint32)
    count = lax.iota(jnp.uint32, n) + jnp.uint32(self.offset)
    self.offset += n
    return jex_random.threefry_2x32(self.pair, count)

  def dropout(self, x, rate: float):
    """Inverted dropout on the LoRA branch input (PEFT semantics)."""
    if rate == 0.0 or self.rng is None:
      return x
    drop_below = jnp.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))
    keep = self.bits(x.size).reshape(x.shape) >= drop_below
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def _threefry_pair(key):
  """The two uint32 words of a threefry key, or False for another PRNG."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != "threefry2x32":
      return False
    key = jax.random.key_data(key)
  return key[0], key[1]


def is_lazy(x) -> bool:
  return isinstance(x, _Lazy)


def source_line(eqn) -> str:
  """The model's source line that emitted ``eqn`` (``file:line (function)``)."""
  try:
    return source_info_util.summarize(eqn.source_info)
  except Exception:  # noqa: BLE001  (no source info: say nothing)
    return ""


def _where(eqn) -> str:
  line = source_line(eqn) if eqn is not None else ""
  return f" (model line: {line})" if line else ""


def warn_or_refuse(ctx: _Context, eqn, paths, what: str, why: str) -> None:
  """Say that ``W + ΔW`` is formed for ``paths``: a warning, or with
  ``strict=True`` an error naming the primitive, the kernels and the line."""
  msg = (f"lora: {what}; W + ΔW is materialized for {', '.join(sorted(set(paths)))}. "
         f"{why}{_where(eqn)}")
  if ctx.strict:
    raise NotImplementedError(msg + " (raised because lora(fn, strict=True))")
  warnings.warn(msg, LoraFallbackWarning, stacklevel=5)


def fallback(ctx: _Context, eqn, invals):
  """Materialize every lazy operand of ``eqn`` and bind it as it is."""
  paths = [x.path for x in invals if is_lazy(x)]
  for x in invals:
    if is_lazy(x) and x.stacked:
      x.materialize()  # raises: a stack is never materialized
  warn_or_refuse(ctx, eqn, paths, f"`{eqn.primitive.name}` has no factored rule",
                 "This is correct but spends the memory and FLOPs LoRA saves."
                 + compat.untested_note())
  vals = [x.materialize() if is_lazy(x) else x for x in invals]
  return bind(eqn, vals)


def bind(eqn, invals):
  """Bind ``eqn``'s primitive on new inputs, as ``jax.core.eval_jaxpr`` does."""
  subfuns, params = compat.bind_params(eqn)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def eval_jaxpr(jaxpr, consts, args, ctx: _Context):
  """Evaluate ``jaxpr`` with lazy LoraWeight values flowing through it."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(is_lazy(x) for x in invals):
      name = eqn.primitive.name
      rule = RULES.get(name, fallback)
      if any(is_lazy(x) and x.dora for x in invals) and name not in DORA_SAFE:
        rule = fallback  # W' formed: correct, warned (or refused when strict)
      for wrap in WRAPPERS:  # quantized kernels: dequantized where consumed
        rule = functools.partial(wrap, rule)
      with eqn.ctx.manager:  # the eqn's context, e.g. auto_axes' mesh
        outs = compat.run_rule(rule, ctx, eqn, invals)
    else:
      outs = bind(eqn, invals)
    if ctx.adapter_ids is not None:
      ctx.track_rows(eqn, invals, outs)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, compat.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


# ops whose output may have its input's shape with rows reordered or mixed
_MIXES_ROWS = frozenset({
    "transpose", "rev", "sort", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
    "gather", "scatter", "scatter-add", "scatter_add", "dynamic_slice",
    "dynamic_update_slice", "slice", "concatenate", "pad", "all_to_all", "ppermute",
    "while", "scan", "cond"})


def concrete(xs, ctx: _Context | None = None, eqn=None, where: str = ""):
  """Materialize lazy values that leave the interpreter (or a sub-program).

  With ``ctx``, forming ``W + ΔW`` is warned about, or refused with
  ``strict=True``: ``where`` says where the kernel goes (e.g. "out of a
  `while` loop's carry") and ``eqn`` locates it in the model.
  """
  paths = [x.path for x in xs if is_lazy(x)]
  if ctx is not None and paths:
    for x in xs:
      if is_lazy(x) and x.stacked:
        x.materialize()  # raises: a stack is never materialized
    warn_or_refuse(ctx, eqn, paths, f"an adapted kernel leaves {where} as an array",
                   "This is correct, but the merged kernel costs the memory LoRA "
                   "saves; use the kernel inside the function instead of returning it.")
  return [x.materialize() if is_lazy(x) else x for x in xs]


def flatten_lazy(invals):
  """Lazy values as their arrays (w, a, b), and how to put them back."""
  flat, shapes = [], []
  for x in invals:
    if is_lazy(x):
      flat += [x.w, x.a, x.b]
      shapes.append(x)
    else:
      flat.append(x)
      shapes.append(None)

  def unflatten(out):
    it, res = iter(out), []
    for like in shapes:
      if like is None:
        res.append(next(it))
      else:
        w, a, b = next(it), next(it), next(it)
        res.append(like.replace(w=w, a=a, b=b))
    return res
  return flat, unflatten


# ------------------------------------------------------------------ registry

# primitive name -> rule(ctx, eqn, invals) -> list of outputs
RULES: dict[str, Callable] = {}
# names of the primitives whose rule keeps a DoRA value exact; a DoRA kernel
# reaching any other rule gets W' formed, with the fallback's warning
DORA_SAFE: set[str] = set()
# wrappers around every rule call, ``wrap(rule, ctx, eqn, invals)``; the
# quantized base registers one (dequantize where the kernel is consumed)
WRAPPERS: list[Callable] = []


def register(names, rule: Callable, *, dora: bool = False) -> None:
  """Register ``rule`` for primitives ``names`` (a name or a list of names)."""
  for name in [names] if isinstance(names, str) else names:
    RULES[name] = rule
    if dora:
      DORA_SAFE.add(name)

