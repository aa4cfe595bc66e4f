"""Train only the adapters: labels, optimizer, split / combine."""

import jax
import optax

from lora_jax._src.types import Params
from lora_jax._src.weight import LoraWeight, Trainable, is_node

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
      return x.replace(w=FROZEN, a=TRAINABLE, b=TRAINABLE)
    if isinstance(x, Trainable):
      return Trainable(TRAINABLE, FROZEN)
    return FROZEN
  return jax.tree.map(label, params, is_leaf=is_node)


def optimizer(tx: optax.GradientTransformation, params: Params) -> optax.GradientTransformation:
  """``tx`` for the trainable leaves; ``set_to_zero`` (no state) for the rest.

  Args:
    tx: any optax transformation, e.g. ``optax.adamw(1e-3)``.
    params: the params from ``lora_init`` (only their structure is read).

  Example:
    >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> p = lj.lora_init(jax.random.key(0), {"kernel": jnp.ones((4, 3))},
    ...                  lj.LoraConfig(rank=1, targets="kernel"))
    >>> tx = lj.optimizer(optax.adam(1e-3), p)
    >>> state = tx.init(p)
    >>> sum(x.size for x in jax.tree.leaves(state)) - 1   # mu and nu of A, B (minus the count)
    14
  """
  del params  # labels are computed from the params optax hands over
  return optax.multi_transform({TRAINABLE: tx, FROZEN: _frozen()}, labels)


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
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)
