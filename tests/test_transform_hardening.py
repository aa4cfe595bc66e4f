"""Hardening of lora() and layout inference (issue 9, items 7, 8, 9 and dropout).

* b = 0: each adapted product is exactly x·W; whole models agree to rounding;
* layouts read through w[i], squeezes and size-1 axes; an unsettled layout
  names the op that stopped the trace; trace= with non-array leaves;
* grouped / depthwise convs: W + ΔW by design, no warning, correct;
* dropout: one random stream per call, a warning when the key is missing.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import compat
from layer_cases import is_lw, randomize_b

KEY = jax.random.key(0)


def _maybe_jit(fn, jit):
  return jax.jit(fn) if jit else fn


def _init(params, targets, fn, *args, **kw):
  config = lj.LoraConfig(rank=1, targets=targets, **kw)
  return lj.lora_init(jax.random.key(1), params, config, trace=lambda p: fn(p, *args))


# ------------------------------------------------------- b = 0, how exact

class _ConvBn(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    x = nn.relu(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _Mixed(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(1)(x)                     # then a size-1 contraction, with bias
    x = nn.Dense(5)(x)
    x = nn.LayerNorm()(nn.gelu(x))
    return nn.DenseGeneral((2, 3))(x)


def _scan(p, x):
  return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]


def _products():
  """Models whose output is an adapted product itself: (fn, params, x)."""
  x = jax.random.normal(KEY, (4, 6))
  ks = jax.random.split(KEY, 6)
  return {
      "dense": (lambda p, x: x @ p["w"], {"w": jax.random.normal(ks[0], (6, 5))}, x),
      "size1": (lambda p, x: x[:, :1] @ p["w"], {"w": jax.random.normal(ks[1], (1, 5))}, x),
      "dense_general": (lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["w"]),
                        {"w": jax.random.normal(ks[2], (6, 2, 3))}, x),
      "conv": (lambda p, x: jax.lax.conv_general_dilated(
          x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
               {"w": jax.random.normal(ks[3], (3, 3, 2, 4))},
               jax.random.normal(ks[4], (2, 5, 5, 2))),
      "scan": (_scan, {"w": 0.3 * jax.random.normal(ks[5], (3, 6, 6))}, x),
  }


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", ["dense", "size1", "dense_general", "conv", "scan"])
def test_fresh_adapter_leaves_each_adapted_product_bit_for_bit(name, jit):
  fn, params, x = _products()[name]
  lp = _init(params, "w", fn, x)
  out = _maybe_jit(lj.lora(fn), jit)(lp, x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(_maybe_jit(fn, jit)(params, x)))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("model,shape", [(_ConvBn(), (2, 5, 5, 1)), (_Mixed(), (8, 1))])
def test_fresh_adapter_keeps_whole_models_to_rounding(model, shape, jit):
  """Around the products XLA may round differently (an FMA it forms only
  without the zero branch; jnp's jitted mean/var run op by op eagerly):
  the promise is agreement to a few ulps of the output's scale."""
  x = jax.random.normal(KEY, shape)
  variables = model.init(jax.random.key(2), x)
  variables = jax.tree.map(  # non-trivial BatchNorm statistics and biases
      lambda v: v + 0.3 * jax.random.normal(jax.random.key(3), v.shape), variables)
  lp = _init(variables, ".*kernel", model.apply, x)
  out = np.asarray(_maybe_jit(lj.lora(model.apply), jit)(lp, x))
  ref = np.asarray(_maybe_jit(model.apply, jit)(variables, x))
  tol = 8 * np.finfo(np.float32).eps * np.max(np.abs(ref))
  np.testing.assert_allclose(out, ref, rtol=0, atol=tol)


def test_init_docstring_states_the_true_guarantee():
  doc = " ".join(lj.lora_init.__doc__.split())
  assert "exactly ``x·W``" in doc and "rounding" in doc


# ------------------------------------------- layouts through w[i], squeeze

def _gemma_gating(p, x):
  """DeepMind Gemma's gating einsum: a (2, d, ff) kernel indexed [0] and [1]."""
  w = p["gating"].transpose(0, 2, 1)
  gate = jnp.einsum("bd,fd->bf", x, w[0])
  up = jnp.einsum("bd,fd->bf", x, w[1])
  return jax.nn.gelu(gate) * up


def _indexed(p, x, i):
  return (x @ p["dyn"][i] + x @ jnp.take(p["take"], 1, axis=0)
          + x @ p["unit"].reshape(6, 5) + x @ jnp.squeeze(p["sq"], 1)
          + jnp.einsum("bd,lde->lbe", x, jnp.expand_dims(p["sq"][:, 0], 0))[0])


def _indexed_params():
  ks = jax.random.split(KEY, 4)
  return {"dyn": jax.random.normal(ks[0], (3, 6, 5)), "take": jax.random.normal(ks[1], (2, 6, 5)),
          "unit": jax.random.normal(ks[2], (1, 6, 5)), "sq": jax.random.normal(ks[3], (6, 1, 5))}


@pytest.mark.parametrize("jit", [False, True])
def test_gemma_indexed_gating_kernel_is_stacked_and_stays_factored(jit):
  params = {"gating": jax.random.normal(KEY, (2, 6, 8))}
  x = jax.random.normal(jax.random.key(1), (3, 6))
  lp = randomize_b(_init(params, "gating", _gemma_gating, x))
  assert lp["gating"].roles == "sio"
  out = _maybe_jit(lj.lora(_gemma_gating, strict=True), jit)(lp, x)
  np.testing.assert_allclose(out, _gemma_gating(lj.merge(lp), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_indexing_squeeze_and_unit_axes_are_inferred_and_factored(jit):
  params, x = _indexed_params(), jax.random.normal(jax.random.key(1), (3, 6))
  lp = randomize_b(_init(params, ".*", _indexed, x, 1))
  roles = {k: v.roles for k, v in lp.items()}
  assert roles == {"dyn": "sio", "take": "sio", "unit": "iio", "sq": "iio"}
  f = _maybe_jit(lambda p, x, i: lj.lora(_indexed, strict=True)(p, x, i), jit)
  for i in (0, 2):  # a traced index under jit: dynamic_slice
    np.testing.assert_allclose(f(lp, x, i), _indexed(lj.merge(lp), x, i), rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(jnp.sin(lj.lora(_indexed, strict=True)(p, x, 1))))(lp)
  ref = jax.grad(lambda p: jnp.sum(jnp.sin(_indexed(lj.merge(p), x, 1))))(lp)
  for k in params:
    np.testing.assert_allclose(g[k].b, ref[k].b, rtol=1e-4, atol=1e-4)


def test_scalar_embedding_lookup_stays_an_embedding():
  params = {"emb": jax.random.normal(KEY, (10, 4))}
  f = lambda p, t: jnp.take(p["emb"], t, axis=0) * 2.0  # one token: a point gather
  lp = randomize_b(_init(params, "emb", lambda p, t: p["emb"][t], jnp.array([1, 2])))
  assert lp["emb"].roles == "io"
  with warnings.catch_warnings():
    warnings.simplefilter("error", lj.LoraFallbackWarning)
    np.testing.assert_allclose(lj.lora(f)(lp, 3), f(lj.merge(lp), 3), rtol=1e-6)


def test_unsettled_layout_names_the_op_that_stopped_the_trace():
  params = {"w": jnp.ones((2, 6, 5))}
  x = jnp.ones((3, 6))
  with pytest.raises(ValueError) as err:
    _init(params, "w", lambda p, x: x @ jnp.sin(p["w"][0]), x)
  msg = str(err.value)
  assert "`sin`" in msg and "layout of w" in msg and "layouts=" in msg
  assert "trace=" not in msg  # the user passed one: do not tell them to


def test_trace_with_int_str_none_leaves():
  params = {"w": jnp.ones((2, 6, 5)), "n_layers": 2, "name": "tiny", "extra": None,
            "flag": True}
  fn = lambda p, x: sum(x @ p["w"][k] for k in range(p["n_layers"]))
  lp = _init(params, "w", fn, jnp.ones((3, 6)))
  assert lp["w"].roles == "sio" and lp["name"] == "tiny" and lp["n_layers"] == 2


# ------------------------------------------------ grouped / depthwise convs

class _Grouped(nn.Module):
  groups: int
  features: int

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (3, 3), feature_group_count=self.groups, padding="SAME")(x)
    return nn.Conv(self.features, (1, 1))(nn.relu(x))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("groups,features", [(4, 4), (4, 8), (2, 4)])  # depthwise, x2, grouped
def test_grouped_conv_runs_without_warning_and_matches_merge(groups, features, jit):
  model, x = _Grouped(groups, features), jax.random.normal(KEY, (2, 6, 6, 4))
  variables = model.init(jax.random.key(1), x)
  lp = randomize_b(_init(variables, ".*kernel", model.apply, x))
  assert lp["params"]["Conv_0"]["kernel"].roles == "iiio"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    f = _maybe_jit(lj.lora(model.apply, strict=True), jit)
    out = f(lp, x)
    g = jax.grad(lambda p: jnp.sum(lj.lora(model.apply, strict=True)(p, x) ** 2))(lp)
  np.testing.assert_allclose(out, model.apply(lj.merge(lp), x), rtol=1e-5, atol=1e-5)
  ref = jax.grad(lambda p: jnp.sum(model.apply(lj.merge(p), x) ** 2))(lp)
  got, want = g["params"]["Conv_0"]["kernel"], ref["params"]["Conv_0"]["kernel"]
  np.testing.assert_allclose(got.a, want.a, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got.b, want.b, rtol=1e-4, atol=1e-4)
  assert not np.any(np.asarray(got.w))  # the frozen kernel still gets no gradient


def test_grouped_conv_dropout_touches_only_the_branch():
  model, x = _Grouped(4, 4), jax.random.normal(KEY, (2, 6, 6, 4))
  variables = model.init(jax.random.key(1), x)
  lp = randomize_b(_init(variables, ".*Conv_0/kernel", model.apply, x, dropout=0.5))
  f = lj.lora(lambda p, x: jax.lax.conv_general_dilated(
      x, p["params"]["Conv_0"]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4))
  key = jax.random.key(7)
  base = f(jax.tree.map(lambda v: v.replace(b=0 * v.b) if is_lw(v) else v, lp, is_leaf=is_lw),
           x, lora_rng=key)
  y1 = f(lp, x, lora_rng=key)
  y2 = f(jax.tree.map(lambda v: v.replace(b=2 * v.b) if is_lw(v) else v, lp, is_leaf=is_lw),
         x, lora_rng=key)
  no_drop = f(lp, x)
  assert not np.allclose(y1, no_drop)  # dropout is on
  np.testing.assert_allclose(y2 - base, 2 * (y1 - base), rtol=1e-4, atol=1e-5)  # linear in B


def test_fallback_warning_names_paths_as_the_user_knows_them():
  variables = {"params": {"Dense_0": {"kernel": jnp.ones((4, 3))}}}
  lp = lj.lora_init(KEY, variables, lj.LoraConfig(rank=1))
  f = lambda v, x: x @ jnp.sin(v["params"]["Dense_0"]["kernel"])
  with pytest.warns(lj.LoraFallbackWarning) as rec:
    lj.lora(f)(lp, jnp.ones((2, 4)))
  msg = str(rec[0].message)
  assert "for params/Dense_0/kernel." in msg and "0/0/" not in msg
  with pytest.raises(NotImplementedError, match=r"for params/Dense_0/kernel\. "):
    lj.lora(f, strict=True)(lp, jnp.ones((2, 4)))


# ----------------------------------------------------------------- dropout

def _two_sites(p, x):
  return x @ p["w1"] + x @ p["w2"] + jnp.tanh(x @ p["w3"]) @ p["w4"]


def _dropout_lp(rate):
  ks = jax.random.split(KEY, 4)
  params = {f"w{k + 1}": jax.random.normal(ks[k], (8, 8)) for k in range(4)}
  return randomize_b(lj.lora_init(jax.random.key(1), params,
                                  lj.LoraConfig(rank=2, targets="w.", dropout=rate)))


def _prims(jaxpr, names):
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in names
    for sub in compat.jaxprs_in_params(eqn.params):
      n += _prims(sub, names)
  return n


def test_dropout_derives_one_key_per_call_not_one_per_site():
  lp, x = _dropout_lp(0.2), jnp.ones((3, 8))
  jaxpr = jax.make_jaxpr(lambda p, k: lj.lora(_two_sites)(p, x, lora_rng=k))(lp, KEY).jaxpr
  key_ops = ("random_fold_in", "random_split", "random_bits", "random_wrap")
  assert _prims(jaxpr, key_ops) == 1           # before: a fold_in and a draw per site (8)
  assert _prims(jaxpr, ("threefry2x32",)) == 4  # one draw per site


def test_dropout_sites_draw_independent_masks():
  lp, x = _dropout_lp(0.5), jnp.ones((64, 8))
  same = jax.tree.map(lambda v: v, lp, is_leaf=is_lw)
  same["w2"] = same["w1"]  # two identical adapters on the same input
  f = lambda p, x: (x @ p["w1"], x @ p["w2"])
  y1, y2 = lj.lora(f)(same, x, lora_rng=jax.random.key(3))
  assert not np.allclose(y1, y2)


def test_dropout_without_key_warns_once_per_lora_fn():
  lp, x = _dropout_lp(0.1), jnp.ones((3, 8))
  f = lj.lora(_two_sites)
  with pytest.warns(UserWarning, match=r"lora_rng.*w1 \(dropout=0.1\)|w1 \(dropout=0.1\).*lora_rng"):
    f(lp, x)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    f(lp, x)                                  # eval loop: no repeat
    jax.jit(f)(lp, x)
    f(lp, x, lora_rng=KEY)                    # with a key: nothing to say
    lj.lora(_two_sites)(_dropout_lp(0.0), x)  # no dropout: nothing to say


def test_transform_docstring_is_self_contained():
  from lora_jax._src import transform
  assert "DESIGN.md" not in transform.__doc__
