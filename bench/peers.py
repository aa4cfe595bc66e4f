"""The contenders: one model, one set of weights, seven ways to train it.

Every contender is a ``Contender(params, forward, tx)``: ``forward(params, x)``
runs the model and ``tx`` is the optax transformation it trains with (adamw on
its trainable leaves, ``set_to_zero`` elsewhere, the way each library
documents it). All LoRA contenders carry the same ``W``, ``A`` and ``B``
values (``B`` random, not zero, so that the adapters change the output).

* ``lora_jax``  ``lj.lora(apply)`` + ``lj.train_step`` (adamw on ``lj.split``'s
                trainable half, the frozen half an input): the library under test;
* ``naive``     ``apply(lj.merge(params))``: ``W + s·A·B`` formed in the forward
                pass, the baseline everyone writes first;
* ``hand``      ``Linear(rank=r)``: ``x·W + s·(x·A)·B`` written into the model code;
* ``nnx``       Flax NNX ``nnx.LoRALinear`` (the MLP only: the decoder is Linen);
* ``qwix``      ``qwix.apply_lora_to_model`` with a ``LoraProvider``;
* ``full``      full fine-tuning of the base model (all leaves trained);
* ``frozen``    the base model with every kernel and embedding frozen, biases
                and norm scales trained: backprop through the activations
                only, the floor of any LoRA step.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import traverse_util

import lora_jax as lj
from bench import models

LORA_PEERS = ("lora_jax", "naive", "hand", "nnx", "qwix")


@dataclasses.dataclass
class Contender:
  name: str
  params: Any = None
  forward: Callable | None = None
  tx: optax.GradientTransformation | None = None
  skipped: str = ""  # why this contender cannot run the workload
  split: bool = False  # train with lj.train_step: tx on lj.split's trainable half


def adamw():
  return optax.adamw(1e-4)


def _masked(params, trainable: Callable[[tuple], bool]):
  """adamw on the leaves whose key path satisfies ``trainable``, zero elsewhere."""
  def labels(p):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "t" if trainable(_keys(path)) else "f", p)
  return optax.multi_transform({"t": adamw(), "f": optax.set_to_zero()}, labels)


def _keys(path) -> tuple:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(getattr(k, attr))
        break
  return tuple(out)


def _lora_flat(lp) -> dict:
  return traverse_util.flatten_dict(lp)


def randomize_b(key, lp, std: float = 0.02):
  """Give every LoraWeight a random ``B`` (same shape and dtype)."""
  flat = _lora_flat(lp)
  keys = jax.random.split(key, len(flat))
  out = {}
  for k, (path, x) in zip(keys, flat.items()):
    if isinstance(x, lj.LoraWeight):
      x = x.replace(b=(std * jax.random.normal(k, x.b.shape)).astype(x.b.dtype))
    out[path] = x
  return traverse_util.unflatten_dict(out)


def _renamed(lp, a_name: str, b_name: str, scale_b: float = 1.0):
  """Plain params with ``W`` at the kernel's path and A / B beside it."""
  out = {}
  for path, x in _lora_flat(lp).items():
    if isinstance(x, lj.LoraWeight):
      out[path] = x.w
      out[path[:-1] + (a_name,)] = x.a
      out[path[:-1] + (b_name,)] = x.b * scale_b
    else:
      out[path] = x
  return traverse_util.unflatten_dict(out)


# --------------------------------------------------------------- contenders

def full(model, params) -> Contender:
  fwd = lambda p, x: model.apply({"params": p}, x)
  return Contender("full", params, fwd, adamw())


def frozen(model, params) -> Contender:
  fwd = lambda p, x: model.apply({"params": p}, x)
  return Contender("frozen", params, fwd,
                   _masked(params, lambda k: k[-1] in ("bias", "scale")))


def lora_jax(model, lp) -> Contender:
  fwd = lj.lora(lambda p, x: model.apply({"params": p}, x))
  return Contender("lora_jax", lp, fwd, adamw(), split=True)  # lj.train_step


def naive(model, lp) -> Contender:
  fwd = lambda p, x: model.apply({"params": lj.merge(p)}, x)
  return Contender("naive", lp, fwd, lj.optimizer(adamw(), lp))


def hand(hand_model, lp) -> Contender:
  params = _renamed(lp, "lora_a", "lora_b")
  fwd = lambda p, x: hand_model.apply({"params": p}, x)
  return Contender("hand", params, fwd,
                   _masked(params, lambda k: k[-1] in ("lora_a", "lora_b")))


def qwix_lora(model, lp, rank: int, scale: float, x) -> Contender:
  try:
    import qwix
    provider = qwix.LoraProvider(module_path=".*", rank=rank, alpha=scale * rank)
    qmodel = qwix.apply_lora_to_model(model, provider)
    params = _renamed(lp, "kernel_lora_a", "kernel_lora_b")
    want = jax.tree.map(jnp.shape,
                        jax.eval_shape(qmodel.init, jax.random.key(0), x)["params"])
    if jax.tree.map(jnp.shape, params) != want:
      return Contender("qwix", skipped=f"qwix's params differ from ours: {want}")
  except Exception as e:  # record why, do not fail the suite
    return Contender("qwix", skipped=f"{type(e).__name__}: {e}"[:300])
  fwd = lambda p, x: qmodel.apply({"params": p}, x)
  return Contender("qwix", params, fwd,
                   _masked(params, lambda k: str(k[-1]).endswith(("_lora_a", "_lora_b"))))


def nnx_lora(kind: str, lp, d: int, layers: int, rank: int, scale: float) -> Contender:
  if kind != "mlp":
    return Contender("nnx", skipped="nnx.LoRALinear needs an NNX model; this "
                     "model is Linen (nn.scan)")
  model = models.NnxMLP(d, layers, rank, nnx.Rngs(0))
  for i, lin in enumerate(model.layers):
    lw = lp[f"Linear_{i}"]["kernel"]
    lin.kernel[...] = lw.w
    lin.bias[...] = lp[f"Linear_{i}"]["bias"]
    lin.lora.lora_a[...] = lw.a
    lin.lora.lora_b[...] = lw.b * lw.scale  # nnx.LoRA has no scale: fold it into B
  graphdef, state = nnx.split(model)
  fwd = lambda s, x: nnx.merge(graphdef, s)(x)
  return Contender("nnx", state, fwd,
                   _masked(state, lambda k: str(k[-1]) in ("lora_a", "lora_b")
                           or (len(k) > 1 and str(k[-2]) in ("lora_a", "lora_b"))))
