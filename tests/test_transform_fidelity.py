"""lora() on the JAX large-model code writes: custom derivative rules,
shard_map, barriers, module state passed through control flow, vmapped
ensembles. Every check is against a hand-materialized W + s·A·B, and "never
merged" is checked in the lowered program (no dot_general producing a
kernel-shaped array), not in the interpreter's own bookkeeping."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax._src import layout

X = jnp.linspace(-1.0, 1.0, 3 * 8).reshape(3, 8)  # batch 3: no kernel dim is 3


def _lw(shape=(8, 16), rank=4, seed=0, roles=None):
  p = {"w": jax.random.normal(jax.random.key(seed), shape) / 3}
  config = lj.LoraConfig(rank=rank, targets="w", layouts={"w": roles} if roles else None)
  lw = lj.lora_init(jax.random.key(seed + 1), p, config)["w"]
  return lw.replace(b=0.3 * jax.random.normal(jax.random.key(seed + 2), lw.b.shape))


def _merged(lw, a, b):
  return lw.w + lw.scale * a @ b


def _products(fn, *args, shapes):
  """dot_generals in ``fn``'s lowered program whose result is kernel-shaped."""
  text = jax.jit(fn).lower(*args).as_text()
  pats = ["-> tensor<" + "x".join(map(str, s)) + "xf32>" for s in shapes]
  return [ln for ln in text.splitlines()
          if "dot_general" in ln and any(p in ln for p in pats)]


def _check_grads(f, lp, x, ref_of_w, tol=1e-5):
  """Values and dA, dB of ``lora(f)`` against ``ref_of_w(W + s·A·B, x)``."""
  names = [k for k, v in lp.items() if isinstance(v, lj.LoraWeight)]

  def loss(ab):
    q = dict(lp, **{k: lp[k].replace(a=ab[k][0], b=ab[k][1]) for k in names})
    return jnp.sum(jnp.sin(lj.lora(f)(q, x)))

  def ref(ab):
    q = dict(lp, **{k: _merged(lp[k], *ab[k]) for k in names})
    return jnp.sum(jnp.sin(ref_of_w(q, x)))
  ab = {k: (lp[k].a, lp[k].b) for k in names}
  np.testing.assert_allclose(loss(ab), ref(ab), rtol=tol, atol=tol)
  got, want = jax.grad(loss)(ab), jax.grad(ref)(ab)
  for k in names:
    for g, w in zip(got[k], want[k]):
      np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
  return got


# ------------------------------------------------------ custom derivative rules

@jax.custom_jvp
def half_grad_matmul(x, w):
  return x @ w


@half_grad_matmul.defjvp
def _half_grad_jvp(primals, tangents):  # differs from autodiff: dW scaled by 0.5
  (x, w), (dx, dw) = primals, tangents
  return x @ w, dx @ w + 0.5 * (x @ dw)


@jax.custom_vjp
def fake_quant(w):
  return jnp.round(w * 4.0) / 4.0


fake_quant.defvjp(lambda w: (fake_quant(w), None), lambda _, g: (g,))  # straight through


def _scaled(p, x):
  return half_grad_matmul(x, p["w"])


def _ste(p, x):
  return x @ fake_quant(p["w"])


_MODES = {
    "plain": lambda f: f,
    "jit": jax.jit,
    "remat": lambda f: jax.checkpoint(f),
    "vmap": lambda f: jax.vmap(f, in_axes=(None, 0)),
}


@pytest.mark.parametrize("mode", list(_MODES))
@pytest.mark.parametrize("fn", [_scaled, _ste], ids=["scaled_jvp", "straight_through"])
def test_custom_rule_reading_a_kernel_keeps_the_users_rule(fn, mode):
  wrap = _MODES[mode]
  lp = {"w": _lw()}
  x = jnp.stack([X, -X]) if mode == "vmap" else X
  inner = (lambda p, x: fn(p, x)) if mode != "remat" else jax.checkpoint(fn)
  f = lambda p, x: wrap(lambda q, y: inner(q, y))(p, x)
  with pytest.warns(lj.LoraFallbackWarning, match="custom-derivative function"):
    got = _check_grads(f, lp, x, f)
  assert float(jnp.abs(got["w"][0]).sum()) > 0  # the STE's gradient reaches A
  assert float(jnp.abs(got["w"][1]).sum()) > 0


def test_scaled_jvp_gives_half_of_autodiffs_gradient():
  lp = {"w": _lw()}
  with pytest.warns(lj.LoraFallbackWarning):
    g_rule = _check_grads(_scaled, lp, X, _scaled)
  g_plain = _check_grads(lambda p, x: x @ p["w"], lp, X, lambda p, x: x @ p["w"])
  np.testing.assert_allclose(g_rule["w"][1], 0.5 * g_plain["w"][1], rtol=1e-5, atol=1e-6)


def test_custom_rule_under_strict_names_function_kernel_and_line():
  with pytest.raises(NotImplementedError) as e:
    lj.lora(_ste, strict=True)({"w": _lw()}, X)
  msg = str(e.value)
  assert "fake_quant" in msg and "custom_vjp_call" in msg and "for w." in msg
  assert "test_transform_fidelity.py" in msg and "strict=True" in msg


def test_primitive_without_rule_under_strict_names_it_the_kernel_and_the_line():
  with pytest.raises(NotImplementedError) as e:
    lj.lora(lambda p, x: x @ jnp.sin(p["w"]), strict=True)({"w": _lw()}, X)
  msg = str(e.value)
  assert "`sin`" in msg and "for w." in msg and "test_transform_fidelity.py" in msg


@jax.custom_jvp
def steep_tanh(x):
  return jnp.tanh(x)


steep_tanh.defjvp(lambda p, t: (steep_tanh(p[0]), 2.0 * t[0]))  # not tanh's derivative


def test_custom_activation_on_the_product_stays_factored():
  f = lambda p, x: steep_tanh(x @ p["w"])
  lp = {"w": _lw()}
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.LoraFallbackWarning)
    _check_grads(f, lp, X, f)
    lj.lora(f, strict=True)(lp, X)
  loss = lambda p: jnp.sum(lj.lora(f, strict=True)(p, X))
  assert not _products(jax.grad(loss), lp, shapes=[(8, 16)])


# ------------------------------------------------- barriers and passed-on state

def test_optimization_barrier_keeps_the_kernel_factored():
  f = lambda p, x: x @ lax.optimization_barrier(p["w"])
  lp = {"w": _lw()}
  _check_grads(f, lp, X, f)
  g = lj.lora(f, strict=True)
  assert not _products(g, lp, X, shapes=[(8, 16)])
  assert not _products(jax.grad(lambda p: jnp.sum(g(p, X))), lp, shapes=[(8, 16)])


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class _Remat(nnx.Module):
  def __init__(self, rngs):
    self.block = _Block(rngs)

  def __call__(self, x):
    y = nnx.remat(lambda b, x: b(x))(self.block, x)  # returns the block's state
    return self.block(y)


def test_nnx_remat_returns_state_without_merging_the_kernels():
  graphdef, state = nnx.split(_Remat(nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)

  def apply(p, x):
    return nnx.merge(graphdef, nnx.State(p))(x)
  lp = lj.lora_init(jax.random.key(1), params, lj.LoraConfig(rank=4, targets=".*kernel"),
                    trace=lambda p: apply(p, X))
  lp = jax.tree.map(lambda n: n.replace(b=n.b + 0.1) if isinstance(n, lj.LoraWeight) else n,
                    lp, is_leaf=lambda n: isinstance(n, lj.LoraWeight))
  f = lj.lora(apply, strict=True)
  np.testing.assert_allclose(f(lp, X), apply(lj.merge(lp), X), rtol=1e-5, atol=1e-5)
  shapes = [(8, 16), (16, 8)]
  assert not _products(f, lp, X, shapes=shapes)
  assert not _products(jax.grad(lambda p: jnp.sum(f(p, X))), lp, shapes=shapes)


def _sq():
  return {"w": _lw((8, 8), seed=3), "ws": _lw((2, 8, 8), seed=5, roles="sio")}


def _passes_state_on(p, x):
  """A kernel through cond, fori_loop and scan (carry and outputs) unchanged."""
  w, h = lax.cond(jnp.sum(x) > 0, lambda w, h: (w, h * 2.0), lambda w, h: (w, h), p["w"], x)
  w, h = lax.fori_loop(0, 2, lambda i, c: (c[0], jnp.tanh(c[1] @ c[0])), (w, h))

  def body(c, w_i):
    w_c, h = c
    return (w_c, jnp.tanh(h @ w_i) @ w_c), w_i
  (w, h), ws = lax.scan(body, (w, h), p["ws"])
  return jnp.tanh(h @ ws[1]) @ w


def test_kernels_passed_through_control_flow_stay_lazy():
  lp = _sq()
  _check_grads(_passes_state_on, lp, X, _passes_state_on, tol=2e-5)
  f = lj.lora(_passes_state_on, strict=True)
  shapes = [(8, 8), (2, 8, 8)]
  assert not _products(f, lp, X, shapes=shapes)
  assert not _products(jax.grad(lambda p: jnp.sum(f(p, X))), lp, shapes=shapes)


def _returns_a_view(p, x):
  w = lax.cond(jnp.sum(x) > 0, lambda w: w, lambda w: w[::-1], p["w"])  # not passed on
  return x @ w


def test_a_kernel_merged_anywhere_is_refused_under_strict_and_seen_in_the_program():
  lp = {"w": _lw((8, 8), seed=3)}
  with pytest.raises(NotImplementedError, match=r"`cond` branch.*strict=True"):
    lj.lora(_returns_a_view, strict=True)(lp, X)
  with pytest.warns(lj.LoraFallbackWarning, match="leaves a `cond` branch"):
    _check_grads(_returns_a_view, lp, X, _returns_a_view)
  with pytest.warns(lj.LoraFallbackWarning):
    assert _products(lj.lora(_returns_a_view), lp, X, shapes=[(8, 8)])  # the check sees it
  with pytest.raises(NotImplementedError, match=r"output of lora\(fn\).*strict=True"):
    lj.lora(lambda p, x: (x @ p["w"], p["w"]), strict=True)(lp, X)


# ------------------------------------------------------------------ shard_map

def _mesh(n):
  return jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def _mlp(smap, mesh):
  def apply(p, x):
    def body(up, down, x):
      return lax.psum(jnp.tanh(x @ up) @ down, "x")  # column- then row-parallel
    specs = (P(None, "x"), P("x", None), P())
    return smap(body, mesh, specs, P())(p["up"], p["down"], x)
  return apply


def _jax_smap(body, mesh, in_specs, out_specs):
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _exp_smap(body, mesh, in_specs, out_specs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.shard_map import shard_map
  return shard_map(body, mesh, in_specs, out_specs)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("smap", [_jax_smap, _exp_smap], ids=["jax", "experimental"])
def test_shard_map_mlp_is_factored(smap, n):
  lp = {"up": _lw((8, 16), rank=2, seed=0), "down": _lw((16, 8), rank=2, seed=4)}
  f = _mlp(smap, _mesh(n))
  _check_grads(f, lp, X, f)
  g = lj.lora(f, strict=True)
  shapes = [(8, 16), (16, 8), (8, 16 // n), (16 // n, 8)]
  assert not _products(g, lp, X, shapes=shapes)
  assert not _products(jax.grad(lambda p: jnp.sum(g(p, X))), lp, shapes=shapes)


def test_shard_map_spec_that_does_not_fit_the_factors_names_both():
  from lora_jax._src import shard_map_rules
  from lora_jax._src.interpreter import _Lazy
  v = _Lazy.from_weight(_lw((8, 16), rank=2), "params/up/kernel")
  v = v.replace(a=jnp.ones((2, 2)))  # A holds kernel axis 0 with 2 rows, not 8
  with pytest.raises(ValueError, match=r"P\('x', None\).*params/up/kernel.*A: \(2, 2\)"):
    shard_map_rules._check_fits(v, P("x", None), _mesh(4))


# ---------------------------------------------------------- vmapped ensembles

def _member(p, x):
  return jnp.tanh(x @ p["w"]) @ p["w2"]


def _ensemble_shared(p, x):
  return jax.vmap(_member, in_axes=(0, None))(p, x)


def _ensemble_batched(p, x):
  return jax.vmap(_member, in_axes=(0, 0))(p, jnp.stack([x] * 5))


@pytest.mark.parametrize("fn", [_ensemble_shared, _ensemble_batched], ids=["shared", "batched"])
def test_vmapped_ensemble_reads_stacked_axes(fn):
  params = {"w": jax.random.normal(jax.random.key(0), (5, 8, 16)) / 3,
            "w2": jax.random.normal(jax.random.key(1), (5, 16, 4)) / 3}
  assert layout.infer_roles(lambda p: fn(p, X), params, ["w", "w2"]) == {
      "w": "sio", "w2": "sio"}
  lp = lj.lora_init(jax.random.key(2), params, lj.LoraConfig(rank=2, targets="w.*"),
                    trace=lambda p: fn(p, X))
  lp = {k: v.replace(b=v.b + 0.1) for k, v in lp.items()}
  _check_grads(fn, lp, X, fn, tol=2e-5)
  lj.lora(fn, strict=True)(lp, X)


def test_nnx_vmap_ensemble_reads_stacked_axes():
  @nnx.split_rngs(splits=5)
  @nnx.vmap
  def make(rngs):
    return _Block(rngs)

  ens = make(nnx.Rngs(0))
  graphdef, state = nnx.split(ens)
  params = nnx.to_pure_dict(state)

  def apply(p, x):
    m = nnx.merge(graphdef, nnx.State(p))
    return nnx.vmap(lambda m, x: m(x), in_axes=(0, None))(m, x)
  roles = layout.infer_roles(lambda p: apply(p, X), params, ["l1/kernel", "l2/kernel"])
  assert roles == {"l1/kernel": "sio", "l2/kernel": "sio"}


def test_stacked_and_input_uses_of_one_kernel_name_both():
  def f(p, x):
    y = jax.vmap(lambda w, x: x @ w, in_axes=(0, 0))(p["w"], jnp.stack([x] * 5))
    z = jnp.einsum("bn,nio->bio", x[:, :5], p["w"])  # axis 0 contracted: an input
    return y, z
  params = {"w": jnp.ones((5, 8, 16))}
  with pytest.raises(ValueError, match=r"(?s)w .*disagree.*axis 0.*dot_general.*"
                     r"test_transform_fidelity.py.*dot_general"):
    layout.infer_roles(lambda p: f(p, X), params, ["w"])


class _Layer(nnx.Module):
  def __init__(self, rngs):
    self.l = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.l(x))


class _Scanned(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap
    def make(rngs):
      return _Layer(rngs)
    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, layer):
      return layer(x)
    return run(x, self.layers)


def test_nnx_scan_over_vmapped_layers_is_factored():
  graphdef, state = nnx.split(_Scanned(nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)

  def apply(p, x):
    return nnx.merge(graphdef, nnx.State(p))(x)
  lp = lj.lora_init(jax.random.key(1), params, lj.LoraConfig(rank=2, targets=".*kernel"),
                    trace=lambda p: apply(p, X))
  assert lp["layers"]["l"]["kernel"].roles == "sio"
  lp = jax.tree.map(lambda n: n.replace(b=n.b + 0.1) if isinstance(n, lj.LoraWeight) else n,
                    lp, is_leaf=lambda n: isinstance(n, lj.LoraWeight))
  f = lj.lora(apply, strict=True)
  np.testing.assert_allclose(f(lp, X), apply(lj.merge(lp), X), rtol=1e-5, atol=1e-5)
  assert not _products(jax.grad(lambda p: jnp.sum(f(p, X))), lp, shapes=[(8, 8), (3, 8, 8)])
