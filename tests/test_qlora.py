"""QLoRA through lora(): dequantize-in-consumer, frozen codes, memory, errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax.models import Llama, LlamaConfig, init_params


def _w(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * 0.05


def _nonzero_b(lp, seed=7):
  """Adapters with B != 0, so the LoRA branch contributes."""
  def f(x):
    if isinstance(x, lj.LoraWeight):
      return x.replace(b=_w(x.b.shape, seed))
    return x
  return jax.tree.map(f, lp, is_leaf=lambda x: isinstance(x, lj.LoraWeight))


def _dense(lp):
  """The dense equivalent: dequantized base + ΔW."""
  return lj.merge(lp)


CASES = {
    "dot": (lambda p, x: x @ p["k"], (64, 16), (3, 64), "io"),
    "einsum": (lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["k"]), (64, 4, 8), (3, 64), "ioo"),
    "conv": (lambda p, x: jax.lax.conv_general_dilated(
        x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
        (3, 3, 64, 8), (2, 5, 5, 64), "iiio"),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_kernel_with_and_without_adapter_matches_dense(case, jit):
  fn, wshape, xshape, roles = CASES[case]
  q = lj.quantize({"k": _w(wshape)}, lj.QuantConfig(targets="k", layouts={"k": roles}))
  x = _w(xshape, 1)
  run = jax.jit(lj.lora(fn)) if jit else lj.lora(fn)
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # no fallback: dequantized in the consumer
    np.testing.assert_allclose(run(q, x), fn(lj.dequantize(q), x), rtol=1e-5, atol=1e-6)
    lp = _nonzero_b(lj.lora_init(jax.random.key(0), q, lj.LoraConfig(rank=2, targets="k")))
    assert isinstance(lp["k"].w, lj.QuantizedWeight)
    np.testing.assert_allclose(run(lp, x), fn(_dense(lp), x), rtol=1e-5, atol=1e-6)


def test_cast_keeps_the_kernel_quantized_until_the_matmul():
  fn = lambda p, x: x.astype(jnp.bfloat16) @ p["k"].astype(jnp.bfloat16)
  q = lj.quantize({"k": _w((64, 16))}, lj.QuantConfig(targets="k"))
  x = _w((2, 64), 1)
  want = fn({"k": q["k"].dequantize(jnp.bfloat16)}, x)
  np.testing.assert_array_equal(jax.jit(lj.lora(fn))(q, x), want)


def _tiny_llama():
  cfg = LlamaConfig.tiny(scan_layers=True, hidden_size=64, intermediate_size=128)
  model = Llama(cfg)
  ids = jnp.arange(8, dtype=jnp.int32)[None] % cfg.vocab_size
  trace = lambda p: model.apply({"params": p}, ids)
  return cfg, model, ids, trace


def test_scanned_llama_qlora_matches_dense_without_fallback():
  cfg, model, ids, trace = _tiny_llama()
  params = init_params(cfg, jax.random.key(0))
  targets = r".*(q|k|v|o|gate|up|down)_proj/kernel"
  q = lj.quantize(params, lj.QuantConfig(targets=targets), trace=trace)
  assert q["layers"]["mlp"]["up_proj"]["kernel"].roles == "sio"
  lp = _nonzero_b(lj.lora_init(jax.random.key(1), q, lj.LoraConfig(rank=4, targets=targets),
                               trace=trace))
  apply = lambda p, ids: model.apply({"params": p}, ids)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = jax.jit(lj.lora(apply))(lp, ids)
  np.testing.assert_allclose(got, apply(_dense(lp), ids), rtol=1e-4, atol=1e-4)


def _scan_model(p, x):
  def body(h, w):
    return jnp.tanh(h @ w["kernel"]), None
  h, _ = jax.lax.scan(body, x, p["layers"])
  return jnp.sum(h ** 2)


def _grad_temp_bytes(layers: int, d: int) -> int:
  w = _w((layers, d, d))
  q = lj.quantize({"layers": {"kernel": w}}, lj.QuantConfig(layouts={".*": "sio"}))
  lp = lj.lora_init(jax.random.key(1), q, lj.LoraConfig(rank=4, targets=".*kernel"))
  grad = jax.jit(jax.grad(lj.lora(_scan_model), allow_int=True))
  compiled = grad.lower(lp, jnp.ones((8, d))).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_scanned_train_step_holds_one_dense_layer_not_a_dequantized_copy():
  d = 256
  layer = d * d * 4                      # one dequantized float32 kernel
  grow = _grad_temp_bytes(8, d) - _grad_temp_bytes(2, d)
  # six more layers; a dequantized copy (or dense residuals) would add 6 * layer
  assert grow < layer, (grow, layer)


def test_adam_state_is_twice_the_adapter_and_codes_stay_frozen():
  q = lj.quantize({"k": _w((64, 16)), "bias": jnp.zeros(16)}, lj.QuantConfig(targets="k"))
  lp = lj.lora_init(jax.random.key(0), q, lj.LoraConfig(rank=2, targets="k"))
  tx = lj.optimizer(optax.adam(1e-2), lp)
  state = tx.init(lp)
  ab = lp["k"].a.size + lp["k"].b.size
  sizes = [x.size for x in jax.tree.leaves(state) if x.ndim > 0]
  assert sum(sizes) == 2 * ab
  loss = lambda p, x: jnp.sum((lj.lora(lambda p, x: x @ p["k"] + p["bias"][None])(p, x) - 1) ** 2)

  @jax.jit
  def step(p, s, x):
    g = jax.grad(loss, allow_int=True)(p, x)    # integer codes get float0
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  new, _ = step(lp, state, _w((4, 64), 2))
  for old_leaf, new_leaf in zip(jax.tree.leaves(lp["k"].w), jax.tree.leaves(new["k"].w)):
    assert old_leaf.dtype == new_leaf.dtype
    np.testing.assert_array_equal(old_leaf, new_leaf)
  assert not np.array_equal(new["k"].b, lp["k"].b)
  t, f = lj.split(lp)
  assert t["k"].w is None and isinstance(f["k"].w, lj.QuantizedWeight)
  with pytest.raises(TypeError, match="allow_int"):   # JAX's own message
    jax.grad(loss)(lp, _w((4, 64), 2))


def test_training_a_quantized_weight_in_full_is_refused():
  q = lj.quantize({"k": _w((64, 16)), "h": _w((64, 16))}, lj.QuantConfig(targets="k|h"))
  with pytest.raises(ValueError, match=r"lora_init: h is a QuantizedWeight and cannot be "
                                       r"trained in full"):
    lj.lora_init(jax.random.key(0), q, lj.LoraConfig(rank=2, targets="k", trainable="h"))
  with pytest.raises(TypeError, match=r"lora: k is a Trainable QuantizedWeight"):
    lj.lora(lambda p, x: x @ p["k"])({"k": lj.Trainable(q["k"], q["k"])}, jnp.ones((1, 64)))
