"""Deterministic performance proxies: XLA cost_analysis FLOPs and HLO identity.

A LoRA train step skips the frozen kernels' weight gradients, so with every
kernel adapted at small rank it costs about 2/3 of full fine-tuning.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj

WIDTH, TOKENS, RANK = 1024, 256, 8


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(4):
      x = nn.relu(nn.Dense(WIDTH)(x))
    return x


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(WIDTH)(x)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
    return stack()(x, None)[0]


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"]


def _ratio(model):
  x = jnp.ones((TOKENS, WIDTH))
  params = model.init(jax.random.key(0), x)
  loss = lambda apply, p: jnp.mean(apply(p, x) ** 2)

  full_tx = optax.sgd(1e-3)

  def full_step(p, state):
    grads = jax.grad(lambda p: loss(model.apply, p))(p)
    updates, state = full_tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  lp = lj.lora_init(jax.random.key(1), params, lj.LoraConfig(rank=RANK),
                    trace=lambda p: model.apply(p, x))
  tx = lj.optimizer(optax.sgd(1e-3), lp)

  def lora_step(p, state):
    grads = jax.grad(lambda p: loss(lj.lora(model.apply), p))(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  full = _flops(full_step, params, full_tx.init(params))
  lora = _flops(lora_step, lp, tx.init(lp))
  return lora / full


def test_train_step_flops_mlp():
  assert _ratio(Mlp()) <= 0.70


def test_train_step_flops_scanned_stack():
  assert _ratio(Scanned()) <= 0.70


def test_merged_model_compiles_to_the_base_model():
  model = Mlp()
  x = jnp.ones((4, WIDTH))
  params = model.init(jax.random.key(0), x)
  lp = lj.lora_init(jax.random.key(1), params, lj.LoraConfig(rank=RANK))
  merged = lj.merge(lp)
  assert hlo_ops(model.apply, merged, x) == hlo_ops(model.apply, params, x)


def hlo_ops(fn, params, x):
  """The compiled program's instructions, without names and source metadata.

  Params go in as host numpy arrays so that committed-device annotations of
  freshly computed arrays do not enter the comparison.
  """
  params = jax.tree.map(np.asarray, params)
  text = jax.jit(fn).lower(params, x).compile().as_text()
  ops = []
  for line in text.splitlines():
    if line.startswith(("  %", "  ROOT", "ENTRY")):
      line = re.sub(r", metadata=\{[^}]*\}", "", line)
      line = re.sub(r"%[\w.-]+", "%_", line)          # instruction names
      line = re.sub(r"[\w.-]+: (?=[a-z]+\d*\[)", "", line)  # parameter names
      ops.append(line.strip())
  assert len(ops) > 10
  return ops


def test_lora_compiles_to_the_hand_written_factored_program():
  """On a scanned decoder, lora(apply) compiles to exactly the program of a
  LoRA written by hand into the model (bench/models.py): the transform adds
  nothing, in the forward pass and in the train step."""
  import warnings

  from bench import peers
  from bench import workloads as W

  spec = next(s for s in W.specs("tiny") if s.kind == "decoder")
  x, t, x_dec = W.inputs(spec, jax.random.key(0))
  base, _ = W.build_models(spec, RANK)
  params = base.init(jax.random.key(1), x)["params"]
  lp = peers.randomize_b(jax.random.key(3),
                         lj.lora_init(jax.random.key(2), params, W.lora_config(spec, RANK)))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    cs = {c.name: c for c in W.contenders(spec, RANK, params, lp, x)}
  ours, hand = cs["lora_jax"], cs["hand"]
  # the train-step comparison is on the whole tree, as the hand-written model trains
  ours_full = dataclasses.replace(ours, tx=lj.optimizer(ours.tx, lp), split=False)
  for inp in (x, x_dec):
    assert hlo_ops(ours.forward, ours.params, inp) == hlo_ops(hand.forward, hand.params, inp)
  step = lambda c: (W.train_step(c, W.loss_fn(spec)), (c.params, c.tx.init(c.params)))
  (f_ours, s_ours), (f_hand, s_hand) = step(ours_full), step(hand)
  assert (hlo_ops(lambda s, x: f_ours(s, x, t), s_ours, x)
          == hlo_ops(lambda s, x: f_hand(s, x, t), s_hand, x))


def _big_transposes(hlo: str, elements: int) -> list[str]:
  """The optimized HLO's transposes of arrays with at least ``elements`` elements."""
  found = []
  for m in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} transpose\(", hlo):
    if int(np.prod([int(d) for d in m.group(1).split(",") if d])) >= elements:
      found.append(m.group(0))
  return found


def test_lora_gradient_of_a_token_batch_transposes_no_activation():
  """The factored branch of a ``(batch, seq, d)`` input is a 2-D matmul over
  the flattened tokens: the gradients of A and B then read the cotangent in
  place. As a 3-D dot, its transpose made XLA:CPU copy the whole
  ``(batch, seq, out)`` cotangent through a strided transpose (a third of
  the ``bench.peft`` step at the big shape)."""
  b, t, d, o = 4, 32, 64, 96
  model = nn.Dense(o)
  x = jax.random.normal(jax.random.key(0), (b, t, d))
  params = model.init(jax.random.key(1), x)["params"]
  train, frozen = lj.split(lj.lora_init(jax.random.key(2), params, lj.LoraConfig(rank=4)))
  apply = lj.lora(model.apply)

  def loss(train, frozen, x):
    return jnp.sum(jnp.sin(apply({"params": lj.combine(train, frozen)}, x)))

  hlo = jax.jit(jax.grad(loss)).lower(train, frozen, x).compile().as_text()
  assert "dot(" in hlo
  assert _big_transposes(hlo, b * t * min(d, o)) == []


def test_llama_weight_gradients_transpose_no_activation():
  """The bundled Llama's projections are 2-D matmuls over the tokens, so full
  fine-tuning's weight gradients read the cotangents in place too."""
  from lora_jax._src.models.llama import LlamaMLP
  from lora_jax.models import LlamaConfig
  cfg = LlamaConfig.tiny(hidden_size=64, intermediate_size=96)
  mlp = LlamaMLP(cfg)
  x = jax.random.normal(jax.random.key(0), (4, 32, 64))
  params = mlp.init(jax.random.key(1), x)
  loss = lambda p: jnp.sum(jnp.sin(mlp.apply(p, x)))
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  assert _big_transposes(hlo, 4 * 32 * 64) == []
