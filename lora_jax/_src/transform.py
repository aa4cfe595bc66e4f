"""``lora(fn)``: run an unmodified model on params holding LoraWeight nodes.

How it works: ``fn`` is traced with ``jax.make_jaxpr`` with
every ``LoraWeight`` seen as an abstract array of ``w``'s shape and dtype, and
the jaxpr is evaluated by a small interpreter (``_src/interpreter.py``) in
which a LoraWeight is a lazy value ``V = w + scale · a ⊗ b`` (``_Lazy``). The
rules registered by ``_src/rules.py`` (and ``quant_rules``)
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

from lora_jax._src import explicit_rules, quant_rules, rules  # noqa: F401  (they register their rules)
from lora_jax._src import control_rules, custom_rules, shard_map_rules  # noqa: F401
from lora_jax._src import explicit, stack_strategies, tree
from lora_jax._src.interpreter import (LoraFallbackWarning, _Context, _Lazy, concrete,
                                       eval_jaxpr, is_lazy)
from lora_jax._src.quant import is_quantized
from lora_jax._src.stack import StackedLora, is_stack
from lora_jax._src.train import stop_frozen
from lora_jax._src.weight import LoraWeight, Trainable, describe, is_node

__all__ = ["LoraFallbackWarning", "lora"]


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
      abstract.append(explicit.stand_in(leaf.w))
    elif is_quantized(leaf):  # a rank-0 lazy value: dequantized where consumed
      dynamic.append(_Lazy.from_weight(quant_rules.rank0(leaf), where_))
      abstract.append(explicit.stand_in(leaf))
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
  # ids spread over several processes cannot be read here; like traced ids, unchecked
  if not isinstance(ids, jax.core.Tracer) and getattr(ids, "is_fully_addressable", True):
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


def lora(fn: Callable, *, strict: bool = False, stack_strategy: str = "auto") -> Callable:
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
  In every argument that holds LoRA nodes, the leaves other than the factors
  and ``Trainable`` values (base kernels, biases, norm scales) are constants
  to autodiff, with zero gradients; ``lj.train_step`` keeps them out of the
  gradient altogether.

  Params holding a stack of adapters (``lj.attach(base, lj.stack_adapters(
  [...]))``) need the keyword ``adapter_ids``: an int array with one entry per
  example (the leading axis of the inputs); example ``i`` runs with adapter
  ``ids[i]``, ``-1`` with the base alone. Each matmul, conv or embedding
  lookup computes each row's branch with its own adapter by one of three
  exact strategies, chosen per kernel by a cost model from static shapes
  (``stack_strategy="auto"``) or forced: ``"gather"`` (each row gathers
  ``A[id]``, ``B[id]``; FLOPs independent of N), ``"onehot"`` (``x`` times
  all adapters' ``A`` side by side, masked per row, times all ``B``: each
  adapter read once, FLOPs grow with N) or ``"segments"`` (rows sorted by
  adapter once per call, tiles of one adapter each). See
  docs/guides/serving_strategies.md. Changing the ids or the stack's values
  (``lj.set_adapter``) reuses a jitted program. Ids out of range are an
  error when they are concrete; under ``jit`` their rows come out NaN.

  Args:
    fn: any JAX function, e.g. a Flax ``model.apply``.
    strict: raise instead of materializing ``W + ΔW`` when a LoraWeight
      reaches an operation with no factored rule (a grouped conv's
      deliberate ``W + ΔW`` is not refused).
    stack_strategy: for params holding a stack: ``"auto"`` (the cost
      model's choice per kernel), ``"gather"``, ``"onehot"`` or
      ``"segments"``. A forced strategy that cannot serve a kernel is an
      error naming the kernel and the strategies that fit.

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
  stack_strategies.check_strategy(stack_strategy)

  @functools.wraps(fn)
  def wrapped(*args, lora_rng=None, adapter_ids=None, **kwargs):
    nonlocal warned
    args, kwargs = stop_frozen(args, kwargs)  # frozen leaves: zero gradient
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
    if ids is not None:
      n = next(x.a.shape[0] for x in dynamic if is_lazy(x) and x.stacked)
      ctx.stack = stack_strategies.CallState(ids, n, stack_strategy, jax.default_backend())
    outs = eval_jaxpr(closed.jaxpr, closed.consts, dynamic, ctx)
    outs = concrete(outs, ctx, None, "the function (an output of lora(fn))")
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped
