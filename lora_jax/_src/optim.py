"""Train only the adapters: labels, optimizer, split / combine."""

import math
import numbers

import jax
import optax

from lora_jax._src import tree
from lora_jax._src.types import Params
from lora_jax._src.weight import (FrozenKernel, LoraWeight, Trainable, describe,
                                  factor_problems, is_node)

TRAINABLE = "trainable"
FROZEN = "frozen"


def labels(params: Params) -> Params:
  """A tree like ``params`` with ``"trainable"`` or ``"frozen"`` at each leaf.

  A and B of every LoraWeight and the value of every Trainable leaf are
  ``"trainable"``; base kernels and all other leaves are ``"frozen"``.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
    ...                  lj.LoraConfig(rank=1, targets="kernel"))
    >>> lab = lj.labels(p)
    >>> lab["bias"], lab["kernel"].w, lab["kernel"].a
    ('frozen', 'frozen', 'trainable')
  """
  def label(x):
    if isinstance(x, LoraWeight):
      return x.replace(w=FROZEN, a=TRAINABLE, b=TRAINABLE,
                       m=TRAINABLE if x.dora else None)
    if isinstance(x, Trainable):
      return Trainable(TRAINABLE, FROZEN)
    return FROZEN
  return jax.tree.map(label, params, is_leaf=is_node)


def _b_factors(params: Params) -> Params:
  """True at every LoraWeight's ``b``, False elsewhere (LoRA+'s mask)."""
  def mark(x):
    if isinstance(x, LoraWeight):
      return LoraWeight.tree_unflatten((x.scale, x.roles, x.dropout, x.dora),
                                       (False, False, True, False))
    if isinstance(x, Trainable):
      return Trainable(False, False)
    return False
  return jax.tree.map(mark, params, is_leaf=is_node)


def _ratio(value) -> float:
  if isinstance(value, jax.core.Tracer) or isinstance(value, bool) or not isinstance(
      value, numbers.Real) or not math.isfinite(value) or value <= 0:
    raise ValueError(f"optimizer: b_lr_ratio must be a static finite number > 0 (LoRA+: "
                     f"B's learning rate / A's, e.g. 16), got {value!r}")
  return float(value)


def optimizer(tx: optax.GradientTransformation, params: Params, *,
              b_lr_ratio: float | None = None) -> optax.GradientTransformation:
  """``tx`` for the trainable leaves; ``set_to_zero`` (no state) for the rest.

  With ``b_lr_ratio`` (LoRA+, Hayou et al. 2024), every ``b`` factor's
  learning rate is ``b_lr_ratio`` times ``a``'s: ``tx`` runs once over all
  trainable leaves (so global-norm clipping and schedules see them all, as
  one torch optimizer does) and ``b``'s final updates are multiplied by the
  ratio (``optax.masked(optax.scale(ratio), ...)`` after ``tx``). For Adam
  and AdamW that is exactly a learning rate ``ratio·lr`` for B (scaling the
  gradient would cancel in Adam's normalisation), i.e. PEFT's
  ``create_loraplus_optimizer(loraplus_lr_ratio=ratio)`` param groups. Unlike
  PEFT, leaves trained in full (``Trainable``, 1-D or not) keep ``lr`` and
  adapters on embeddings get no special rate.

  Args:
    tx: any optax transformation, e.g. ``optax.adamw(1e-3)``.
    params: the params from ``lora_init`` (only their structure is read).
    b_lr_ratio: optional LoRA+ ratio η_B / η_A (PEFT's ``loraplus_lr_ratio``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
    ...                  lj.LoraConfig(rank=1, targets="kernel"))
    >>> tx = lj.optimizer(optax.adam(1e-3), p)
    >>> state = tx.init(p)
    >>> sum(x.size for x in jax.tree.leaves(state)) - 1   # mu and nu of A, B (minus the count)
    14
    >>> plus = lj.optimizer(optax.adam(1e-3), p, b_lr_ratio=16)   # LoRA+
  """
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(f"optimizer: tx must be an optax GradientTransformation such as "
                    f"optax.adamw(1e-3), got {describe(tx)} (the call is "
                    "lj.optimizer(tx, params))")
  _require_nodes("optimizer", params)  # labels come from what optax hands over
  out = optax.multi_transform({TRAINABLE: tx, FROZEN: _frozen()}, labels)
  if b_lr_ratio is None:
    return out
  return optax.chain(out, optax.masked(optax.scale(_ratio(b_lr_ratio)), _b_factors))


def _frozen() -> optax.GradientTransformation:
  """``set_to_zero``; a float0 gradient (integer codes of a QuantizedWeight,
  ``jax.grad(..., allow_int=True)``) becomes a zero of its param's dtype, so
  ``optax.apply_updates`` leaves the codes as they are."""
  def zero(u, p):
    if getattr(u, "dtype", None) == jax.dtypes.float0 and hasattr(p, "dtype"):
      return jax.numpy.zeros(p.shape, p.dtype)
    return jax.numpy.zeros_like(u)

  def update(updates, state, params=None):
    if params is None:
      return jax.tree.map(jax.numpy.zeros_like, updates), state
    return jax.tree.map(zero, updates, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def split(params: Params) -> tuple[Params, Params]:
  """Split into ``(trainable, frozen)`` trees with ``None`` in the other's places.

  Take gradients with respect to the trainable part only:
  ``jax.grad(lambda t: loss(combine(t, frozen)))(trainable)``.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
    ...                  lj.LoraConfig(rank=1, targets="kernel"))
    >>> t, f = lj.split(p)
    >>> t["kernel"].w is None, f["kernel"].a is None
    (True, True)
  """
  _require_nodes("split", params)
  lab = labels(params)
  pick = lambda want: jax.tree.map(lambda l, x: x if l == want else None, lab, params)
  return pick(TRAINABLE), pick(FROZEN)


def combine(trainable: Params, frozen: Params) -> Params:
  """Inverse of ``split``.

  Example:
    >>> import jax, jax.numpy as jnp, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
    ...                  lj.LoraConfig(rank=1, targets="kernel"))
    >>> q = lj.combine(*lj.split(p))
    >>> q["kernel"].w.shape
    (4, 3)
  """
  _check_halves(trainable, frozen)
  out = jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                     is_leaf=lambda x: x is None)
  bad = [f"{path}: {p}" for path, x in tree.flatten(out, is_leaf=is_node)[0]
         if isinstance(x, LoraWeight) for p in factor_problems(x.w, x.a, x.b, x.roles)]
  if bad:
    raise ValueError("combine: the halves do not fit together (are they from the "
                     "same lora_init?):\n  " + "\n  ".join(bad))
  return out


def _require_nodes(what: str, params: Params) -> None:
  leaves = jax.tree.leaves(params, is_leaf=is_node)
  if not any(is_node(x) for x in leaves):
    raise ValueError(
        f"{what}: the params hold no LoraWeight or Trainable node ({describe(params)} "
        f"with {len(leaves)} plain leaves), so nothing would train; pass the params "
        "returned by lora_jax.lora_init")


def _halves(x: Params):
  """{path: node or leaf} with None kept, and the treedef, for combine's checks."""
  stop = lambda y: y is None or is_node(y)
  leaves, treedef = tree.flatten(x, is_leaf=stop)
  # a quantized base kernel (QuantizedWeight) is one leaf of the frozen half
  return dict(leaves), jax.tree.structure(
      x, is_leaf=lambda y: y is None or isinstance(y, FrozenKernel))


def _node_kind(x) -> str:
  if isinstance(x, LoraWeight):
    return f"LoraWeight(scale={x.scale}, roles={x.roles!r}, dropout={x.dropout})"
  return "None" if x is None else type(x).__name__ if is_node(x) else "a leaf"


def _check_halves(trainable: Params, frozen: Params) -> None:
  """Same structure and, at each leaf, a value in exactly one of the halves."""
  (t, t_def), (f, f_def) = _halves(trainable), _halves(frozen)
  if t_def != f_def:
    errors = [f"{p}: only in trainable" for p in sorted(set(t) - set(f))]
    errors += [f"{p}: only in frozen" for p in sorted(set(f) - set(t))]
    errors += [f"{p}: trainable has {_node_kind(t[p])}, frozen has {_node_kind(f[p])}"
               for p in sorted(set(t) & set(f))
               if _node_kind(t[p]) != _node_kind(f[p])
               and {_node_kind(t[p]), _node_kind(f[p])} != {"None", "a leaf"}]
    if not errors:
      errors = [f"trainable is {t_def}", f"frozen is {f_def}"]
    raise ValueError("combine: trainable and frozen are not the two halves of one "
                     "lj.split(params) (their structures differ):\n  "
                     + "\n  ".join(errors[:12]) + ("\n  ..." if len(errors) > 12 else ""))
  both = [p for p, (a, b) in _pairs(trainable, frozen) if a is not None and b is not None]
  if both:
    raise ValueError(f"combine: both halves hold a value at {both[:4]}"
                     f"{' ...' if len(both) > 4 else ''}; combine takes "
                     "(trainable, frozen) = lj.split(params), which has None in the "
                     "other half's places")


def _pairs(trainable: Params, frozen: Params):
  none = lambda y: y is None or isinstance(y, FrozenKernel)
  t, _ = jax.tree_util.tree_flatten_with_path(trainable, is_leaf=none)
  f = jax.tree.leaves(frozen, is_leaf=none)
  return [(tree.path_str(p), (a, b)) for (p, a), b in zip(t, f)]
