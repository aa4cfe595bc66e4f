"""DoRA (LoraConfig(dora=True)): factored forward equals the merged kernel,
gradients equal a materialized reference, PEFT's dropout formula, no
d_in x d_out temporary beyond LoRA's, merge / checkpoints / optimizer."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax._src import dora

KEYS = jax.random.split(jax.random.key(0), 8)


def _mlp(d_in=8, d_h=6, d_out=5):
  return {"l1": {"kernel": jax.random.normal(KEYS[0], (d_in, d_h))},
          "l2": {"kernel": jax.random.normal(KEYS[1], (d_h, d_out))}}


def _f(p, x):
  return jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]


def _perturb(lp, key=KEYS[3], eps=0.3):
  """Non-zero B and m away from ‖W‖_c, so every DoRA term matters."""
  leaves, treedef = jax.tree.flatten(lp)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + eps * jax.random.normal(k, x.shape)
                                      for k, x in zip(keys, leaves)])


def _ref_kernel(w, a, b, m, s):
  """W' = m · V / ‖V‖_c, V = W + s·A@B formed, the norm a constant (PEFT)."""
  v = w + s * a @ b
  return m[None] * v / jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0))[None]


def _dora_params(p, rank=2, **kw):
  return lj.lora_init(KEYS[2], p, lj.LoraConfig(rank=rank, alpha=3.0, targets=".*kernel",
                                                dora=True, **kw))


def test_init_is_identity_and_m_is_column_norm():
  p = _mlp()
  lp = _dora_params(p)
  x = jax.random.normal(KEYS[4], (3, 8))
  np.testing.assert_allclose(lj.lora(_f)(lp, x), _f(p, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lp["l1"]["kernel"].m, jnp.linalg.norm(p["l1"]["kernel"], axis=0),
                             rtol=1e-6)


def test_factored_equals_merge_and_reference():
  p = _mlp()
  lp = _perturb(_dora_params(p))
  x = jax.random.normal(KEYS[4], (3, 8))
  merged = lj.merge(lp)
  for name in ("l1", "l2"):
    lw = lp[name]["kernel"]
    np.testing.assert_allclose(merged[name]["kernel"],
                               _ref_kernel(lw.w, lw.a, lw.b, lw.m, lw.scale),
                               rtol=1e-5, atol=1e-5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no fallback: the matmuls stay factored
    y = lj.lora(_f, strict=True)(lp, x)
  np.testing.assert_allclose(y, _f(merged, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("roles,shape,spec", [
    ("ioo", (6, 2, 3), "bi,iho->bho"), ("iio", (2, 3, 5), "bhd,hdo->bo")])
def test_multi_axis_kernels(roles, shape, spec):
  w = jax.random.normal(KEYS[0], shape)
  lp = _perturb(lj.lora_init(KEYS[2], {"k": w}, lj.LoraConfig(
      rank=2, targets="k", layouts={"k": roles}, dora=True)))
  x = jax.random.normal(KEYS[4], (4,) + tuple(d for d, r in zip(shape, roles) if r == "i"))
  f = lambda p, x: jnp.einsum(spec, x, p["k"])
  np.testing.assert_allclose(lj.lora(f, strict=True)(lp, x), f(lj.merge(lp), x),
                             rtol=1e-5, atol=1e-5)


def test_scanned_stack_sio():
  w = jax.random.normal(KEYS[0], (3, 6, 6)) / 3
  lp = _perturb(lj.lora_init(KEYS[2], {"k": w}, lj.LoraConfig(
      rank=2, targets="k", layouts={"k": "sio"}, dora=True)), eps=0.1)
  assert lp["k"].m.shape == (3, 6)

  def f(p, x):
    return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, p["k"])[0]
  x = jax.random.normal(KEYS[4], (2, 6))
  np.testing.assert_allclose(lj.lora(f, strict=True)(lp, x), f(lj.merge(lp), x),
                             rtol=1e-5, atol=1e-5)


def test_gradients_equal_materialized_reference():
  p = _mlp()
  lp = _perturb(_dora_params(p))
  x = jax.random.normal(KEYS[4], (3, 8))

  def ref_loss(t):  # t: {name: (a, b, m)}
    q = {n: {"kernel": _ref_kernel(lp[n]["kernel"].w, *t[n], lp[n]["kernel"].scale)}
         for n in ("l1", "l2")}
    return jnp.sum(_f(q, x) ** 2)
  t = {n: (lp[n]["kernel"].a, lp[n]["kernel"].b, lp[n]["kernel"].m) for n in ("l1", "l2")}
  want = jax.grad(ref_loss)(t)
  got = jax.grad(lambda q: jnp.sum(lj.lora(_f)(q, x) ** 2))(lp)
  for n in ("l1", "l2"):
    for k, field in enumerate("abm"):
      np.testing.assert_allclose(getattr(got[n]["kernel"], field), want[n][k],
                                 rtol=2e-4, atol=2e-5)
    assert not np.any(np.asarray(got[n]["kernel"].w))  # W is a constant


def test_dropout_follows_peft_formula():
  # W = 0, A = B = I: ‖V‖_c = 1, so y = m ⊙ xd reveals the dropped-out input xd
  n, rate = 4, 0.5
  x = jax.random.normal(KEYS[4], (16, n)) + 2.0
  m = jnp.arange(1.0, n + 1)
  probe = {"k": lj.LoraWeight(jnp.zeros((n, n)), jnp.eye(n), jnp.eye(n), scale=1.0,
                              roles="io", dropout=rate, m=m)}
  f = lambda p, x: x @ p["k"]
  xd = lj.lora(f)(probe, x, lora_rng=KEYS[5]) / m[None]
  assert 0 < int(jnp.sum(xd == 0)) < xd.size  # some entries dropped, others kept
  w = jax.random.normal(KEYS[0], (n, n))
  a, b = jax.random.normal(KEYS[1], (n, 2)), jax.random.normal(KEYS[2], (2, n))
  m2 = jax.random.uniform(KEYS[3], (n,), minval=0.5, maxval=2.0)
  real = {"k": lj.LoraWeight(w, a, b, scale=0.5, roles="io", dropout=rate, m=m2)}
  y = lj.lora(f)(real, x, lora_rng=KEYS[5])  # same key, same site: the same mask
  g = m2 / jnp.linalg.norm(w + 0.5 * a @ b, axis=0)
  want = x @ w + (g - 1)[None] * (xd @ w) + g[None] * (0.5 * (xd @ a) @ b)  # PEFT's DoRA forward

  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def _train_step_stats(d, dora_on, rank=8, batch=16):
  p = {f"l{i}": {"kernel": jax.random.normal(KEYS[i], (d, d)) / np.sqrt(d)} for i in range(3)}
  lp = lj.lora_init(KEYS[5], p, lj.LoraConfig(rank=rank, targets=".*kernel", dora=dora_on))
  tx = lj.optimizer(optax.adam(1e-3), lp)
  x = jax.random.normal(KEYS[6], (batch, d))

  def f(q, x):
    for i in range(3):
      x = jax.nn.gelu(x @ q[f"l{i}"]["kernel"])
    return x

  def step(q, st):
    loss, g = jax.value_and_grad(lambda q: jnp.mean(lj.lora(f)(q, x) ** 2))(q)
    u, st = tx.update(g, st, q)
    return optax.apply_updates(q, u), st, loss
  compiled = jax.jit(step).lower(lp, tx.init(lp)).compile()
  return compiled.memory_analysis(), compiled.cost_analysis()


def test_no_kernel_sized_temporary_beyond_lora():
  d = 256
  mem_l, _ = _train_step_stats(d, False)
  mem_d, _ = _train_step_stats(d, True)
  kernel_bytes = d * d * 4
  assert mem_d.temp_size_in_bytes - mem_l.temp_size_in_bytes < kernel_bytes, (
      mem_d.temp_size_in_bytes, mem_l.temp_size_in_bytes)


def test_optimizer_trains_m_and_split_combine():
  p = _mlp()
  lp = _perturb(_dora_params(p))
  lab = lj.labels(lp)
  assert lab["l1"]["kernel"].m == "trainable" and lab["l1"]["kernel"].w == "frozen"
  tx = lj.optimizer(optax.sgd(0.1), lp)
  x = jax.random.normal(KEYS[4], (3, 8))
  g = jax.grad(lambda q: jnp.sum(lj.lora(_f)(q, x)))(lp)
  u, _ = tx.update(g, tx.init(lp), lp)
  new = optax.apply_updates(lp, u)
  assert np.any(np.asarray(new["l1"]["kernel"].m != lp["l1"]["kernel"].m))
  np.testing.assert_array_equal(new["l1"]["kernel"].w, lp["l1"]["kernel"].w)
  t, fz = lj.split(lp)
  back = lj.combine(t, fz)
  np.testing.assert_array_equal(back["l1"]["kernel"].m, lp["l1"]["kernel"].m)


def test_checkpoint_round_trip(tmp_path):
  p = _mlp()
  cfg = lj.LoraConfig(rank=2, targets=".*kernel", dora=True)
  lp = _perturb(lj.lora_init(KEYS[2], p, cfg))
  lj.save_adapter(tmp_path / "run", lp, config=cfg)
  q = lj.load_adapter(tmp_path / "run", lj.base(lp))  # _perturb moved W too
  for n in ("l1", "l2"):
    assert q[n]["kernel"].dora
    np.testing.assert_array_equal(q[n]["kernel"].m, lp[n]["kernel"].m)
  x = jax.random.normal(KEYS[4], (3, 8))
  np.testing.assert_array_equal(lj.lora(_f)(q, x), lj.lora(_f)(lp, x))
  ad = lj.adapter(lp)
  assert ad["l1/kernel"].dora and ad["l1/kernel"].m is lp["l1"]["kernel"].m


def test_bad_magnitude_and_unmerge_refused():
  w = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=r"DoRA magnitude m has shape \(4,\).*needs m of shape \(3,\)"):
    lj.LoraWeight(w, jnp.ones((4, 2)), jnp.ones((2, 3)), scale=1.0, roles="io",
                  m=jnp.ones(4))
  lp = _dora_params(_mlp())
  with pytest.raises(ValueError, match="unmerge: the adapter is DoRA"):
    lj.unmerge(lj.merge(lp), lj.adapter(lp))
  with pytest.raises(TypeError, match="LoraConfig.dora must be True or False"):
    lj.LoraConfig(dora="yes")


def test_conv_falls_back_to_formed_kernel_with_warning():
  w = jax.random.normal(KEYS[0], (3, 3, 2, 4))
  lp = _perturb(lj.lora_init(KEYS[2], {"k": w}, lj.LoraConfig(
      rank=2, targets="k", layouts={"k": "iiio"}, dora=True)), eps=0.1)
  f = lambda p, x: jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = jax.random.normal(KEYS[4], (1, 5, 5, 2))
  with pytest.warns(lj.LoraFallbackWarning):
    y = lj.lora(f)(lp, x)
  np.testing.assert_allclose(y, f(lj.merge(lp), x), rtol=1e-5, atol=1e-5)


def test_column_norm_factored_matches_formed():
  lw = _perturb(_dora_params(_mlp()))["l1"]["kernel"]
  np.testing.assert_allclose(dora.column_norm(lw),
                             jnp.linalg.norm(lw.w + lj.delta(lw), axis=0), rtol=1e-5)


def test_stack_of_dora_adapters_is_refused():
  lp = _dora_params(_mlp())
  with pytest.raises(ValueError, match="adapter 'x' is DoRA"):
    lj.stack_adapters([lj.adapter(lp)], names=["x"])
