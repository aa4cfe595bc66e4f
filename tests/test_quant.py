"""Quantized formats: bit parity with bitsandbytes, packing, layouts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax._src import quant_formats as fmt

import torch
import bitsandbytes.functional as bnbf


def _kernel(shape, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 0.1, shape[-1])
  return jnp.asarray(w, dtype)


def _bnb(w, block_size, double_quant, dtype=torch.float32):
  """bitsandbytes on W.T (torch's (out, in)): packed codes, float32 absmax, dequantized."""
  t = torch.tensor(np.asarray(jnp.asarray(w, jnp.float32)).T.copy()).to(dtype)
  packed, state = bnbf.quantize_4bit(t, quant_type="nf4", blocksize=block_size,
                                     compress_statistics=double_quant)
  deq = bnbf.dequantize_4bit(packed, state).float().numpy().T
  return packed.numpy().reshape(-1), state, deq


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,block", [((256, 48), 64), ((128, 96), 32), ((1024, 320), 64)])
def test_nf4_bit_identical_to_bitsandbytes(shape, block, double_quant):
  w = _kernel(shape)
  q = lj.quantize({"k": w}, lj.QuantConfig(kind="nf4", block_size=block,
                                           double_quant=double_quant, targets="k"))["k"]
  packed, state, deq = _bnb(w, block, double_quant)
  np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed)
  if double_quant:
    np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
    # the offset is torch's float32 mean, whose summation order is torch's own:
    # ours is the correctly rounded sum / n, at most 1 ulp away
    np.testing.assert_array_max_ulp(np.asarray(q.absmax2), state.state2.absmax.numpy(), 1)
    np.testing.assert_array_max_ulp(np.asarray(q.offset), state.offset.numpy(), 1)
    np.testing.assert_allclose(np.asarray(q.dequantize()), deq, rtol=1e-5, atol=0)
    # XLA:CPU contracts the scale's code*absmax2 + offset into an FMA under jit
    np.testing.assert_allclose(np.asarray(jax.jit(lambda q: q.dequantize())(q)), deq,
                               rtol=1e-5, atol=0)
  else:
    np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(q.dequantize()), deq)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(q)), deq)


def test_nf4_bf16_kernel_matches_bitsandbytes_bf16():
  w = _kernel((256, 64), seed=3, dtype=jnp.bfloat16)
  q = lj.quantize({"k": w}, lj.QuantConfig(targets="k"))["k"]
  q = lj.quantize({"k": w}, lj.QuantConfig(double_quant=False, targets="k"))["k"]
  _, _, deq = _bnb(w, 64, False, dtype=torch.bfloat16)
  assert q.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(q.dequantize().astype(jnp.float32)), deq)


def test_double_quant_nested_codes_match_bitsandbytes_blockwise():
  # absmax count not a multiple of 256: bitsandbytes' partial last nested block
  w = _kernel((64 * 3, 333 * 2), seed=5)
  q = lj.quantize({"k": w}, lj.QuantConfig(block_size=64, targets="k"))["k"]
  _, state, deq = _bnb(w, 64, True)
  assert q.absmax.size % 256 != 0
  np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())
  np.testing.assert_allclose(np.asarray(q.dequantize()), deq, rtol=1e-5, atol=0)


def test_stacked_kernel_is_quantized_per_layer_with_layer_axis_leading():
  w = _kernel((3, 128, 32), seed=1)
  q = lj.quantize({"k": w}, lj.QuantConfig(targets="k", layouts={"k": "sio"}))["k"]
  assert q.shape == (3, 128, 32) and q.roles == "sio"
  for leaf in jax.tree.leaves(q):
    assert leaf.shape[0] == 3
  for layer in range(3):
    packed, _, deq = _bnb(w[layer], 64, True)
    np.testing.assert_array_equal(np.asarray(q.codes[layer]).reshape(-1), packed)
    np.testing.assert_allclose(np.asarray(q.dequantize()[layer]), deq, rtol=1e-5, atol=0)
    one = jax.tree.map(lambda x: x[layer], q)   # what lax.scan hands the body
    assert one.shape == (128, 32)
    np.testing.assert_array_equal(np.asarray(one.dequantize()), np.asarray(q.dequantize()[layer]))


@pytest.mark.parametrize("kind,levels", [("int4", 7), ("int8", 127)])
def test_linear_kinds_are_symmetric_absmax_rounding(kind, levels):
  w = _kernel((128, 16), seed=2)
  q = lj.quantize({"k": w}, lj.QuantConfig(kind=kind, double_quant=False, targets="k"))["k"]
  m = np.asarray(w).T.reshape(16, 2, 64)
  am = np.abs(m).max(-1, keepdims=True)
  want = (np.round(m / am * levels) / levels * am).reshape(16, 128).T
  np.testing.assert_allclose(np.asarray(q.dequantize()), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,double_quant,limit", [
    ("nf4", True, 4.13), ("nf4", False, 4.5), ("int4", True, 4.13), ("int8", False, 8.5)])
def test_bits_per_param_from_array_bytes(kind, double_quant, limit):
  w = jnp.zeros((4096, 1024), jnp.bfloat16)
  q = lj.quantize({"k": w}, lj.QuantConfig(kind=kind, double_quant=double_quant,
                                           targets="k"))["k"]
  bits = 8 * sum(x.nbytes for x in jax.tree.leaves(q)) / w.size
  assert bits <= limit
  assert q.codes.dtype == jnp.uint8 and q.codes.size == w.size * fmt.BITS[kind] // 8


def test_packing_order_first_value_in_high_nibble():
  q = jnp.array([[1, 2, 15, 0]], jnp.uint8)
  assert fmt.pack4(q).tolist() == [[0x12, 0xF0]]
  assert fmt.unpack4(fmt.pack4(q)).tolist() == q.tolist()


def test_multi_axis_layouts_round_trip():
  w = _kernel((64, 4, 8), seed=4)     # DenseGeneral (d, heads, head_dim)
  q = lj.quantize({"k": w}, lj.QuantConfig(kind="int8", targets="k",
                                           layouts={"k": "ioo"}))["k"]
  assert q.shape == (64, 4, 8)
  np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(w), atol=2e-3)


# ------------------------------------------------------------------ bad input

def test_block_size_not_dividing_input_axis_is_refused_with_path():
  with pytest.raises(ValueError, match=r"layer/kernel.*input size 100 is not a multiple "
                                       r"of block_size=64.*e.g. 4"):
    lj.quantize({"layer": {"kernel": jnp.ones((100, 8))}}, lj.QuantConfig())


def test_one_d_leaf_is_refused_with_path():
  with pytest.raises(ValueError, match=r"target layer/bias has shape \(8,\).*2\+ axes"):
    lj.quantize({"layer": {"bias": jnp.ones(8)}}, lj.QuantConfig(targets=".*bias"))


def test_unknown_kind_is_refused():
  with pytest.raises(ValueError, match=r"kind must be one of \('nf4', 'int4', 'int8'\), got 'fp3'"):
    lj.QuantConfig(kind="fp3")


def test_three_axis_kernel_without_layout_is_refused():
  with pytest.raises(ValueError, match=r"cannot tell the layout of k .*trace="):
    lj.quantize({"k": jnp.ones((2, 64, 8))}, lj.QuantConfig(targets="k"))


def test_no_target_lists_paths():
  with pytest.raises(ValueError, match=r"matched no array leaf.*\n  a/kernel"):
    lj.quantize({"a": {"kernel": jnp.ones((64, 8))}}, lj.QuantConfig(targets="nothing"))


def test_quantized_weight_outside_lora_raises():
  q = lj.quantize({"k": jnp.ones((64, 8))}, lj.QuantConfig(targets="k"))
  with pytest.raises(TypeError, match="QuantizedWeight reached a function that was not "
                                      "wrapped with lora_jax.lora"):
    jnp.ones((1, 64)) @ q["k"]


def test_dequantize_tree_and_repr():
  p = {"k": _kernel((64, 8)), "b": jnp.ones(8)}
  q = lj.quantize(p, lj.QuantConfig(targets="k"))
  d = lj.dequantize(q)
  assert d["b"] is p["b"] and d["k"].shape == (64, 8)
  assert "nf4[64, 8]" in repr(q["k"])


def test_quantizing_a_layer_holds_about_one_float32_copy_of_it():
  from lora_jax._src import quant
  layer = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16)
  for kind in ("nf4", "int8"):
    c = quant._quantize_layer.lower(layer, kind, 64, True).compile()
    # no (values x codebook) comparison table is materialized
    assert c.memory_analysis().temp_size_in_bytes <= 2 * 1024 * 512 * 4


def test_int8_rounding_counts_midpoints_like_searchsorted():
  mids = fmt._midpoints(fmt.CODEBOOKS["int8"])
  v = jnp.concatenate([jnp.linspace(-1, 1, 200001, dtype=jnp.float32), mids,
                       jnp.nextafter(mids, 2.0), jnp.nextafter(mids, -2.0)])
  np.testing.assert_array_equal(fmt._nearest(v, "int8"),
                                jnp.searchsorted(mids, v, side="left"))
