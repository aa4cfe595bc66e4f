"""lora_init and LoraConfig: init schemes, selection, and every documented error."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from layer_cases import is_lw

PARAMS = {"params": {
    "dense": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)},
    "head": {"kernel": jnp.ones((32, 10)), "bias": jnp.zeros(10)},
}}


def _lws(params):
  return {p: x for p, x in lj._src.tree.flatten(params, is_leaf=is_lw)[0] if is_lw(x)}


def test_kaiming_init_follows_peft_and_b_is_zero():
  lp = lj.lora_init(jax.random.key(0), {"k": jnp.ones((4096, 64))},
                    lj.LoraConfig(rank=64, targets="k"))
  a, b = lp["k"].a, lp["k"].b
  assert a.shape == (4096, 64) and b.shape == (64, 64)
  assert not np.any(np.asarray(b))
  bound = 1 / math.sqrt(4096)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
  assert np.abs(a).max() <= bound
  np.testing.assert_allclose(np.std(a), bound / math.sqrt(3), rtol=0.02)


def test_gaussian_init_std_one_over_rank():
  lp = lj.lora_init(jax.random.key(0), {"k": jnp.ones((4096, 16))},
                    lj.LoraConfig(rank=8, targets="k", init="gaussian"))
  np.testing.assert_allclose(np.std(lp["k"].a), 1 / 8, rtol=0.02)


def test_scales_alpha_rslora_and_patterns():
  config = lj.LoraConfig(rank=4, alpha=16, rank_pattern={".*/head/kernel": 2},
                         alpha_pattern={".*/head/kernel": 3})
  lws = _lws(lj.lora_init(jax.random.key(0), PARAMS, config))
  assert lws["params/dense/kernel"].scale == 4.0 and lws["params/dense/kernel"].rank == 4
  assert lws["params/head/kernel"].scale == 1.5 and lws["params/head/kernel"].rank == 2
  rs = _lws(lj.lora_init(jax.random.key(0), PARAMS, lj.LoraConfig(rank=4, alpha=8, rslora=True)))
  assert rs["params/dense/kernel"].scale == 4.0  # 8 / sqrt(4)
  assert lj.LoraConfig(rank=8).scale_for("x") == 1.0  # alpha defaults to rank


def test_targets_forms_exclude_and_trainable():
  by_list = _lws(lj.lora_init(jax.random.key(0), PARAMS,
                              lj.LoraConfig(targets=[".*/dense/kernel"], rank=2)))
  by_fn = _lws(lj.lora_init(jax.random.key(0), PARAMS, lj.LoraConfig(
      targets=lambda path, leaf: path.endswith("dense/kernel"), rank=2)))
  assert list(by_list) == list(by_fn) == ["params/dense/kernel"]
  lp = lj.lora_init(jax.random.key(0), PARAMS, lj.LoraConfig(
      rank=2, exclude=".*/head/.*", trainable=".*/head/.*"))
  assert list(_lws(lp)) == ["params/dense/kernel"]
  head = lp["params"]["head"]
  assert isinstance(head["kernel"], lj.Trainable) and isinstance(head["bias"], lj.Trainable)


def test_dtype_of_factors():
  lp = lj.lora_init(jax.random.key(0), {"k": jnp.ones((8, 8), jnp.bfloat16)},
                    lj.LoraConfig(rank=2, targets="k"))
  assert lp["k"].a.dtype == jnp.bfloat16
  lp = lj.lora_init(jax.random.key(0), {"k": jnp.ones((8, 8), jnp.bfloat16)},
                    lj.LoraConfig(rank=2, targets="k", dtype=jnp.float32))
  assert lp["k"].a.dtype == jnp.float32 and lp["k"].w.dtype == jnp.bfloat16
  assert lj.merge(lp)["k"].dtype == jnp.bfloat16


def test_layouts_from_config():
  lp = lj.lora_init(jax.random.key(0), {"k": jnp.ones((3, 8, 4))},
                    lj.LoraConfig(rank=2, targets="k", layouts={"k": "sio"}))
  assert lp["k"].a.shape == (3, 8, 2) and lp["k"].b.shape == (3, 2, 4)


# --------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be a positive int, got 0"),
    (dict(rank=-2), "rank must be a positive int"),
    (dict(rank=2.5), "rank must be int, got float"),
    (dict(rank=True), "rank must be int"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(init="xavier"), "init must be one of"),
    (dict(rank_pattern={"x": 0}), r"rank_pattern\['x'\] must be a positive int, got 0"),
    (dict(targets="(unclosed"), "not a valid regex"),
    (dict(targets=3), "must be a regex string"),
    (dict(layouts={"k": "xy"}), "layouts.*must be a string of 's', 'i', 'o'"),
])
def test_config_errors(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    lj.LoraConfig(**kwargs)


def test_traced_rank_is_an_error():
  @jax.jit
  def f(r):
    return lj.LoraConfig(rank=r)
  with pytest.raises(TypeError, match="rank must be a static Python value, got a traced"):
    f(4)


def test_rank_larger_than_kernel_allows():
  with pytest.raises(ValueError, match=r"rank 16 for k is larger than the kernel allows.*\(8, 4\).*at most 4"):
    lj.lora_init(jax.random.key(0), {"k": jnp.ones((8, 4))}, lj.LoraConfig(rank=16, targets="k"))


def test_rank_too_large_lists_every_kernel_and_names_rank_pattern():
  params = {"small": {"kernel": jnp.ones((8, 4))}, "tiny": {"kernel": jnp.ones((2, 16))},
            "big": {"kernel": jnp.ones((32, 32))}}
  config = lj.LoraConfig(rank=6, targets=".*/kernel")
  with pytest.raises(ValueError) as exc:
    lj.lora_init(jax.random.key(0), params, config)
  msg = str(exc.value)
  assert "too large for 2 kernel(s)" in msg
  assert "rank 6 for small/kernel" in msg and "at most 4" in msg
  assert "rank 6 for tiny/kernel" in msg and "at most 2" in msg
  assert "big/kernel" not in msg
  assert "rank_pattern={'small/kernel': 4, 'tiny/kernel': 2}" in msg
  # the suggested fix works as written
  fixed = lj.LoraConfig(rank=6, targets=".*/kernel",
                        rank_pattern={"small/kernel": 4, "tiny/kernel": 2})
  lp = lj.lora_init(jax.random.key(0), params, fixed)
  assert [lp[k]["kernel"].a.shape[-1] for k in ("small", "tiny", "big")] == [4, 2, 6]


def test_no_target_matched_shows_paths():
  with pytest.raises(ValueError, match=r"(?s)matched no leaf.*params/dense/kernel"):
    lj.lora_init(jax.random.key(0), PARAMS, lj.LoraConfig(targets=".*query.*"))


def test_target_on_1d_leaf():
  with pytest.raises(ValueError, match=r"params/dense/bias has shape \(32,\).*at least 2 axes"):
    lj.lora_init(jax.random.key(0), PARAMS, lj.LoraConfig(targets=".*"))


def test_integer_leaf_is_refused():
  with pytest.raises(ValueError, match=r"k has dtype int32; expected a floating"):
    lj.lora_init(jax.random.key(0), {"k": jnp.ones((4, 4), jnp.int32)},
                 lj.LoraConfig(targets="k", rank=1))


def test_ambiguous_layout_needs_trace_or_layouts():
  with pytest.raises(ValueError, match=r"cannot tell the layout of k with shape \(3, 8, 4\).*trace="):
    lj.lora_init(jax.random.key(0), {"k": jnp.ones((3, 8, 4))}, lj.LoraConfig(targets="k"))


def test_lora_init_twice_and_overlap_errors():
  lp = lj.lora_init(jax.random.key(0), PARAMS, lj.LoraConfig(rank=2))
  with pytest.raises(ValueError, match="already holds a LoraWeight"):
    lj.lora_init(jax.random.key(0), lp, lj.LoraConfig(rank=2))
  with pytest.raises(ValueError, match="both as LoRA targets and as trainable"):
    lj.lora_init(jax.random.key(0), PARAMS, lj.LoraConfig(rank=2, trainable=".*/head/kernel"))
  with pytest.raises(TypeError, match="config must be a LoraConfig"):
    lj.lora_init(jax.random.key(0), PARAMS, {"rank": 2})


def test_trace_reads_torch_style_layouts():
  # a kernel used as x @ W.T (torch's (out, in) layout) gets roles "oi"
  params = {"w": jnp.ones((6, 8))}
  lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=2, targets="w"),
                    trace=lambda p: jnp.ones((2, 8)) @ p["w"].T)
  assert lp["w"].roles == "oi" and lp["w"].a.shape == (8, 2) and lp["w"].b.shape == (2, 6)


def test_traced_scale_in_a_lora_weight_is_an_error():
  lw = lj.lora_init(jax.random.key(0), {"k": jnp.ones((4, 4))},
                    lj.LoraConfig(rank=1, targets="k"))["k"]

  @jax.jit
  def rescale(s):
    return lw.replace(scale=s)
  with pytest.raises(TypeError, match="LoraWeight.scale must be a static Python number"):
    rescale(2.0)
  with pytest.raises(TypeError, match="roles must be a string"):
    lw.replace(roles="xy")
