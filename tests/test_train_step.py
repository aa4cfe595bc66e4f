"""lj.train_step: frozen params are an input, never a gradient, an update or an output."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

D, TOKENS, RANK = 256, 8, 4
KERNEL_BYTES = D * D * 4  # one frozen float32 kernel: 256 KiB


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(3):
      x = nn.Dense(D, name=f"dense_{i}")(x)
      x = nn.LayerNorm(name=f"norm_{i}")(x)
    return x


def _setup(trainable=None):
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (TOKENS, D))
  y = jax.random.normal(jax.random.key(1), (TOKENS, D))
  params = model.init(jax.random.key(2), x)
  config = lj.LoraConfig(rank=RANK, targets=r".*/kernel", trainable=trainable)
  lp = lj.lora_init(jax.random.key(3), params, config)
  is_lw = lambda l: isinstance(l, lj.LoraWeight)
  lp = jax.tree.map(lambda l: l.replace(b=0.05 * jnp.ones_like(l.b)) if is_lw(l) else l, lp,
                    is_leaf=is_lw)  # B != 0: A gets gradients
  apply = lj.lora(model.apply)
  loss = lambda p, x, y: jnp.mean((apply(p, x) - y) ** 2)
  return params, lp, loss, x, y


def _readme_step(loss, tx):
  """The step the README taught before: the full tree differentiated and returned."""
  def step(lp, opt_state, x, y):
    value, grads = jax.value_and_grad(loss)(lp, x, y)
    updates, opt_state = tx.update(grads, opt_state, lp)
    return optax.apply_updates(lp, updates), opt_state, value
  return step


def test_step_has_no_output_or_temporary_the_size_of_a_frozen_kernel():
  _, lp, loss, x, y = _setup()
  trainable, frozen = lj.split(lp)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(trainable)
  step = lj.train_step(loss, tx)
  mem = step.lower(trainable, opt_state, frozen, x, y).compile().memory_analysis()
  assert mem.output_size_in_bytes < KERNEL_BYTES / 2  # A, B and Adam's mu, nu of them
  assert mem.output_size_in_bytes - mem.alias_size_in_bytes < 1024  # in place but scalars
  assert mem.temp_size_in_bytes < KERNEL_BYTES / 2
  # the old step returns every kernel and holds a zero gradient for each
  full_tx = lj.optimizer(optax.adamw(1e-3), lp)
  old = jax.jit(_readme_step(loss, full_tx)).lower(lp, full_tx.init(lp), x, y).compile()
  assert old.memory_analysis().output_size_in_bytes > 3 * KERNEL_BYTES


def _flops(compiled):
  ca = compiled.cost_analysis()
  return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])


def test_step_computes_no_gradient_for_a_frozen_kernel():
  params, lp, loss, x, y = _setup()
  trainable, frozen = lj.split(lp)
  tx = optax.adamw(1e-3)
  lora = _flops(lj.train_step(loss, tx).lower(trainable, tx.init(trainable), frozen, x, y)
                .compile())
  full_loss = lambda p, x, y: jnp.mean((MLP().apply(p, x) - y) ** 2)
  full = _flops(jax.jit(_readme_step(full_loss, tx)).lower(
      params, tx.init(params), x, y).compile())
  linear = 2 * TOKENS * D * D * 3  # one pass of the three kernels
  # full FT: forward + dX + dW = 3 passes; LoRA: forward + dX only (+ the small factors)
  assert full >= 3 * linear
  assert lora < 2 * linear + 0.15 * linear, (lora, full)


def test_plain_optax_on_trainable_equals_lj_optimizer_on_full_tree():
  _, lp, loss, x, y = _setup(trainable=r".*norm_0/scale")
  trainable, frozen = lj.split(lp)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  step = lj.train_step(loss, tx, jit=False)
  state = tx.init(trainable)
  full_tx = lj.optimizer(optax.adamw(1e-2, weight_decay=0.1), lp)
  full_state = full_tx.init(lp)
  old = jax.jit(_readme_step(loss, full_tx))
  for _ in range(3):
    trainable, state, v1 = jax.jit(step)(trainable, state, frozen, x, y)
    lp, full_state, v2 = old(lp, full_state, x, y)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
  got = lj.combine(trainable, frozen)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(lp)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert not np.allclose(got["params"]["norm_0"]["scale"].value, 1.0)  # Trainable trained
  np.testing.assert_array_equal(got["params"]["norm_1"]["scale"], 1.0)  # frozen stayed


def test_donates_trainable_and_opt_state_but_not_frozen():
  _, lp, loss, x, y = _setup()
  trainable, frozen = lj.split(lp)
  tx = optax.adam(1e-3)
  opt_state = tx.init(trainable)
  step = lj.train_step(loss, tx)
  a = trainable["params"]["dense_0"]["kernel"].a
  new, opt_state, _ = step(trainable, opt_state, frozen, x, y)
  assert a.is_deleted()  # donated: updated in place
  assert not frozen["params"]["dense_0"]["kernel"].w.is_deleted()
  new, _, _ = step(new, opt_state, frozen, x, y)  # frozen reused as is


def test_full_tree_gradients_of_frozen_leaves_are_zero():
  """The other route: a gradient of the whole tree through lj.lora."""
  _, lp, loss, x, y = _setup(trainable=r".*norm_0/bias")
  grads = jax.jit(jax.grad(loss))(lp, x, y)
  g = grads["params"]
  for i in range(3):
    np.testing.assert_array_equal(g[f"dense_{i}"]["bias"], 0)
    np.testing.assert_array_equal(g[f"dense_{i}"]["kernel"].w, 0)
    assert np.abs(g[f"dense_{i}"]["kernel"].a).max() > 0
  np.testing.assert_array_equal(g["norm_1"]["scale"], 0)
  assert np.abs(g["norm_0"]["bias"].value).max() > 0  # Trainable gets its gradient
  # so plain adam on the full tree moves the adapters and nothing frozen
  tx = optax.adam(1e-2)
  updates, _ = tx.update(grads, tx.init(lp), lp)
  moved = optax.apply_updates(lp, updates)
  np.testing.assert_array_equal(moved["params"]["dense_1"]["bias"], lp["params"]["dense_1"]["bias"])
  np.testing.assert_array_equal(moved["params"]["dense_1"]["kernel"].w,
                                lp["params"]["dense_1"]["kernel"].w)


def test_inputs_and_plain_params_keep_their_gradients():
  """Only trees that hold LoRA nodes are frozen: inputs, and full fine-tuning."""
  params, lp, loss, x, y = _setup()
  gx = jax.grad(loss, argnums=1)(lp, x, y)
  assert np.abs(gx).max() > 0
  full = jax.grad(loss)(params, x, y)  # no LoRA nodes: lj.lora runs fn as is
  assert np.abs(full["params"]["dense_0"]["kernel"]).max() > 0


def test_has_aux_and_kwargs():
  _, lp, loss, x, y = _setup()
  trainable, frozen = lj.split(lp)
  tx = optax.sgd(1e-2)
  step = lj.train_step(lambda p, x, *, y: (loss(p, x, y), {"n": x.shape[0]}), tx,
                       has_aux=True)
  trainable, _, (value, aux) = step(trainable, tx.init(trainable), frozen, x, y=y)
  assert value.shape == () and int(aux["n"]) == TOKENS


def test_errors_say_what_to_pass():
  _, lp, loss, x, y = _setup()
  trainable, frozen = lj.split(lp)
  tx = optax.sgd(1e-2)
  step = lj.train_step(loss, tx, jit=False)
  with pytest.raises(ValueError, match="in that order"):
    step(frozen, tx.init(trainable), trainable, x, y)
  with pytest.raises(ValueError, match="not the full params"):
    step(lp, tx.init(lp), frozen, x, y)
  with pytest.raises(TypeError, match="optax GradientTransformation"):
    lj.train_step(loss, "adamw")
  with pytest.raises(TypeError, match="loss_fn must be callable"):
    lj.train_step(None, tx)


def test_quantized_base_sits_in_the_frozen_half():
  """QLoRA: the NF4 codes are frozen inputs; split / combine round-trip them."""
  w = jax.random.normal(jax.random.key(0), (64, 32))
  q = lj.quantize({"kernel": w}, lj.QuantConfig(kind="nf4", block_size=32, targets="kernel"))
  lp = lj.lora_init(jax.random.key(1), q, lj.LoraConfig(rank=2, targets="kernel"))
  trainable, frozen = lj.split(lp)
  assert isinstance(frozen["kernel"].w, lj.QuantizedWeight)
  back = lj.combine(trainable, frozen)
  assert isinstance(back["kernel"].w, lj.QuantizedWeight)
  loss = lambda p, x: jnp.sum(lj.lora(lambda p, x: x @ p["kernel"])(p, x) ** 2)
  tx = optax.adam(1e-2)
  step = lj.train_step(loss, tx)
  trainable, _, value = step(trainable, tx.init(trainable), frozen, jnp.ones((4, 64)))
  assert np.isfinite(float(value))
