"""Stack strategies (gather, onehot, segments): exact on every layer kind,
chosen by a cost model, and forced ones that do not fit are clear errors."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import stack_strategies as ss
from test_stack import KINDS, _batch, _three, assert_rows_match_alone

# 12 rows, 3 adapters: segments tiles of 2 rows, groups of 3-4 rows, two -1 rows
IDS = np.array([0, 2, -1, 1, 0, -1, 2, 2, 0, 1, 1, 0], np.int32)


def _case(kind):
  fn, params, args, ads = _three(kind)
  return fn, params, _batch(args, len(IDS)), ads


@pytest.mark.parametrize("strategy", ["gather", "onehot", "segments"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_strategy_rows_equal_each_adapter_alone(kind, strategy):
  fn, params, args, ads = _case(kind)
  stacked = lj.attach(params, lj.stack_adapters(ads))
  run = lj.lora(fn, strict=True, stack_strategy=strategy)
  with ss.recording() as log:
    mixed = jax.jit(run)(stacked, *args, adapter_ids=jnp.asarray(IDS))
  assert log and {c["strategy"] for c in log} == {strategy}, log
  alone = {k: fn(params, *args) if k == -1 else
           lj.lora(fn)(lj.attach(params, ads[k]), *args) for k in set(IDS.tolist())}
  assert_rows_match_alone(mixed, alone, IDS)


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _eqns(sub)


def test_segments_sorts_once_per_call_shared_by_scanned_layers():
  fn, params, args, ads = _case("nn_scan")
  stacked = lj.attach(params, lj.stack_adapters(ads))
  run = lj.lora(fn, stack_strategy="segments")
  jaxpr = jax.make_jaxpr(lambda p, *a: run(p, *a, adapter_ids=jnp.asarray(IDS)))(
      stacked, *args)
  sorts = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "sort"]
  assert len(sorts) == 1, sorts  # one sort, outside the scan body
  assert all(e.primitive.name != "sort" for e in jaxpr.jaxpr.eqns
             if e.primitive.name == "scan" for e in _eqns(e.params["jaxpr"].jaxpr))


def _cost(strategy, n, kind="dense_general"):
  fn, params, args, ads = _case(kind)
  stack = lj.stack_adapters([ads[0]] * n)
  ids = jnp.arange(len(IDS), dtype=jnp.int32) % n
  c = jax.jit(lj.lora(fn, stack_strategy=strategy)).lower(
      lj.attach(params, stack), *args, adapter_ids=ids).compile().cost_analysis()
  return (c[0] if isinstance(c, list) else c)["flops"]


def test_flops_onehot_grow_with_n_gather_and_segments_do_not():
  g1, g64 = _cost("gather", 1), _cost("gather", 64)
  o1, o64 = _cost("onehot", 1), _cost("onehot", 64)
  assert abs(g64 - g1) <= 0.05 * g1, (g1, g64)
  assert o64 > 2 * o1, (o1, o64)


def _shape(rows, tokens, n, d=1024, r=8):
  return ss.Shape(rows=rows, tokens=tokens, n=n, rank=r, d_in=d, d_out=d, itemsize=4)


def test_cost_model_prefers_onehot_for_small_n_and_never_gathers_on_tpu():
  assert ss.choose(_shape(64, 64, 4)) == "onehot"       # decode, few adapters
  for n in (1, 4, 16, 64):
    for rows, tokens in ((64, 64), (64, 64 * 16)):      # decode, prefill
      assert ss.choose(_shape(rows, tokens, n), "tpu") != "gather"
  big = _shape(64, 64 * 512, 4096)                      # onehot over its memory limit
  assert ss.onehot_bytes(big) > ss.ONEHOT_MAX_BYTES and ss.choose(big) != "onehot"


def test_forced_onehot_over_the_memory_limit_names_kernel_and_alternatives(monkeypatch):
  fn, params, args, ads = _case("dense")
  p = lj.attach(params, lj.stack_adapters(ads))
  monkeypatch.setattr(ss, "ONEHOT_MAX_BYTES", 64)
  with pytest.raises(ValueError, match=r"Dense_0/kernel \(dot_general\): stack_strategy="
                     r"'onehot' needs .* Use stack_strategy='segments' or 'gather'"):
    lj.lora(fn, stack_strategy="onehot")(p, *args, adapter_ids=jnp.asarray(IDS))
  # auto steps around it
  with ss.recording() as log:
    lj.lora(fn)(p, *args, adapter_ids=jnp.asarray(IDS))
  assert log and all(c["strategy"] != "onehot" for c in log)


def _conv_batch_second(params, x):
  """A conv whose batch is the input's second axis (layout HNWC)."""
  return jax.lax.conv_general_dilated(
      jnp.moveaxis(x, 0, 1), params["kernel"], (1, 1), "SAME",
      dimension_numbers=("HNWC", "HWIO", "HNWC")).sum(axis=(0, 2))


def test_forced_segments_on_a_conv_without_a_leading_batch():
  params = {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 4, 5))}
  cfg = lj.LoraConfig(rank=2, targets="kernel", layouts={"kernel": "iiio"})
  ads = [lj.adapter(lj.lora_init(jax.random.key(k), params, cfg)) for k in range(3)]
  p = lj.attach(params, lj.stack_adapters(ads))
  x = jax.random.normal(jax.random.key(1), (len(IDS), 6, 6, 4))
  with pytest.raises(ValueError, match=r"kernel \(conv_general_dilated\): stack_strategy="
                     r"'segments' cannot serve .* batch is axis 1 .* Use stack_strategy="
                     r"'onehot' or 'gather'"):
    lj.lora(_conv_batch_second, stack_strategy="segments")(p, x, adapter_ids=IDS)
  want = lj.lora(_conv_batch_second, stack_strategy="gather")(p, x, adapter_ids=IDS)
  got = lj.lora(_conv_batch_second, stack_strategy="onehot")(p, x, adapter_ids=IDS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["gather", "onehot", "segments"])
def test_folded_batch_is_an_error_for_every_strategy(strategy):
  fn, params, args, ads = _case("dense")
  p = lj.attach(params, lj.stack_adapters(ads))
  folded = lambda q, x: fn(q, x.reshape(6, 2, -1).transpose(1, 0, 2).reshape(12, -1)[:6])
  with pytest.raises(ValueError, match=r"Dense_0/kernel.*adapter_ids has 12 entries"):
    lj.lora(folded, stack_strategy=strategy)(p, *args, adapter_ids=jnp.asarray(IDS))


def test_unknown_strategy():
  with pytest.raises(ValueError, match=r"stack_strategy must be one of .*'segments'.*"
                     "got 'sgmv'"):
    lj.lora(lambda p, x: x, stack_strategy="sgmv")


@pytest.mark.parametrize("strategy", ["onehot", "segments"])
def test_out_of_range_ids_under_jit_poison_their_row(strategy):
  fn, params, args, ads = _case("dense")
  p = lj.attach(params, lj.stack_adapters(ads))
  ids = jnp.asarray([0, 7, -1, 1, 0, 0, 2, 2, 1, 0, -1, 1])
  y = np.asarray(jax.jit(lj.lora(fn, stack_strategy=strategy))(p, *args, adapter_ids=ids))
  assert np.isnan(y[1]).all() and np.isfinite(np.delete(y, 1, axis=0)).all()
