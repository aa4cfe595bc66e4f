"""``lora(fn)``: run an unmodified model on params holding LoraWeight nodes.

How it works: ``fn`` is traced with ``jax.make_jaxpr`` with
every ``LoraWeight`` seen as an abstract array of ``w``'s shape and dtype, and
the jaxpr is evaluated by a small interpreter in which a LoraWeight is a lazy
value ``V = w + scale · a ⊗ b`` (``_Lazy``). The rules in ``_src/rules.py``
compute each consumer in factored form: ``dot_general`` becomes
``x·w + s·((x·a)·b)``, a conv becomes ``conv(x, w) + s·conv1x1(conv(x, a), b)``,
a row gather becomes ``take(w) + s·take(a)·b``; transposes, reshapes, casts,
slices and indexing (``w[i]``) stay lazy; scan / while / cond / checkpoint
are re-emitted through their public APIs with the body interpreted. A
grouped or depthwise conv runs on ``w + ΔW`` by design (cheaper there; see
``rules._grouped_conv``). Anything else materializes ``w + ΔW`` (correct)
and warns once, or raises with ``strict=True``.

Under ``jax.jit`` all of this runs once, at trace time.
"""

import functools
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend import random as jex_random

from lora_jax._src import tree
from lora_jax._src.quant import dense, is_quantized
from lora_jax._src.stack import StackedLora, is_stack
from lora_jax._src.weight import LoraWeight, Trainable, describe, is_node

# In ``_Lazy.a_dims``/``b_dims``: the adapter axis of a stack (``StackedLora``).
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

  def child(self, rng) -> "_Context":
    ctx = _Context(self.strict, rng)
    ctx.adapter_ids = self.adapter_ids
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


def fallback(ctx: _Context, eqn, invals):
  """Materialize every lazy operand of ``eqn`` and bind it as it is."""
  paths = sorted({x.path for x in invals if is_lazy(x)})
  name = eqn.primitive.name
  for x in invals:
    if is_lazy(x) and x.stacked:
      x.materialize()  # raises: a stack is never materialized
  msg = (f"lora: `{name}` has no factored rule; W + ΔW is materialized for "
         f"{', '.join(paths)}. This is correct but spends the memory and "
         "FLOPs LoRA saves.")
  if ctx.strict:
    raise NotImplementedError(msg + " (raised because lora(fn, strict=True))")
  warnings.warn(msg, LoraFallbackWarning, stacklevel=4)
  vals = [x.materialize() if is_lazy(x) else x for x in invals]
  return bind(eqn, vals)


def bind(eqn, invals):
  """Bind ``eqn``'s primitive on new inputs, as ``jax.core.eval_jaxpr`` does."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # JAX < 0.9 returned (subfuns, params)
    subfuns, params = params
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def eval_jaxpr(jaxpr, consts, args, ctx: _Context):
  """Evaluate ``jaxpr`` with lazy LoraWeight values flowing through it."""
  from lora_jax._src import quant_rules, rules  # they import this module

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
      rule = rules.RULES.get(eqn.primitive.name, fallback)
      if any(is_lazy(x) and x.dora for x in invals) and rule not in rules.DORA_RULES:
        rule = fallback  # W' formed: correct, warned (or refused when strict)
      outs = quant_rules.run(rule, ctx, eqn, invals)  # rule(ctx, eqn, invals), or
      # with quantized kernels dequantized where this op consumes them
    else:
      outs = bind(eqn, invals)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex_core.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def concrete(xs):
  """Materialize lazy values that leave the interpreter."""
  return [x.materialize() if is_lazy(x) else x for x in xs]


def _split_args(args, kwargs):
  """Flatten (args, kwargs): dynamic array leaves, static leaves elsewhere."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      (args, kwargs), is_leaf=lambda x: is_node(x) or is_quantized(x) or is_stack(x))
  statics, where, dynamic, abstract = [], [], [], []
  for k, (path, leaf) in enumerate(leaves):
    where_ = tree.path_str(path[2:])  # the params path, without (args, position)
    if isinstance(leaf, Trainable):
      leaf = leaf.value
      if is_quantized(leaf):
        raise TypeError(
            f"lora: {where_} is a Trainable QuantizedWeight; quantized "
            "codes cannot be trained. Train a LoRA adapter on it (lora_init), or "
            "dequantize it first (lora_jax.dequantize).")
    if is_stack(leaf) and getattr(leaf.w, "shape", None) is None:
      raise ValueError(
          f"lora: {where_} is a stack of adapters without its base "
          f"kernel (w={describe(leaf.w)}); put the stack on the base params first: "
          "lj.attach(base_params, stack)")
    if isinstance(leaf, (LoraWeight, StackedLora)):
      make = _Lazy.from_stack if is_stack(leaf) else _Lazy.from_weight
      dynamic.append(make(leaf, where_))
      abstract.append(jax.ShapeDtypeStruct(leaf.w.shape, leaf.w.dtype))
    elif is_quantized(leaf):  # a rank-0 lazy value: dequantized where consumed
      from lora_jax._src import quant_rules
      dynamic.append(_Lazy.from_weight(quant_rules.rank0(leaf), where_))
      abstract.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    elif tree.is_array(leaf) or isinstance(leaf, jax.core.Tracer):
      dynamic.append(leaf)
      abstract.append(leaf)
    else:
      statics.append(leaf)
      continue
    statics.append(None)  # filled by the dynamic value at call time
    where.append(k)
  return treedef, statics, where, dynamic, abstract


def _adapter_ids(dynamic, ids):
  """Check ``adapter_ids`` against the stacks in the params; the ids or None."""
  stacks = [x for x in dynamic if is_lazy(x) and x.stacked]
  if not stacks:
    if ids is not None:
      raise ValueError(
          "lora: adapter_ids were given but the params hold no stack of adapters; "
          "build one with lj.stack_adapters([...]) and put it on the base with "
          "lj.attach(base_params, stack), or drop adapter_ids")
    return None
  sizes = {x.a.shape[0] for x in stacks}
  n = max(sizes)
  if ids is None:
    raise ValueError(
        f"lora: {stacks[0].path} holds a stack of {n} adapters, so the call needs "
        "adapter_ids: lj.lora(fn)(params, x, adapter_ids=ids) with ids an int array "
        "with one entry per example (the inputs' leading axis): ids[i] in "
        f"[0, {n}) picks example i's adapter, -1 runs it on the base alone. To run "
        "one adapter for all, pass ids = jnp.full((batch,), k).")
  if len(sizes) > 1:
    raise ValueError(f"lora: the params hold stacks of different sizes {sorted(sizes)}; "
                     "build every stack from the same adapters with lj.stack_adapters")
  shape, dtype = getattr(ids, "shape", None), getattr(ids, "dtype", None)
  if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"lora: adapter_ids must be an integer array (one adapter index "
                    f"per example), got {describe(ids)}; e.g. "
                    "jnp.asarray([0, 2, -1], jnp.int32)")
  if len(shape) != 1:
    raise ValueError(f"lora: adapter_ids must be 1-D (one entry per example), got "
                     f"shape {tuple(shape)}")
  if not isinstance(ids, jax.core.Tracer):
    bad = [int(i) for i in np.asarray(ids) if not -1 <= int(i) < n]
    if bad:
      raise ValueError(f"lora: adapter_ids {bad[:5]} are out of range: the stack holds "
                       f"{n} adapters, so ids must be in [0, {n}) or -1 (base alone)")
  return jnp.asarray(ids)


def _warn_dropout_without_rng(dynamic) -> bool:
  """Warn if some LoraWeight has dropout > 0 but no key was given; True if it did."""
  rates = {x.path: x.dropout for x in dynamic if is_lazy(x) and x.dropout > 0}
  if not rates:
    return False
  shown = ", ".join(f"{p} (dropout={r})" for p, r in list(rates.items())[:3])
  more = f" and {len(rates) - 3} more" if len(rates) > 3 else ""
  warnings.warn(
      f"lora: LoRA dropout is set for {shown}{more}, but no `lora_rng` was "
      "passed, so this call runs without dropout (eval mode). To train with dropout "
      "call the wrapped function with `lora_rng=key` (a fresh key per step); "
      "for evaluation this is expected. Shown once per lora(fn).",
      UserWarning, stacklevel=3)
  return True


def lora(fn: Callable, *, strict: bool = False) -> Callable:
  """Transform ``fn`` to run with LoRA-adapted params, in factored form.

  The returned function has ``fn``'s signature, plus an optional keyword
  ``lora_rng``: a PRNG key that turns on dropout on the LoRA branch inputs
  (rate from each LoraWeight). Without a key dropout is off, as in eval mode;
  if some LoraWeight has ``dropout > 0``, the first such call of the wrapped
  function warns (a ``UserWarning`` naming ``lora_rng``), once per
  ``lora(fn)``, so a training loop that forgot the key is noticed and an
  eval loop is not flooded. Each adapted site draws its own mask, as PEFT's
  per-module dropout does.

  Wherever a ``LoraWeight`` feeds a matmul (``dot_general``, ``einsum``,
  ``Dense``, ``DenseGeneral``), the result is ``x·W + s·((x·A)·B)``; a conv
  gets ``conv(x, W) + s·conv1x1(conv(x, A), B)``; an embedding lookup gathers
  rows of A and multiplies by B; indexing a stacked kernel (``w[i]``) stays
  factored. On these paths neither ``W + ΔW`` nor a gradient for ``W`` is
  ever formed: ``W`` is a constant to autodiff. Grouped and depthwise convs
  (``feature_group_count > 1``) run on ``W + ΔW`` by design, without a
  warning: their kernels are small and the factored form measured far
  slower (a 7x7 depthwise conv's train step: 62 s against 0.22 s on CPU).

  Params holding a stack of adapters (``lj.attach(base, lj.stack_adapters(
  [...]))``) need the keyword ``adapter_ids``: an int array with one entry per
  example (the leading axis of the inputs); example ``i`` runs with adapter
  ``ids[i]``, ``-1`` with the base alone. Each matmul, conv or embedding
  lookup gathers every example's factors (``x·A[id]`` then ``·B[id]``), so
  the FLOPs do not depend on the number of adapters, and changing the ids or
  the stack's values (``lj.set_adapter``) reuses a jitted program. Ids out of
  range are an error when they are concrete; under ``jit`` their rows come
  out NaN.

  Args:
    fn: any JAX function, e.g. a Flax ``model.apply``.
    strict: raise instead of materializing ``W + ΔW`` when a LoraWeight
      reaches an operation with no factored rule (a grouped conv's
      deliberate ``W + ΔW`` is not refused).

  Returns:
    The wrapped function.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> f = lambda p, x: x @ p["kernel"]
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
    ...                  lj.LoraConfig(rank=2, targets="kernel"))
    >>> lj.lora(f)(p, jnp.ones((1, 4))).tolist()   # B = 0: unchanged
    [[4.0, 4.0, 4.0]]
    >>> s = lj.attach({"kernel": jnp.ones((4, 3))},
    ...               lj.stack_adapters([lj.adapter(p)] * 2))
    >>> lj.lora(f)(s, jnp.ones((3, 4)), adapter_ids=jnp.array([0, 1, -1])).shape
    (3, 3)
  """

  warned = False

  @functools.wraps(fn)
  def wrapped(*args, lora_rng=None, adapter_ids=None, **kwargs):
    nonlocal warned
    treedef, statics, where, dynamic, abstract = _split_args(args, kwargs)
    ids = _adapter_ids(dynamic, adapter_ids)
    if lora_rng is None and not warned:
      warned = _warn_dropout_without_rng(dynamic)

    def rebuild(dyn):
      leaves = list(statics)
      for k, x in zip(where, dyn):
        leaves[k] = x
      return jax.tree_util.tree_unflatten(treedef, leaves)

    if not any(is_lazy(x) for x in dynamic):
      a, kw = rebuild(dynamic)
      return fn(*a, **kw)

    def flat_fn(*dyn):
      a, kw = rebuild(dyn)
      return fn(*a, **kw)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*abstract)
    ctx = _Context(strict, lora_rng)
    ctx.adapter_ids = ids
    outs = eval_jaxpr(closed.jaxpr, closed.consts, dynamic, ctx)
    return jax.tree.unflatten(jax.tree.structure(out_shape), concrete(outs))

  return wrapped
