"""Bad input to the core API: each gives a clear error naming the field or key
path, what was expected and what was found (issue 9, items 4 and 5 and the
"bad input" list)."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lora_jax as lj

PARAMS = {"d0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
          "d1": {"kernel": jnp.ones((3, 2))}}


def _lp(rank=1, **kw):
  return lj.lora_init(jax.random.key(0), PARAMS, lj.LoraConfig(rank=rank, **kw))


def _unchecked(w, a, b, roles="io"):
  """A LoraWeight rebuilt from leaves (as jax.tree.map does): not checked."""
  proto = lj.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 1)), jnp.ones((1, 3)),
                        scale=1.0, roles="io")
  node = jax.tree_util.tree_unflatten(jax.tree.structure(proto), [w, a, b])
  return node if roles == "io" else node.replace(roles=roles)


# ------------------------------------------------------------------ LoraConfig

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(alpha=0), ValueError, r"LoraConfig.alpha must be a finite number > 0, got 0 "
                                r"\(alpha=0 would turn the adapter off\)"),
    (dict(alpha=-2.0), ValueError, r"LoraConfig.alpha must be a finite number > 0, got -2.0"),
    (dict(alpha=math.nan), ValueError, r"LoraConfig.alpha must be a finite number > 0, got nan"),
    (dict(alpha=math.inf), ValueError, r"LoraConfig.alpha must be a finite number > 0, got inf"),
    (dict(alpha=True), TypeError, r"LoraConfig.alpha must be a real number, got bool True"),
    (dict(alpha="16"), TypeError, r"LoraConfig.alpha must be a real number, got str '16'"),
    (dict(alpha_pattern={"a.*": 0}), ValueError,
     r"LoraConfig.alpha_pattern\['a.\*'\] must be a finite number > 0, got 0"),
    (dict(alpha_pattern={"a": -1}), ValueError, r"alpha_pattern\['a'\] must be a finite number > 0"),
    (dict(alpha_pattern={"a": math.nan}), ValueError, r"alpha_pattern\['a'\] .*got nan"),
    (dict(alpha_pattern={"a": math.inf}), ValueError, r"alpha_pattern\['a'\] .*got inf"),
    (dict(alpha_pattern={"a": None}), TypeError, r"alpha_pattern\['a'\] must be a real number, got NoneType"),
    (dict(rank_pattern={"a": True}), TypeError, r"rank_pattern\['a'\] must be int, got bool True"),
    (dict(rank_pattern={"a": 2.0}), TypeError, r"rank_pattern\['a'\] must be int, got float 2.0"),
    (dict(rank_pattern={"a": -1}), ValueError, r"rank_pattern\['a'\] must be a positive int, got -1"),
    (dict(rank_pattern=[("a", 2)]), TypeError,
     r"LoraConfig.rank_pattern must be a dict \{regex: value\} or None, got list"),
    (dict(rank_pattern={3: 2}), TypeError, r"LoraConfig.rank_pattern: keys must be regex strings, got int 3"),
    (dict(dropout=math.nan), ValueError, r"LoraConfig.dropout must be in \[0, 1\), got nan"),
    (dict(dropout=-0.1), ValueError, r"dropout must be in \[0, 1\), got -0.1"),
    (dict(dropout="0.1"), TypeError, r"LoraConfig.dropout must be a real number, got str"),
    (dict(init=None), ValueError, r"LoraConfig.init must be one of \('kaiming', 'gaussian', "
                                  r"'pissa', 'pissa_niter_K', 'olora'\) .*, got None"),
    (dict(rslora="yes"), TypeError, r"LoraConfig.rslora must be True or False, got str 'yes'"),
    (dict(rslora=1), TypeError, r"LoraConfig.rslora must be True or False, got int 1"),
    (dict(dtype="int8"), ValueError, r"LoraConfig.dtype must be a floating dtype such as "
                                     r"jnp.float32 or jnp.bfloat16 \(or None: the kernel's\), got int8"),
    (dict(dtype=jnp.int32), ValueError, r"LoraConfig.dtype must be a floating dtype.*got int32"),
    (dict(dtype="nope"), TypeError, r"LoraConfig.dtype must be a floating dtype.*got 'nope'"),
    (dict(layouts={"k": "si"}), ValueError,
     r"LoraConfig.layouts\['k'\] must be a string of 's', 'i', 'o' with at least one 'i' and one 'o'"),
    (dict(layouts="sio"), TypeError, r"LoraConfig.layouts must be a dict \{regex: value\} or None, got str"),
    (dict(trainable=["ok", 3]), TypeError, r"LoraConfig.trainable must be a regex string, a list of "
                                           r"regex strings or a callable .*the list holds int 3"),
    (dict(exclude={"a"}), TypeError, r"LoraConfig.exclude must be a regex string.*got set"),
])
def test_config_field_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    lj.LoraConfig(**kwargs)


@pytest.mark.parametrize("field, value, pattern", [
    ("targets", "(unclosed", "(unclosed"), ("exclude", ["ok", "[bad"], "[bad"),
    ("trainable", "*x", "*x"), ("rank_pattern", {"(unclosed": 2}, "(unclosed"),
    ("alpha_pattern", {"[bad": 2.0}, "[bad"), ("layouts", {"*x": "io"}, "*x")])
def test_bad_regex_is_refused_at_construction_naming_field_and_pattern(field, value, pattern):
  with pytest.raises(re.error) as re_error:
    re.compile(pattern)
  with pytest.raises(ValueError) as e:
    lj.LoraConfig(**{field: value})
  assert str(e.value) == f"LoraConfig.{field}: {pattern!r} is not a valid regex: {re_error.value}"


def test_config_accepts_numpy_scalars_and_records_plain_json():
  cfg = lj.LoraConfig(rank=np.int64(4), alpha=np.float32(8), rank_pattern={"q.*": np.int32(2)},
                      alpha_pattern={"q.*": np.float64(3)}, dropout=np.float32(0.5),
                      rslora=np.bool_(False), dtype=jnp.bfloat16)
  assert cfg.rank == 4 and type(cfg.rank) is int and type(cfg.alpha) is float
  assert cfg.rank_for("qk") == 2 and cfg.scale_for("qk") == 1.5 and cfg.scale_for("v") == 2.0
  d = json.loads(json.dumps(cfg.to_dict()))
  assert d["dtype"] == "bfloat16" and d["rank_pattern"] == {"q.*": 2} and d["dropout"] == 0.5


# ------------------------------------------------------- LoraWeight construction

@pytest.mark.parametrize("w, a, b, roles, match", [
    ((4, 3), (4, 2), (3, 3), "io", r"a has rank 2 \(its last axis, shape \(4, 2\)\) but b has "
                                   r"rank 3 \(axis 0, shape \(3, 3\)\)"),
    ((4, 3), (5, 2), (2, 3), "io", r"a has shape \(5, 2\); w of shape \(4, 3\) with roles 'io' "
                                   r"needs a of shape \(4, 2\)"),
    ((4, 3), (4, 2), (2, 5), "io", r"b has shape \(2, 5\); w of shape \(4, 3\) with roles 'io' "
                                   r"needs b of shape \(2, 3\)"),
    ((4, 3, 2), (4, 2), (2, 3), "io", r"w has shape \(4, 3, 2\) \(3 axes\) but roles 'io' name 2 axes"),
    ((4, 3), (4, 2, 1), (2, 3), "io", r"a has shape \(4, 2, 1\) \(3 axes\); roles 'io' need 2"),
    ((3, 4, 2), (3, 4, 1), (2, 1, 2), "sio", r"a's stacked axes \(3,\) differ from b's \(2,\)"),
    (None, (4, 2), (1, 3), "io", r"a has rank 2 .* but b has rank 1"),
])
def test_lora_weight_refuses_factors_that_do_not_fit(w, a, b, roles, match):
  w = None if w is None else jnp.ones(w)
  with pytest.raises(ValueError, match=r"LoraWeight: the factors do not fit: " + match):
    lj.LoraWeight(w, jnp.ones(a), jnp.ones(b), scale=1.0, roles=roles)


def test_lora_weight_field_errors():
  w, a, b = jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"a has dtype int32; the factors must be floating point"):
    lj.LoraWeight(w, a.astype(jnp.int32), b, scale=1.0, roles="io")
  with pytest.raises(TypeError, match=r"LoraWeight.roles must be a string of 's', 'i', 'o' with at "
                                      r"least one 'i' and one 'o' \(e.g. 'io', 'sio'\), got 'ii'"):
    lj.LoraWeight(w, a, b, scale=1.0, roles="ii")
  with pytest.raises(ValueError, match=r"LoraWeight.scale must be finite, got nan"):
    lj.LoraWeight(w, a, b, scale=math.nan, roles="io")
  with pytest.raises(ValueError, match=r"LoraWeight.dropout must be in \[0, 1\), got 1.5"):
    lj.LoraWeight(w, a, b, scale=1.0, roles="io", dropout=1.5)
  with pytest.raises(TypeError, match=r"LoraWeight.scale must be a static Python number"):
    lj.LoraWeight(w, a, b, scale=True, roles="io")
  lw = lj.LoraWeight(w, a, b, scale=1.0, roles="io")
  with pytest.raises(ValueError, match=r"b has shape \(2, 5\); .*needs b of shape \(2, 3\)"):
    lw.replace(b=jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match=r"Trainable: value has shape \(3,\) but base has shape \(4,\)"):
    lj.Trainable(jnp.ones(3), jnp.ones(4))


def test_lora_weight_accepts_what_jax_and_libraries_put_in_it():
  a, b = jnp.ones((4, 2)), jnp.zeros((2, 3))
  sds = jax.ShapeDtypeStruct
  for w, fa, fb in [(None, a, b), (P("x", None), P(), P()), (object(), object(), None),
                    (sds((4, 3), jnp.float32), sds((4, 2), jnp.float32), sds((2, 3), jnp.float32)),
                    ("frozen", "trainable", "trainable")]:
    lj.LoraWeight(w, fa, fb, scale=1.0, roles="io")
  with pytest.raises(ValueError, match=r"a has shape \(5, 2\)"):
    lj.LoraWeight(sds((4, 3), jnp.float32), sds((5, 2), jnp.float32), None, scale=1.0, roles="io")
  # tracers (jit, vmap) are checked on their per-call shapes
  lw = _lp()["d0"]["kernel"]
  jax.jit(lambda lw: lw.replace(scale=2.0))(lw)
  jax.vmap(lambda a: lw.replace(a=a).a.sum())(jnp.ones((5, 4, 1)))
  # rebuilt from leaves (a stack of adapters), no check; merge checks
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), lw, lw)
  assert stacked.w.shape == (2, 4, 3)
  with pytest.raises(ValueError, match=r"merge: .*\n  k: w has shape \(2, 4, 3\) \(3 axes\) "
                                       r"but roles 'io' name 2 axes"):
    lj.merge({"k": stacked})


# --------------------------------------------------- array use outside lora()

_OUTSIDE = {
    "W.T": lambda W: W.T,
    "W + 1": lambda W: W + 1,
    "1 + W": lambda W: 1 + W,
    "W * 2": lambda W: W * 2,
    "-W": lambda W: -W,
    "W[0]": lambda W: W[0],
    "W @ x": lambda W: W @ jnp.ones(W.shape[-1] if hasattr(W, "shape") else 3),
    "x @ W": lambda W: jnp.ones(4) @ W,
    "np x @ W": lambda W: np.ones(4) @ W,
    "W < 0": lambda W: W < 0,
    "jnp.asarray(W)": jnp.asarray,
    "np.asarray(W)": np.asarray,
    "jnp.dot(x, W)": lambda W: jnp.dot(jnp.ones(4), W),
    "W.astype": lambda W: W.astype(jnp.bfloat16),
    "W.reshape": lambda W: W.reshape(-1),
    "W.sum()": lambda W: W.sum(),
    "W.at": lambda W: W.at[0].set(1.0),
    "len(W)": len,
    "list(W)": list,
    "bool(W)": bool,
    "float(W)": float,
}


@pytest.mark.parametrize("expr", sorted(_OUTSIDE))
@pytest.mark.parametrize("kind", ["LoraWeight", "Trainable"])
def test_array_use_outside_lora_says_wrap_or_merge(expr, kind):
  lp = _lp(trainable="d0/bias")
  node = lp["d0"]["kernel"] if kind == "LoraWeight" else lp["d0"]["bias"]
  with pytest.raises(TypeError) as e:
    _OUTSIDE[expr](node)
  msg = str(e.value)
  assert msg.startswith(f"A {'LoraWeight' if kind == 'LoraWeight' else 'Trainable leaf'} "
                        "reached a function that was not wrapped with lora_jax.lora")
  assert "lora_jax.lora(apply_fn)(params, ...)" in msg and "lora_jax.merge(params)" in msg


def test_array_use_under_jit_and_what_still_works():
  lp = _lp()
  W = lp["d0"]["kernel"]
  with pytest.raises(TypeError, match=r"LoraWeight reached a function .*\(tried `.T`\)"):
    jax.jit(lambda p: p["d0"]["kernel"].T)(lp)
  with pytest.raises(TypeError, match=r"\(tried `x \+ ...`\)"):
    W + 1
  # the node's own attributes, and probes that must answer "no", still work
  assert W.shape == (4, 3) and W.dtype == jnp.float32 and W.ndim == 2 and W.rank == 1
  assert W.w.shape == (4, 3) and W.a.shape == (4, 1) and W.b.shape == (1, 3)
  assert W.replace(scale=3.0).scale == 3.0
  assert not hasattr(W, "T") and getattr(W, "sharding", None) is None
  with pytest.raises(AttributeError, match=r"'LoraWeight' object has no attribute 'nope'"):
    W.nope
  assert W == W and W in [W] and {W: 1}[W] == 1  # identity comparison and hashing stay


# -------------------------------------- wrong trees: merge, delta, base, summary

def test_delta_errors():
  lp = _lp()
  with pytest.raises(TypeError, match=r"delta: expected one LoraWeight node, got an array "
                                      r"float32\[4, 3\]\. Pass a node of the params from lora_init"):
    lj.delta(PARAMS["d0"]["kernel"])
  with pytest.raises(TypeError, match=r"delta: expected one LoraWeight node, got a dict"):
    lj.delta(lp)
  bad = _unchecked(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=r"delta: inconsistent LoraWeight: a has rank 2 \(its last "
                                       r"axis, shape \(4, 2\)\) but b has rank 1"):
    lj.delta(bad)
  bad = _unchecked(jnp.ones((4, 3)), jnp.ones((5, 1)), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=r"delta: inconsistent LoraWeight: a has shape \(5, 1\); w of "
                                       r"shape \(4, 3\) with roles 'io' needs a of shape \(4, 1\)"):
    lj.delta(bad)


def test_merge_refuses_inconsistent_factors_naming_the_path():
  """Before: merge used part of b and returned a wrong kernel silently."""
  lp = _lp()
  lp["d1"]["kernel"] = _unchecked(jnp.ones((3, 2)), jnp.ones((3, 1)), jnp.ones((2, 2)))
  with pytest.raises(ValueError, match=r"merge: the params hold LoRA nodes that cannot be used:\n"
                                       r"  d1/kernel: a has rank 1 .* but b has rank 2"):
    lj.merge(lp)


def test_adapter_alone_where_params_are_expected():
  ad = lj.adapter(_lp(trainable="d0/bias"))
  hint = (r"d0/kernel: a LoraWeight without its base kernel \(w=None\), as in lj.adapter\(...\), "
          r"a loaded adapter or the trainable half of lj.split\(...\); put it on the base params "
          r"first: lj.attach\(base_params, adapter\) \(or join split halves with "
          r"lj.combine\(trainable, frozen\)\)")
  for fn, name in ((lj.merge, "merge"), (lj.base, "base")):
    with pytest.raises(ValueError, match=f"{name}: the params hold LoRA nodes that cannot be used:"
                                         rf"\n  d0/bias: a Trainable leaf without its base.*\n  {hint}"):
      fn(ad)
  with pytest.raises(ValueError, match=r"summary: the params hold LoRA nodes that cannot be counted:"
                                       rf"\n  {hint}"):
    lj.summary(ad)
  with pytest.raises(ValueError, match=r"attach: the params hold LoRA nodes"):
    lj.attach(ad, ad)


def test_adapter_of_plain_params():
  with pytest.raises(ValueError, match=r"adapter: the params hold no LoraWeight or Trainable node "
                                       r"\(found 3 plain leaves\); pass the params returned by "
                                       r"lora_jax.lora_init"):
    lj.adapter(PARAMS)


# ------------------------------------------------------------ attach / unmerge

@pytest.mark.parametrize("what", ["attach", "unmerge"])
def test_adapter_argument_of_the_wrong_kind(what):
  lp = _lp()
  fn = (lambda a: lj.attach(PARAMS, a)) if what == "attach" else (
      lambda a: lj.unmerge(lj.merge(lp), a))
  nested = (rf"{what}: the adapter maps each path to a LoraWeight or Trainable, but holds "
            r"'d0': a dict, 'd1': a dict \(these look like nested params: call lj.adapter\(...\) "
            r"on them first\). Pass lj.adapter\(lora_params\)")
  with pytest.raises(TypeError, match=nested):
    fn(lp)       # LoRA params instead of lj.adapter(lp)
  with pytest.raises(TypeError, match=nested):
    fn(PARAMS)   # plain params
  with pytest.raises(TypeError, match=rf"{what}: the adapter must be a dict; got an array float32\[3\]"):
    fn(jnp.ones(3))
  with pytest.raises(ValueError, match=rf"{what}: the adapter is empty"):
    fn({})
  ad = lj.adapter(lp)
  ad["d0/kernel"] = _unchecked(None, jnp.ones((4, 2)), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=rf"{what}: the adapter is inconsistent:\n  d0/kernel: a has "
                                       r"rank 2 .* but b has rank 1"):
    fn(ad)


def test_attach_adapter_from_another_lora_init():
  ad_other_targets = lj.adapter(lj.lora_init(
      jax.random.key(0), {"x": PARAMS}, lj.LoraConfig(rank=1)))
  with pytest.raises(ValueError, match=r"(?s)attach: the adapter does not match the params:\n"
                                       r"  x/d0/kernel: not in the base params.*Paths that exist:"
                                       r"\n  d0/bias\n  d0/kernel\n  d1/kernel"):
    lj.attach(PARAMS, ad_other_targets)
  bigger = {"d0": {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)}, "d1": {"kernel": jnp.ones((3, 2))}}
  ad = lj.adapter(lj.lora_init(jax.random.key(0), bigger, lj.LoraConfig(rank=2)))
  with pytest.raises(ValueError, match=r"d0/kernel: the adapter does not fit the base kernel of shape "
                                       r"\(4, 3\): adapter has \{'a': \(6, 2\), 'b': \(2, 3\)\}, "
                                       r"the base needs \{'a': \(4, 2\), 'b': \(2, 3\)\}"):
    lj.attach(PARAMS, ad)
  with pytest.raises(ValueError, match=r"d0/kernel: the base params hold a str here, expected an array"):
    lj.attach({"d0": {"kernel": "oops"}, "d1": PARAMS["d1"]}, lj.adapter(_lp()))
  with pytest.raises(ValueError, match=r"Paths that exist:\n  \(the root: the params are a single leaf\)"):
    lj.attach(jnp.ones((4, 3)), lj.adapter(_lp()))


def test_unmerge_of_params_that_still_hold_adapters():
  lp = _lp()
  with pytest.raises(ValueError, match=r"unmerge: the params still hold LoRA nodes at \['d0/kernel', "
                                       r"'d1/kernel'\]; unmerge subtracts an adapter from merged plain "
                                       r"params \(lj.merge\(params\)\). To turn the adapters off, use "
                                       r"lj.base\(params\)."):
    lj.unmerge(lp, lj.adapter(lp))


# -------------------------------------------- split / combine / optimizer

def test_combine_halves_from_different_lora_inits():
  t, f = lj.split(_lp())
  _, f_other = lj.split(_lp(targets="d0/kernel"))
  with pytest.raises(ValueError, match=r"combine: trainable and frozen are not the two halves of one "
                                       r"lj.split\(params\) \(their structures differ\):\n  d1/kernel: "
                                       r"trainable has LoraWeight\(scale=1.0, roles='io', dropout=0.0\), "
                                       r"frozen has a leaf"):
    lj.combine(t, f_other)
  with pytest.raises(ValueError, match=r"d0/kernel: trainable has a leaf, frozen has LoraWeight"):
    lj.combine(PARAMS, f)
  with pytest.raises(ValueError, match=r"d0/kernel: trainable has LoraWeight\(scale=1.0, .*frozen "
                                       r"has LoraWeight\(scale=2.0"):
    lj.combine(t, lj.split(_lp(alpha=2.0))[1])
  with pytest.raises(ValueError, match=r"combine: both halves hold a value at \['d0/kernel/a', "
                                       r"'d0/kernel/b', 'd1/kernel/a', 'd1/kernel/b'\]; combine takes "
                                       r"\(trainable, frozen\) = lj.split\(params\)"):
    lj.combine(t, t)
  bigger = {"d0": {"kernel": jnp.ones((6, 3)), "bias": jnp.zeros(3)}, "d1": {"kernel": jnp.ones((3, 2))}}
  _, f_big = lj.split(lj.lora_init(jax.random.key(0), bigger, lj.LoraConfig(rank=1)))
  with pytest.raises(ValueError, match=r"combine: the halves do not fit together \(are they from the "
                                       r"same lora_init\?\):\n  d0/kernel: a has shape \(4, 1\); w of "
                                       r"shape \(6, 3\)"):
    lj.combine(t, f_big)
  # the round trip, also under jit / grad
  q = jax.jit(lj.combine)(t, f)
  assert jax.tree.structure(q) == jax.tree.structure(_lp())


def test_split_and_optimizer_of_plain_params_or_swapped_arguments():
  msg = (r"the params hold no LoraWeight or Trainable node \(a dict with 3 plain leaves\), so "
         r"nothing would train; pass the params returned by lora_jax.lora_init")
  with pytest.raises(ValueError, match="split: " + msg):
    lj.split(PARAMS)
  with pytest.raises(ValueError, match="optimizer: " + msg):
    lj.optimizer(optax.adam(1e-3), PARAMS)
  with pytest.raises(TypeError, match=r"optimizer: tx must be an optax GradientTransformation such "
                                      r"as optax.adamw\(1e-3\), got a dict \(the call is "
                                      r"lj.optimizer\(tx, params\)\)"):
    lj.optimizer(_lp(), optax.adam(1e-3))


def test_shape_and_rank_of_a_node_without_that_array():
  lp = _lp(rank=2)
  t, f = lj.split(lp)
  assert t["d0"]["kernel"].rank == 2 and f["d0"]["kernel"].shape == (4, 3)
  assert lj.adapter(lp)["d0/kernel"].rank == 2
  with pytest.raises(AttributeError, match=r"LoraWeight.shape is not known: this node's w is None, "
                                           r"not an array \(an adapter alone from lj.adapter\(...\) "
                                           r"has w=None; the halves of lj.split\(...\) have None"):
    t["d0"]["kernel"].shape
  with pytest.raises(AttributeError, match=r"LoraWeight.rank is not known: this node's a is None"):
    f["d0"]["kernel"].rank
  with pytest.raises(AttributeError, match=r"LoraWeight.dtype is not known: this node's w is a str"):
    lj.labels(lp)["d0"]["kernel"].dtype
  assert getattr(t["d0"]["kernel"], "shape", None) is None


def test_one_half_of_split_where_params_are_expected():
  t, f = lj.split(_lp(trainable="d0/bias"))
  half = (r"d0/kernel: the LoraWeight's a is None, not an array \(one half of lj.split\(...\)\? "
          r"join the halves with lj.combine\(trainable, frozen\)\)")
  with pytest.raises(ValueError, match=r"merge: the params hold LoRA nodes that cannot be used:\n"
                                       r"  d0/bias: the Trainable leaf's value is None, not an array.*\n"
                                       rf"  {half}"):
    lj.merge(f)
  with pytest.raises(ValueError, match=r"summary: the params hold LoRA nodes that cannot be counted:"
                                       rf"\n  d0/bias: .*\n  {half}"):
    lj.summary(f)
  with pytest.raises(ValueError, match=r"delta: inconsistent LoraWeight: the LoraWeight's a is None"):
    lj.delta(f["d0"]["kernel"])
  with pytest.raises(ValueError, match=r"(?s)merge: .*\n  d0/kernel: a LoraWeight without its base kernel"):
    lj.merge(t)
