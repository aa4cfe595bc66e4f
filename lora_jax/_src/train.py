"""The training step: only the trainable half is differentiated, updated, returned.

``train_step(loss_fn, tx)`` builds ``step(trainable, opt_state, frozen, ...)``
over the two halves of ``lj.split(params)``. The frozen half (base kernels,
biases, norm scales, quantized codes) is an ordinary, non-donated input:
autodiff never sees it as a variable, so no gradient, optimizer update or
copy of a frozen kernel is ever formed, and the step's outputs are the
adapters and their optimizer state alone. Any optax transformation works on
the trainable half as written (``optax.adamw(1e-3)``): it holds only
trainable leaves, so no mask is needed.

``stop_frozen`` is the guard for the other route, a gradient of the full
params tree taken through ``lj.lora``: there every leaf of a params tree that
holds LoRA nodes, other than the factors and ``Trainable`` values, is a
constant to autodiff (zero gradient), so a plain optimizer on the full tree
cannot train the biases or base kernels through their gradients.
"""

from typing import Any, Callable

import jax
import optax

from lora_jax._src import tree
from lora_jax._src.optim import combine
from lora_jax._src.stack import is_stack
from lora_jax._src.types import Params
from lora_jax._src.weight import LoraWeight, Trainable, describe, is_node


def _stop(x: Any) -> Any:
  """``stop_gradient`` on traced leaves (a concrete array has no gradient to stop)."""
  return jax.lax.stop_gradient(x) if isinstance(x, jax.core.Tracer) else x


def _holds_lora(x: Any) -> bool:
  leaves = jax.tree.leaves(x, is_leaf=lambda y: isinstance(y, (LoraWeight, Trainable)))
  return any(isinstance(y, (LoraWeight, Trainable)) for y in leaves)


def _freeze_node(x: Any) -> Any:
  if isinstance(x, LoraWeight):
    return x.replace(w=jax.tree.map(_stop, x.w)) if x.w is not None else x
  if isinstance(x, Trainable):
    return Trainable(x.value, jax.tree.map(_stop, x.base))
  if is_stack(x):
    return x  # a stack of adapters is left as it is
  return jax.tree.map(_stop, x)  # plain leaves, QuantizedWeight nodes


def stop_frozen(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
  """``(args, kwargs)`` with the frozen leaves of every params tree made constants.

  An argument is a params tree when it holds a ``LoraWeight`` or a
  ``Trainable``; in it, every leaf except the factors ``a``, ``b`` (and
  DoRA's ``m``) and the ``Trainable`` values gets ``stop_gradient``.
  Arguments without LoRA nodes (the inputs, RNG state) are untouched.
  """
  stop = lambda y: is_node(y) or is_stack(y)
  freeze = lambda a: jax.tree.map(_freeze_node, a, is_leaf=stop) if _holds_lora(a) else a
  return tuple(freeze(a) for a in args), {k: freeze(v) for k, v in kwargs.items()}


def _check_halves(trainable: Params, frozen: Params) -> None:
  """The first two params are ``lj.split(params)``'s halves, in that order."""
  for name, half, want in (("trainable", trainable, "a"), ("frozen", frozen, "w")):
    for path, x in tree.flatten(half, is_leaf=is_node)[0]:
      if isinstance(x, LoraWeight) and getattr(x, want) is None:
        other = "frozen" if name == "trainable" else "trainable"
        raise ValueError(
            f"train_step: the {name} argument holds {other} leaves only at {path} "
            f"(LoraWeight.{want} is None); call step(trainable, opt_state, frozen, ...) "
            "with (trainable, frozen) = lj.split(params), in that order")
      if isinstance(x, LoraWeight) and name == "trainable" and x.w is not None:
        raise ValueError(
            f"train_step: trainable holds the base kernel at {path}; pass the "
            "trainable half of lj.split(params), not the full params (the full "
            "tree would make every frozen kernel an input to differentiate)")


def train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *,
               has_aux: bool = False, jit: bool = True) -> Callable:
  """One optimizer step that differentiates and updates the trainable half only.

  Returns ``step(trainable, opt_state, frozen, *args, **kwargs) ->
  (trainable, opt_state, loss)``: it computes
  ``loss_fn(lj.combine(trainable, frozen), *args, **kwargs)`` and its
  gradient with respect to ``trainable`` alone, applies
  ``tx.update(grads, opt_state, trainable)`` and returns the new trainable
  half and optimizer state. ``frozen`` goes in as a plain input and comes
  back nowhere. With ``jit`` (the default) the step is
  ``jax.jit(step, donate_argnums=(0, 1))``: the old adapters and optimizer
  state are donated, so they are updated in place and must not be used
  after the call; ``frozen`` is never donated. With ``jit=False`` it is the
  plain function, to wrap in your own ``jax.jit`` (shardings, donation).

  ``tx`` is any optax transformation, applied as written to the trainable
  half: ``optax.adamw(1e-3)`` here equals ``lj.optimizer(optax.adamw(1e-3),
  params)`` on the full tree, without the mask. Initialize it with
  ``tx.init(trainable)``.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` on the full params; call
      the model through ``lj.lora`` inside it. A scalar, or ``(scalar, aux)``
      with ``has_aux``.
    tx: an optax ``GradientTransformation``.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; the step then returns
      ``(trainable, opt_state, (loss, aux))``.
    jit: return the step jitted with donated ``trainable`` and ``opt_state``.

  Returns:
    The step function.

  Example:
    >>> import jax, jax.numpy as jnp, optax, lora_jax as lj
    >>> params = {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}
    >>> lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=1, targets="kernel"))
    >>> model = lj.lora(lambda p, x: x @ p["kernel"] + p["bias"])
    >>> loss = lambda p, x, y: jnp.mean((model(p, x) - y) ** 2)
    >>> trainable, frozen = lj.split(lp)          # A, B | base kernel, bias
    >>> tx = optax.adamw(1e-2)                      # plain optax on the trainable half
    >>> opt_state = tx.init(trainable)
    >>> step = lj.train_step(loss, tx)
    >>> x, y = jnp.ones(4), jnp.zeros(3)
    >>> trainable, opt_state, value = step(trainable, opt_state, frozen, x, y)
    >>> float(value)
    16.0
    >>> lp = lj.combine(trainable, frozen)        # full params again (save, merge)
    >>> bool(jnp.all(lp["bias"] == 0)), lp["kernel"].b.shape
    (True, (1, 3))
  """
  if not callable(loss_fn):
    raise TypeError(f"train_step: loss_fn must be callable, loss_fn(params, *batch), got "
                    f"{describe(loss_fn)}")
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(f"train_step: tx must be an optax GradientTransformation such as "
                    f"optax.adamw(1e-3), got {describe(tx)} (the call is "
                    "lj.train_step(loss_fn, tx))")

  def step(trainable, opt_state, frozen, *args, **kwargs):
    _check_halves(trainable, frozen)
    f = lambda t: loss_fn(combine(t, frozen), *args, **kwargs)
    out, grads = jax.value_and_grad(f, has_aux=has_aux)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, out

  return jax.jit(step, donate_argnums=(0, 1)) if jit else step
