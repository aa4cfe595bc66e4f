"""QLoRA merge policy, dequantize, adapters on a quantized or plain base."""

import os

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj


def _setup(dtype=jnp.float32):
  params = {"a": {"kernel": (jax.random.normal(jax.random.key(0), (128, 32)) * 0.05).astype(dtype)},
            "b": {"kernel": (jax.random.normal(jax.random.key(1), (64, 16)) * 0.05).astype(dtype),
                  "bias": jnp.ones(16, dtype)}}
  q = lj.quantize(params, lj.QuantConfig(kind="nf4", compute_dtype=jnp.float32))
  lp = lj.lora_init(jax.random.key(2), q, lj.LoraConfig(rank=4, targets="a/kernel"))
  lp["a"]["kernel"] = lp["a"]["kernel"].replace(
      b=jax.random.normal(jax.random.key(3), (4, 32)) * 0.05)
  return params, q, lp


def test_merge_of_quantized_base_is_dequantized_base_plus_delta_in_compute_dtype():
  params, q, lp = _setup(jnp.bfloat16)
  merged = lj.merge(lp)
  assert merged["a"]["kernel"].dtype == jnp.float32          # compute_dtype
  want = q["a"]["kernel"].dequantize() + lj.delta(lp["a"]["kernel"])
  np.testing.assert_allclose(merged["a"]["kernel"], want, rtol=1e-6, atol=1e-7)
  # a kernel without an adapter: plain dequantized array
  np.testing.assert_array_equal(merged["b"]["kernel"], q["b"]["kernel"].dequantize())
  assert merged["b"]["bias"] is params["b"]["bias"]


def test_merge_requantize_returns_quantized_params_and_their_error():
  _, q, lp = _setup()
  served, report = lj.merge(lp, requantize=True)
  new = served["a"]["kernel"]
  assert isinstance(new, lj.QuantizedWeight) and new.kind == "nf4"
  assert new.double_quant and new.block_size == 64
  assert served["b"]["kernel"] is q["b"]["kernel"]            # no adapter: codes kept
  assert set(report) == {"a/kernel"}
  dense = lj.merge(lp)["a"]["kernel"]
  err = jnp.linalg.norm(new.dequantize() - dense) / jnp.linalg.norm(dense)
  assert abs(report["a/kernel"]["rel_frobenius"] - float(err)) < 1e-6
  assert 0 < report["a/kernel"]["rel_frobenius"] < 0.2        # NF4's usual ~0.1


def test_dequantize_gives_plain_params():
  params, q, _ = _setup()
  plain = lj.dequantize(q)
  assert jax.tree.structure(plain) == jax.tree.structure(params)
  err = jnp.abs(plain["a"]["kernel"] - params["a"]["kernel"]).max()
  assert err < 0.05


def test_adapter_holds_only_factors_and_attaches_to_quantized_or_plain_base(tmp_path):
  params, q, lp = _setup()
  ad = lj.adapter(lp)
  assert list(ad) == ["a/kernel"] and ad["a/kernel"].w is None
  assert all(x.dtype != jnp.uint8 for x in jax.tree.leaves(ad))
  x = jax.random.normal(jax.random.key(4), (2, 128))
  f = lambda p, x: x @ p["a"]["kernel"]
  on_q = lj.attach(q, ad)
  assert isinstance(on_q["a"]["kernel"].w, lj.QuantizedWeight)
  np.testing.assert_array_equal(lj.lora(f)(on_q, x), lj.lora(f)(lp, x))
  on_plain = lj.attach(lj.dequantize(q), ad)
  np.testing.assert_allclose(lj.lora(f)(on_plain, x), lj.lora(f)(lp, x), rtol=1e-6, atol=1e-6)
  path = os.path.join(tmp_path, "adapter")
  lj.save_adapter(path, lp)
  loaded = lj.load_adapter(path, q)
  np.testing.assert_array_equal(lj.lora(f)(loaded, x), lj.lora(f)(lp, x))
  saved_bytes = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)
  assert saved_bytes < 4 * 128 * 32     # A/B only (~2.6 KB of floats), no base kernel


def test_summary_counts_a_quantized_kernel_by_its_logical_size():
  _, _, lp = _setup()
  s = lj.summary(lp)
  assert s.trainable == 4 * (128 + 32)
  assert s.total == 128 * 32 + 64 * 16 + 16 + s.trainable
