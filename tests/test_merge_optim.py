"""merge / unmerge / base / adapter / attach, training with the optimizer, summary."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from layer_cases import case, hand_merge, is_lw, randomize_b


def _same_structure(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype


@pytest.mark.parametrize("name", ["dense", "dense_general", "conv", "nn_scan", "nnx"])
def test_merge_keeps_structure_and_matches_hand_merge(name):
  fn, params, args, config, trace = case(name)
  lp = randomize_b(lj.lora_init(jax.random.key(2), params, config, trace=trace))
  merged = lj.merge(lp)
  _same_structure(merged, params)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(hand_merge(lp))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_merge_bf16_accumulates_in_float32():
  w = jax.random.normal(jax.random.key(0), (64, 64)).astype(jnp.bfloat16)
  lp = randomize_b(lj.lora_init(jax.random.key(1), {"k": w}, lj.LoraConfig(rank=4, targets="k")))
  lw = lp["k"]
  ref = (w.astype(jnp.float32) + lw.scale * (lw.a.astype(jnp.float32) @ lw.b.astype(jnp.float32)))
  got = lj.merge(lp)["k"]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref.astype(jnp.bfloat16)))


def test_base_unmerge_and_task_switching():
  fn, params, args, config, trace = case("dense")
  task1 = randomize_b(lj.lora_init(jax.random.key(1), params, config), seed=1)
  task2 = randomize_b(lj.lora_init(jax.random.key(2), params, config), seed=2)
  # adapters off: the exact base params
  for x, y in zip(jax.tree.leaves(lj.base(task1)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  served = lj.merge(task1)
  back = lj.unmerge(served, lj.adapter(task1))
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  # switch: subtract task 1, add task 2 == merging task 2 directly
  switched = lj.merge(lj.attach(back, lj.adapter(task2)))
  np.testing.assert_allclose(fn(switched, *args), fn(lj.merge(task2), *args), atol=1e-5)


def test_adapter_holds_only_factors_and_trainable_leaves():
  fn, params, args, _, _ = case("dense")
  lp = lj.lora_init(jax.random.key(1), params,
                    lj.LoraConfig(rank=2, exclude=".*Dense_1.*", trainable=".*Dense_1.*"))
  ad = lj.adapter(lp)
  assert set(ad) == {"params/Dense_0/kernel", "params/Dense_1/kernel", "params/Dense_1/bias"}
  assert ad["params/Dense_0/kernel"].w is None
  assert all(x.base is None for x in ad.values() if isinstance(x, lj.Trainable))
  again = lj.attach(params, ad)
  assert jax.tree.structure(again, is_leaf=is_lw) == jax.tree.structure(lp, is_leaf=is_lw)


def test_attach_errors_name_paths_and_shapes():
  fn, params, args, config, _ = case("dense")
  ad = lj.adapter(lj.lora_init(jax.random.key(1), params, config))
  other = jax.tree.map(lambda x: jnp.ones((x.shape[0] + 1,) + x.shape[1:]), params)
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel: the adapter does not fit the base "
                                       r"kernel of shape \(9, 24\).*'a': \(8, 3\)"):
    lj.attach(other, ad)
  with pytest.raises(ValueError, match=r"params/Dense_1/kernel: not in the base params"):
    lj.attach({"params": {"Dense_0": params["params"]["Dense_0"]}}, ad)


def _train(lp, fn, args, target, steps=5):
  tx = lj.optimizer(optax.adam(1e-2), lp)
  state = tx.init(lp)

  @jax.jit
  def step(lp, state):
    loss = lambda p: jnp.mean((lj.lora(fn)(p, *args) - target) ** 2)
    value, grads = jax.value_and_grad(loss)(lp)
    updates, state = tx.update(grads, state, lp)
    return optax.apply_updates(lp, updates), state, value

  losses = []
  for _ in range(steps):
    lp, state, value = step(lp, state)
    losses.append(float(value))
  return lp, state, losses


def test_training_updates_only_adapters_and_trainable_leaves():
  fn, params, args, _, _ = case("dense")
  config = lj.LoraConfig(rank=2, exclude=".*Dense_1.*", trainable=".*Dense_1/bias")
  lp0 = lj.lora_init(jax.random.key(1), params, config)
  target = jnp.ones((2, 5))
  lp, state, losses = _train(lp0, fn, args, target, steps=20)
  assert losses[-1] < losses[0]
  # every frozen leaf is bit-identical
  lab = lj.labels(lp)
  for l, x0, x in zip(jax.tree.leaves(lab), jax.tree.leaves(lp0), jax.tree.leaves(lp)):
    if l == "frozen":
      np.testing.assert_array_equal(x0, x)
  assert not np.array_equal(lp["params"]["Dense_1"]["bias"].value,
                            lp0["params"]["Dense_1"]["bias"].value)
  # optimizer state only for trainable leaves: Adam's mu + nu of a, b and the bias
  n_trainable = lj.summary(lp).trainable
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert n_state == 2 * n_trainable


def test_fresh_adapter_after_zero_lr_training_is_noop():
  fn, params, args, config, _ = case("dense")
  lp = lj.lora_init(jax.random.key(1), params, config)
  np.testing.assert_array_equal(lj.lora(fn)(lp, *args), fn(params, *args))


class _Seed003(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(1000)(x))
    x = nn.relu(nn.Dense(2000)(x))
    return nn.Dense(10)(x)


def test_summary_reproduces_peft_line_for_seed_003():
  params = jax.eval_shape(_Seed003().init, jax.random.key(0), jnp.ones((1, 784)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=1))
  s = lj.summary(lp)
  # PEFT's own format: f"{100 * trainable / total:.4f}" -> 0.2415 (0.241452...)
  assert s.line() == "trainable params: 6,794 || all params: 2,813,804 || trainable%: 0.2415"
  assert len(s.rows) == 3 and "params/Dense_1/kernel" in str(s)


@pytest.mark.parametrize("rank", [2, 32])
@pytest.mark.parametrize("roles, shape", [("io", (48, 40)), ("sio", (3, 48, 40)),
                                          ("ioo", (48, 5, 8)), ("iiio", (3, 3, 8, 40))])
def test_merge_both_fold_paths_match_hand_delta(rank, roles, shape):
  """Low ranks fold as fused rank-1 products, high ranks as a matmul per layer."""
  w = jax.random.normal(jax.random.key(0), shape)
  config = lj.LoraConfig(rank=rank, alpha=3.0, targets="k", layouts={"k": roles})
  lp = randomize_b(lj.lora_init(jax.random.key(1), {"k": w}, config))
  np.testing.assert_allclose(lj.merge(lp)["k"], hand_merge(lp)["k"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lj.unmerge(lj.merge(lp), lj.adapter(lp))["k"], w, atol=1e-5)


@pytest.mark.parametrize("rank", [4, 32])
def test_donated_merge_needs_at_most_one_kernel_of_temp_memory(rank):
  """XLA memory analysis of jit(merge, donate): kernels folded in place, at
  most one ΔW-sized temporary alive at a time (none for rank <= 16)."""
  import warnings
  n = 256
  params = {f"k{i}": jax.random.normal(jax.random.key(i), (n, n)) for i in range(3)}
  lp = lj.lora_init(jax.random.key(9), params, lj.LoraConfig(rank=rank, targets="k.*"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # A and B are donated but have no output to alias
    mem = jax.jit(lj.merge, donate_argnums=0).lower(lp).compile().memory_analysis()
  kernel = n * n * 4
  assert mem.alias_size_in_bytes == 3 * kernel
  assert mem.temp_size_in_bytes <= (1.25 * kernel if rank > 16 else 0.05 * kernel)
