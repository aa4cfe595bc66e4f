"""Many adapters on one base: mixed-adapter batches, hot-swap, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import compat
from layer_cases import case, randomize_b

KINDS = ("dense", "dense_general", "einsum", "conv", "embed", "nn_scan",
         "nn_scan_remat", "lax_scan", "nnx", "nnx_scan")
IDS = np.array([0, 2, -1, 1, 0, -1], np.int32)


def _batch(args, rows):
  """Tile the case's inputs along the batch axis (the leading one) to ``rows``."""
  def tile(x):
    reps = -(-rows // x.shape[0])
    return jnp.concatenate([x] * reps)[:rows]
  return jax.tree.map(tile, args)


def _three(kind):
  """The case's model, its base params, and 3 adapters of ranks 1, 2, 3."""
  fn, params, args, config, trace = case(kind)
  ads = []
  for k, rank in enumerate((1, 2, 3)):
    cfg = dataclasses.replace(config, rank=rank, rank_pattern={}, alpha=2.0 + k)
    lp = randomize_b(lj.lora_init(jax.random.key(10 + k), params, cfg, trace=trace),
                     seed=20 + k)
    ads.append(lj.adapter(lp))
  return fn, params, _batch(args, len(IDS)), ads


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_rows_equal_each_adapter_alone(kind, jit):
  fn, params, args, ads = _three(kind)
  stacked = lj.attach(params, lj.stack_adapters(ads))
  run = lj.lora(fn, strict=True)  # strict: W + ΔW is never formed
  mixed = (jax.jit(run) if jit else run)(stacked, *args, adapter_ids=jnp.asarray(IDS))
  # the same batch run with one adapter (or the base) for all rows
  alone = {k: fn(params, *args) if k == -1 else run(lj.attach(params, ads[k]), *args)
           for k in set(IDS.tolist())}
  assert_rows_match_alone(mixed, alone)


def assert_rows_match_alone(mixed, alone, ids=IDS):
  """Row ``i`` of the mixed batch equals row ``i`` of the batch run with
  adapter ``ids[i]`` alone (``alone[k]``); a base row (-1) bit for bit: the
  branch adds exact zeros."""
  for i, k in enumerate(ids):
    for m, a in zip(jax.tree.leaves(mixed), jax.tree.leaves(alone[k])):
      if k == -1:
        np.testing.assert_array_equal(np.asarray(m[i]), np.asarray(a[i]))
      else:
        np.testing.assert_allclose(np.asarray(m[i]), np.asarray(a[i]),
                                   rtol=1e-5, atol=1e-6)


def _flops(n, kind="dense_general"):
  fn, params, args, config, trace = case(kind)
  lp = randomize_b(lj.lora_init(jax.random.key(2), params, config, trace=trace))
  stack = lj.stack_adapters([lj.adapter(lp)] * n)
  p = lj.attach(params, stack)
  args = _batch(args, 8)
  ids = jnp.arange(8, dtype=jnp.int32) % n
  # gather's FLOPs do not depend on N (onehot's grow with N: test_stack_strategies)
  compiled = jax.jit(lj.lora(fn, stack_strategy="gather")).lower(
      p, *args, adapter_ids=ids).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"]


@pytest.mark.parametrize("kind", ["dense_general", "conv", "embed", "nn_scan"])
def test_flops_do_not_grow_with_the_number_of_adapters(kind):
  f1, f8, f64 = (_flops(n, kind) for n in (1, 8, 64))
  assert f1 > 0
  assert abs(f8 - f1) <= 0.05 * f1 and abs(f64 - f1) <= 0.05 * f1, (f1, f8, f64)


def test_ten_swaps_compile_once():
  fn, params, args, ads = _three("dense")
  stack = lj.stack_adapters(ads)
  traces = []

  def counted(p, x, ids):
    traces.append(1)
    return lj.lora(fn)(p, x, adapter_ids=ids)
  run = jax.jit(counted)
  for s in range(10):
    new = jax.tree.map(lambda lw: lw.replace(b=lw.b + s), ads[s % 3],
                       is_leaf=lambda x: isinstance(x, lj.LoraWeight))
    stack = lj.set_adapter(stack, s % 3, new)
    ids = jnp.asarray(np.roll(IDS, s))
    run(lj.attach(params, stack), *args, ids).block_until_ready()
  assert len(traces) == 1


def test_set_adapter_is_pure_and_matches_a_fresh_stack():
  _, _, _, ads = _three("dense")
  old = lj.stack_adapters(ads)
  before = jax.tree.map(np.asarray, old)
  new = lj.set_adapter(old, "adapter_1", ads[0])
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)  # the input is untouched
  fresh = lj.stack_adapters([ads[0], ads[0], ads[2]])
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unstack_returns_each_member_exactly():
  _, _, _, ads = _three("nn_scan")
  out = lj.unstack_adapters(lj.stack_adapters(ads, names=["a", "b", "c"]))
  assert list(out) == ["a", "b", "c"]
  for ad, back in zip(ads, out.values()):
    assert set(ad) == set(back)
    for p in ad:
      # scales are a float32 array in the stack (swapping never recompiles)
      assert (back[p].scale, back[p].roles, back[p].rank) == (
          float(np.float32(ad[p].scale)), ad[p].roles, ad[p].rank)
      np.testing.assert_array_equal(np.asarray(back[p].a), np.asarray(ad[p].a))
      np.testing.assert_array_equal(np.asarray(back[p].b), np.asarray(ad[p].b))


# ----------------------------------------------------------------- bad input

def test_stack_without_ids_names_the_fix():
  fn, params, args, ads = _three("dense")
  p = lj.attach(params, lj.stack_adapters(ads))
  with pytest.raises(ValueError, match=r"needs adapter_ids: lj.lora\(fn\)"):
    lj.lora(fn)(p, *args)


def test_ids_without_a_stack():
  fn, params, args, ads = _three("dense")
  with pytest.raises(ValueError, match="no stack of adapters"):
    lj.lora(fn)(lj.attach(params, ads[0]), *args, adapter_ids=jnp.asarray(IDS))


@pytest.mark.parametrize("ids, err, match", [
    (np.array([0, 3, -1, 1, 0, 0], np.int32), ValueError, r"\[3\] are out of range"),
    (np.array([0, -2, 0, 0, 0, 0], np.int32), ValueError, r"\[-2\] are out of range"),
    (np.array([0, 1, 0], np.int32), ValueError, "adapter_ids has 3 entries"),
    (np.array([0.0] * 6, np.float32), TypeError, "must be an integer array"),
    (np.zeros((6, 1), np.int32), ValueError, "must be 1-D"),
    ([0, 1, 2, 0, 1, 2], TypeError, "must be an integer array"),
])
def test_bad_ids(ids, err, match):
  fn, params, args, ads = _three("dense")
  p = lj.attach(params, lj.stack_adapters(ads))
  with pytest.raises(err, match=match):
    lj.lora(fn)(p, *args, adapter_ids=ids)


def test_out_of_range_ids_under_jit_poison_their_row():
  fn, params, args, ads = _three("dense")
  p = lj.attach(params, lj.stack_adapters(ads))
  y = jax.jit(lj.lora(fn))(p, *args, adapter_ids=jnp.asarray([0, 7, -1, 1, 0, 0]))
  y = np.asarray(y)
  assert np.isnan(y[1]).all() and np.isfinite(np.delete(y, 1, axis=0)).all()


def test_batch_not_leading_is_an_error_naming_the_path():
  fn, params, args, ads = _three("dense")
  p = lj.attach(params, lj.stack_adapters(ads))
  folded = lambda q, x: fn(q, x.reshape(3, 2, -1).transpose(1, 0, 2).reshape(6, -1)[:3])
  with pytest.raises(ValueError, match=r"Dense_0/kernel.*adapter_ids has 6 entries"):
    lj.lora(folded)(p, *args, adapter_ids=jnp.asarray(IDS))


def test_stack_alone_must_be_attached():
  fn, params, args, ads = _three("dense")
  stack = lj.stack_adapters(ads)
  p = dict(params)
  p["params"] = dict(p["params"], Dense_0={"kernel": stack["params/Dense_0/kernel"],
                                           "bias": params["params"]["Dense_0"]["bias"]})
  with pytest.raises(ValueError, match=r"lj.attach\(base_params, stack\)"):
    lj.lora(fn)(p, *args, adapter_ids=jnp.asarray(IDS))


def test_different_targets_are_refused_naming_the_adapter():
  _, _, _, ads = _three("dense")
  fewer = {k: v for k, v in ads[1].items() if "Dense_1" not in k}
  with pytest.raises(ValueError, match=r"adapter 'b' targets other kernels than 'a': "
                     r"missing \['params/Dense_1/kernel'\]"):
    lj.stack_adapters([ads[0], fewer], names=["a", "b"])


def test_different_bases_are_refused_naming_adapter_and_path():
  _, _, _, ads = _three("dense")
  fn, params, args, config, trace = case("dense")
  wide = jax.tree.map(lambda x: jnp.concatenate([x, x]) if x.ndim == 2 and x.shape[0] == 8
                      else x, params)
  other = lj.adapter(lj.lora_init(jax.random.key(0), wide, config))
  with pytest.raises(ValueError, match=r"params/Dense_0/kernel: adapter 'other' is for a "
                     r"kernel with in-axes \(16,\).*different base models"):
    lj.stack_adapters([ads[0], other], names=["a", "other"])


def test_bad_names_and_slots():
  _, _, _, ads = _three("dense")
  with pytest.raises(ValueError, match="names must be 2 unique strings"):
    lj.stack_adapters(ads[:2], names=["x", "x"])
  with pytest.raises(TypeError, match="non-empty list of adapters"):
    lj.stack_adapters(ads[0])
  stack = lj.stack_adapters(ads[:2])
  with pytest.raises(IndexError, match=r"slot 5 is not an adapter"):
    lj.set_adapter(stack, 5, ads[0])
  with pytest.raises(KeyError, match="no adapter named 'zzz'"):
    lj.set_adapter(stack, "zzz", ads[0])
  with pytest.raises(ValueError, match="has rank 3, the stack's padded rank is 2"):
    lj.set_adapter(stack, 0, ads[2])


def test_indexed_layers_keep_the_adapter_axis():
  """``w[i]`` on a layer-stacked kernel (a Python loop over layers) stays factored."""
  def fn(p, x):
    for i in range(p["w"].shape[0]):
      x = jnp.tanh(x @ p["w"][i])
    return x
  params = {"w": 0.3 * jax.random.normal(jax.random.key(0), (3, 8, 8))}
  x = jax.random.normal(jax.random.key(1), (len(IDS), 8))
  ads = [lj.adapter(randomize_b(lj.lora_init(jax.random.key(k), params,
                                             lj.LoraConfig(rank=k + 1, targets="w",
                                                           layouts={"w": "sio"})),
                                seed=k)) for k in range(3)]
  run = lj.lora(fn, strict=True)
  mixed = jax.jit(run)(lj.attach(params, lj.stack_adapters(ads)), x,
                       adapter_ids=jnp.asarray(IDS))
  for i, k in enumerate(IDS):
    alone = fn(params, x) if k == -1 else run(lj.attach(params, ads[k]), x)
    np.testing.assert_allclose(mixed[i], alone[i], rtol=1e-5, atol=1e-6)


def test_kv_cached_generate_serves_a_mixed_batch():
  """Each row's tokens equal that adapter's (or the base's) tokens alone."""
  import functools
  from lora_jax.models import Llama, LlamaConfig, generate_cached, init_cache, init_params
  cfg = LlamaConfig.tiny(scan_layers=True)
  model, params = Llama(cfg), init_params(cfg)
  trace = lambda p: model.apply({"params": p}, jnp.ones((1, 3), jnp.int32))
  ads = [lj.adapter(randomize_b(lj.lora_init(jax.random.key(k), params,
                                             lj.LoraConfig(rank=2 + k, alpha=8.0),
                                             trace=trace), seed=k)) for k in range(2)]
  run = lj.lora(model.apply)
  apply = lambda p, ids, **kw: run({"params": p}, ids, **kw)
  make_cache = functools.partial(init_cache, cfg)
  ids = jnp.asarray([1, -1, 0], jnp.int32)
  prompt = jnp.tile(jnp.arange(1, 6)[None], (3, 1))
  mixed = generate_cached(apply, lj.attach(params, lj.stack_adapters(ads)), prompt, 4,
                          make_cache=make_cache, adapter_ids=ids)
  outs = set()
  for i, k in enumerate(ids.tolist()):
    p = params if k == -1 else lj.attach(params, ads[k])
    alone = generate_cached(apply, p, prompt[i:i + 1], 4, make_cache=make_cache)
    np.testing.assert_array_equal(mixed[i], alone[0])
    outs.add(tuple(alone[0].tolist()))
  assert len(outs) > 1  # the adapters change the tokens


def test_merge_refuses_a_stack_and_one_member_merges():
  fn, params, args, ads = _three("dense")
  p = lj.attach(params, lj.stack_adapters(ads, names=["x", "y", "z"]))
  with pytest.raises(ValueError, match=r"merge: the params hold a stack of adapters "
                     r"\('x', 'y', 'z'\).*merge one member"):
    lj.merge(p)
  one = lj.merge(lj.attach(lj.base(p), lj.unstack_adapters(p)["y"]))
  np.testing.assert_allclose(fn(one, *args), lj.lora(fn)(lj.attach(params, ads[1]), *args),
                             rtol=1e-5, atol=1e-5)


def test_scanned_stack_is_indexed_per_layer_not_transposed():
  """A stack's factors are (N, layers, ...): each scan step indexes its layer
  in place. Moving the layer axis to the front instead would copy the whole
  stack at every call (a decode step's cost growing with N)."""
  fn, params, args, ads = _three("nn_scan")
  stacked = lj.attach(params, lj.stack_adapters(ads))
  shapes = {x.shape for x in jax.tree.leaves(lj.stack_adapters(ads)) if x.ndim >= 3}
  jaxpr = jax.make_jaxpr(lambda p, *a: lj.lora(fn)(p, *a, adapter_ids=jnp.asarray(IDS)))(
      stacked, *args)

  def eqns(jx):
    for e in jx.eqns:
      yield e
      for sub in compat.jaxprs_in_params(e.params):
        yield from eqns(sub)
  moved = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "transpose"
           and e.invars[0].aval.shape in shapes]
  assert shapes and not moved, moved


class _FlatTokens:
  """``(B, T, d)`` tokens folded to ``(B·T, d)`` (or time-major ``(T·B, d)``)
  before two matmuls, as many models do, then unfolded."""

  def __init__(self, time_major: bool = False):
    self.time_major = time_major

  def __call__(self, params, x):
    b, t, d = x.shape
    h = jnp.swapaxes(x, 0, 1) if self.time_major else x
    h = h.reshape(-1, d).astype(jnp.float32)  # a fold, then an op that keeps rows
    h = jnp.tanh(h @ params["w1"]["kernel"])
    h = h.reshape(h.shape[0], 2, -1).reshape(h.shape[0], -1)  # rows kept
    h = h @ params["w2"]["kernel"]
    h = h.reshape(t, b, -1) if self.time_major else h.reshape(b, t, -1)
    return jnp.swapaxes(h, 0, 1) if self.time_major else h


@pytest.mark.parametrize("strategy", ["gather", "onehot", "segments"])
def test_stack_serves_a_model_that_folds_tokens_into_rows(strategy):
  """Each example's ``T`` folded rows meet that example's adapter."""
  k = jax.random.split(jax.random.key(0), 3)
  params = {"w1": {"kernel": jax.random.normal(k[0], (6, 8))},
            "w2": {"kernel": jax.random.normal(k[1], (8, 5))}}
  x = jax.random.normal(k[2], (len(IDS), 3, 6))
  ads = [lj.adapter(randomize_b(lj.lora_init(jax.random.key(10 + i), params,
                                             lj.LoraConfig(rank=2, alpha=3.0 + i)),
                                seed=20 + i)) for i in range(3)]
  fn = _FlatTokens()
  run = lj.lora(fn, strict=True, stack_strategy=strategy)
  mixed = jax.jit(run)(lj.attach(params, lj.stack_adapters(ads)), x,
                       adapter_ids=jnp.asarray(IDS))
  for i, a in enumerate(IDS):
    alone = fn(params, x) if a == -1 else lj.lora(fn)(lj.attach(params, ads[a]), x)
    np.testing.assert_allclose(np.asarray(mixed[i]), np.asarray(alone[i]),
                               rtol=1e-5, atol=1e-5)
  # time-major: axis 0 of the folded rows is time, not the batch: refused
  with pytest.raises(ValueError, match="adapter_ids has 6 entries and the input's "
                                       "leading axis has 18"):
    lj.lora(_FlatTokens(time_major=True))(lj.attach(params, lj.stack_adapters(ads)),
                                          x, adapter_ids=jnp.asarray(IDS))
