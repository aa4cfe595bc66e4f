"""lora(fn) against merge and a hand-written reference, for every layer kind."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from layer_cases import CASES, EXPECTED_ROLES, case, hand_merge, is_lw, randomize_b


def _maybe_jit(fn, jit):
  return jax.jit(fn) if jit else fn


def _op_by_op(fn, *args):
  """``fn`` evaluated one primitive at a time, as ``lora(fn)`` runs un-jitted.

  Called eagerly, JAX 0.7 runs some of jnp's helpers as one fused XLA
  computation, which moves a float32 result by an ulp (2.4e-7 in the
  ``dense_general`` case) with no LoRA involved; op by op it is bit-exact.
  """
  from jax.extend import core as jex_core
  return jex_core.jaxpr_as_fun(jax.make_jaxpr(fn)(*args))(*jax.tree.leaves(args))


def _close(x, y, tol=2e-5):
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.fixture(autouse=True)
def _no_fallback():
  """Every case must stay on the factored path: a fallback warning fails."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.LoraFallbackWarning)
    yield


@pytest.mark.parametrize("name", CASES)
def test_layouts_read_from_the_trace(name):
  fn, params, args, config, trace = case(name)
  lp = lj.lora_init(jax.random.key(2), params, config, trace=trace)
  roles = {x.roles for x in jax.tree.leaves(lp, is_leaf=is_lw) if is_lw(x)}
  assert roles == EXPECTED_ROLES[name]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_forward_equals_merge_and_hand_reference(name, jit):
  fn, params, args, config, trace = case(name)
  lp = randomize_b(lj.lora_init(jax.random.key(2), params, config, trace=trace))
  out = _maybe_jit(lj.lora(fn), jit)(lp, *args)
  _close(out, fn(lj.merge(lp), *args))
  _close(out, fn(hand_merge(lp), *args))
  # and the adapters really changed something
  assert not np.allclose(np.asarray(jax.tree.leaves(out)[0]),
                         np.asarray(jax.tree.leaves(fn(params, *args))[0]))


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapter_is_an_exact_noop(name):
  fn, params, args, config, trace = case(name)
  lp = lj.lora_init(jax.random.key(2), params, config, trace=trace)
  for jit in (False, True):
    out = _maybe_jit(lj.lora(fn), jit)(lp, *args)
    ref = jax.jit(fn)(params, *args) if jit else _op_by_op(fn, params, *args)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _ab(lp):
  return jax.tree.map(lambda x: (x.a, x.b) if is_lw(x) else None, lp, is_leaf=is_lw)


def _with_ab(lp, ab):
  return jax.tree.map(lambda x, t: x.replace(a=t[0], b=t[1]) if is_lw(x) else x,
                      lp, ab, is_leaf=is_lw)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_grads_equal_materialized_reference(name, jit):
  fn, params, args, config, trace = case(name)
  lp = randomize_b(lj.lora_init(jax.random.key(2), params, config, trace=trace))

  def loss(p):
    return sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(fn(p, *args)))

  grads = _maybe_jit(jax.grad(lambda p: sum(
      jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(lj.lora(fn)(p, *args)))), jit)(lp)
  ref = jax.grad(lambda ab: loss(hand_merge(_with_ab(lp, ab))))(_ab(lp))
  got = _ab(grads)
  _close(got, ref, tol=2e-4)
  # the frozen kernel gets no gradient at all
  for g in jax.tree.leaves(grads, is_leaf=is_lw):
    if is_lw(g):
      assert not np.any(np.asarray(g.w))


def test_split_combine_grads_only_trainable():
  fn, params, args, config, trace = case("dense")
  lp = randomize_b(lj.lora_init(jax.random.key(2), params, config))
  trainable, frozen = lj.split(lp)
  g = jax.grad(lambda t: jnp.sum(lj.lora(fn)(lj.combine(t, frozen), *args) ** 2))(trainable)
  g_full = jax.grad(lambda p: jnp.sum(lj.lora(fn)(p, *args) ** 2))(lp)
  _close(_ab(g), _ab(g_full))
  assert all(x is None or not is_lw(x) or x.w is None
             for x in jax.tree.leaves(g, is_leaf=lambda x: x is None or is_lw(x)))


# ---------------------------------------------------------- JAX transforms

W = jax.random.normal(jax.random.key(3), (8, 8)) / 3


def _lp(**kw):
  config = lj.LoraConfig(rank=2, targets="w", **kw)
  return randomize_b(lj.lora_init(jax.random.key(4), {"w": W}, config))


def _control_flow(p, x, while_loop=True):
  w = p["w"]
  y = jax.checkpoint(lambda a: jnp.tanh(a @ w))(x)
  y = jax.lax.cond(jnp.sum(y) > 0, lambda a: a @ w, lambda a: a @ w.T, y)
  if while_loop:  # not reverse-differentiable in JAX, with or without LoRA
    y = jax.lax.while_loop(lambda c: c[1] < 3,
                           lambda c: (jnp.tanh(c[0] @ w), c[1] + 1), (y, 0))[0]
  y = jax.vmap(lambda r: jnp.einsum("i,ij->j", r, w))(y)
  y = jax.jit(lambda a: a @ w[:, ::-1][2:6, :])(y[:, 2:6])
  return jax.lax.fori_loop(0, 2, lambda i, a: jnp.tanh(a @ w[:4, :4]), y[:, :4])


@pytest.mark.parametrize("jit", [False, True])
def test_control_flow_checkpoint_vmap_slices(jit):
  lp = _lp()
  x = jax.random.normal(jax.random.key(5), (3, 8))
  _close(_maybe_jit(lj.lora(_control_flow), jit)(lp, x), _control_flow(lj.merge(lp), x))
  f = lambda p: jnp.sum(lj.lora(_control_flow)(p, x, while_loop=False))
  g = _maybe_jit(jax.grad(f), jit)(lp)
  ref = jax.grad(lambda ab: jnp.sum(_control_flow(hand_merge(_with_ab(lp, ab)), x, False)))(_ab(lp))
  _close(_ab(g), ref, tol=2e-4)


def test_vmap_and_jit_around_lora():
  lp = _lp()
  f = jax.jit(jax.vmap(lj.lora(lambda p, x: x @ p["w"]), in_axes=(None, 0)))
  x = jnp.ones((5, 2, 8))
  _close(f(lp, x), x @ lj.merge(lp)["w"])


def test_dropout_on_lora_branch_only():
  lp = _lp(dropout=0.5)
  f = lj.lora(lambda p, x: x @ p["w"])
  x = jnp.ones((4, 8))
  no_key = f(lp, x)
  _close(no_key, x @ lj.merge(lp)["w"])  # no key: eval mode
  y1 = f(lp, x, lora_rng=jax.random.key(1))
  y2 = f(lp, x, lora_rng=jax.random.key(2))
  assert not np.allclose(y1, no_key) and not np.allclose(y1, y2)
  # the base path is untouched: y - x@W lies in the span of the dropped-out LoRA branch
  b, s = lp["w"].b, lp["w"].scale
  mask_input = (y1 - x @ W)  # = s * (drop(x) @ a) @ b
  coeff, *_ = np.linalg.lstsq(np.asarray(s * b.T), np.asarray(mask_input.T), rcond=None)
  np.testing.assert_allclose(np.asarray(s * b.T) @ coeff, np.asarray(mask_input.T), atol=1e-4)
  # deterministic for a given key, also under jit and scan
  _close(jax.jit(f)(lp, x, lora_rng=jax.random.key(1)), y1)


def test_dropout_differs_across_scanned_layers():
  fn, params, args, _, trace = case("lax_scan")
  lp = randomize_b(lj.lora_init(jax.random.key(2), params,
                                lj.LoraConfig(rank=2, targets="w", dropout=0.3), trace=trace))
  y = lj.lora(fn)(lp, *args, lora_rng=jax.random.key(0))
  assert y.shape == args[0].shape and np.all(np.isfinite(y))
  assert not np.allclose(y, lj.lora(fn)(lp, *args))


# ----------------------------------------------------- fallback and errors

def test_fallback_warns_once_naming_the_primitive_and_is_correct():
  lp = _lp()
  f = lambda p, x: x @ jnp.sin(p["w"])
  x = jnp.ones((2, 8))
  with pytest.warns(lj.LoraFallbackWarning, match=r"`sin`.*w"):
    y = lj.lora(f)(lp, x)
  _close(y, f(lj.merge(lp), x))


def test_strict_mode_raises():
  with pytest.raises(NotImplementedError, match=r"`sin`.*strict=True"):
    lj.lora(lambda p, x: x @ jnp.sin(p["w"]), strict=True)(_lp(), jnp.ones((2, 8)))


def test_lora_weight_outside_lora_gives_a_clear_error():
  lp = _lp()
  with pytest.raises(TypeError, match=r"not wrapped with lora_jax.lora.*merge"):
    jnp.ones((2, 8)) @ lp["w"]
  with pytest.raises(TypeError, match=r"lora_jax.lora"):
    jnp.asarray(lp["w"])


def test_static_args_and_outputs_pass_through():
  lp = _lp()

  def f(p, x, *, scale, mode="a"):
    return {"y": x @ p["w"] * scale, "mode_is_a": jnp.asarray(mode == "a")}
  out = jax.jit(lj.lora(f), static_argnames=("scale", "mode"))(lp, jnp.ones((1, 8)), scale=2.0)
  _close(out["y"], jnp.ones((1, 8)) @ lj.merge(lp)["w"] * 2.0)
  assert bool(out["mode_is_a"])


def _reshaped_kernels(p, x):
  q = jnp.einsum("bd,dhk->bhk", x, p["w"].reshape(8, 3, 4))          # split the out axis
  o = q.reshape(q.shape[0], 12) @ p["w2"].reshape(12, 8)             # merge two in axes
  o2 = jnp.stack([o, 2 * o])
  y = jnp.einsum("lbd,lde->lbe", o2, p["s"])                           # stacked: batch axis
  z = jnp.einsum("lbd,led->lbe", o2, jnp.transpose(p["s"], (0, 2, 1))) # transposed stack
  return y + z, q


@pytest.mark.parametrize("jit", [False, True])
def test_reshaped_and_transposed_kernels_stay_factored(jit):
  params = {"w": jax.random.normal(jax.random.key(0), (8, 12)),
            "w2": jax.random.normal(jax.random.key(1), (3, 4, 8)),
            "s": jax.random.normal(jax.random.key(2), (2, 8, 8))}
  x = jax.random.normal(jax.random.key(3), (5, 8))
  lp = randomize_b(lj.lora_init(jax.random.key(4), params, lj.LoraConfig(rank=2, targets=".*"),
                                trace=lambda p: _reshaped_kernels(p, x)))
  assert (lp["w"].roles, lp["w2"].roles, lp["s"].roles) == ("io", "iio", "sio")
  _close(_maybe_jit(lj.lora(_reshaped_kernels), jit)(lp, x), _reshaped_kernels(hand_merge(lp), x))
  g = jax.grad(lambda p: jnp.sum(lj.lora(_reshaped_kernels)(p, x)[0]))(lp)
  ref = jax.grad(lambda ab: jnp.sum(_reshaped_kernels(hand_merge(_with_ab(lp, ab)), x)[0]))(_ab(lp))
  _close(_ab(g), ref, tol=2e-4)


def test_flax_model_applied_to_lora_params_without_lora_says_so():
  fn, params, args, config, _ = case("dense")
  lp = lj.lora_init(jax.random.key(2), params, config)
  for apply in (fn, jax.jit(fn)):
    with pytest.raises(TypeError, match=r"LoraWeight reached a function that was not wrapped"):
      apply(lp, *args)


def test_vmap_over_a_stack_of_adapters_on_one_base():
  """Several adapters on one frozen base, served in one batched call."""
  lps = [randomize_b(lj.lora_init(jax.random.key(i), {"w": W},
                                  lj.LoraConfig(rank=2, targets="w")), seed=i) for i in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *lps)
  f = lambda p, x: x @ p["w"]
  x = jnp.ones((2, 8))
  y = jax.jit(jax.vmap(lj.lora(f), in_axes=(0, None)))(stacked, x)
  _close(y, jnp.stack([x @ lj.merge(lp)["w"] for lp in lps]))


def test_custom_vjp_consumer_gets_materialized_kernel_with_a_warning():
  @jax.custom_vjp
  def matmul(x, w):
    return x @ w
  matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))
  lp = _lp()
  f = lambda p, x: matmul(x, p["w"])
  x = jnp.ones((2, 8))
  with pytest.warns(lj.LoraFallbackWarning, match=r"`custom_vjp_call"):
    y = lj.lora(f)(lp, x)
  _close(y, x @ lj.merge(lp)["w"])
  with pytest.raises(NotImplementedError, match="strict=True"):
    lj.lora(f, strict=True)(lp, x)
