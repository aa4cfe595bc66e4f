"""PiSSA / OLoRA inits, to_lora, layers_to_transform and LoRA+ on their own
(the comparisons with PEFT are in test_variants_peft.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj

INITS = ["pissa", "olora", "pissa_niter_6"]


def _w(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.mark.parametrize("init", INITS)
def test_base_becomes_residual_and_output_is_unchanged(init):
  w = _w((12, 10))
  p = lj.lora_init(jax.random.key(0), {"k": w}, lj.LoraConfig(rank=3, alpha=6, targets="k",
                                                               init=init))
  lw = p["k"]
  assert np.abs(np.asarray(lw.a)).max() > 0.1 and np.abs(np.asarray(lw.b)).max() > 0.1
  np.testing.assert_allclose(np.asarray(lw.w + lj.delta(lw)), w, atol=2e-6)
  x = _w((4, 12), 1)
  np.testing.assert_allclose(lj.lora(lambda q, x: x @ q["k"])(p, x), x @ w, atol=2e-5)


def test_pissa_takes_the_top_singular_directions():
  w = _w((16, 8))
  p = lj.lora_init(jax.random.key(0), {"k": w}, lj.LoraConfig(rank=2, alpha=4, targets="k",
                                                               init="pissa"))
  u, s, vh = np.linalg.svd(np.asarray(w))
  np.testing.assert_allclose(lj.delta(p["k"]), (u[:, :2] * s[:2]) @ vh[:2], atol=2e-5)
  np.testing.assert_allclose(np.linalg.svd(np.asarray(p["k"].w), compute_uv=False)[:6],
                             s[2:], atol=2e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])  # deterministic ones
def test_stacked_and_multi_axis_kernels_factor_per_layer_on_the_flat_matrix(init):
  w = _w((3, 4, 2, 6))  # (layers, in, heads, head_dim): roles "sioo"
  cfg = dict(rank=2, targets="k", init=init)
  p = lj.lora_init(jax.random.key(0), {"k": w}, lj.LoraConfig(**cfg, layouts={"k": "sioo"}))
  assert p["k"].a.shape == (3, 4, 2) and p["k"].b.shape == (3, 2, 2, 6)
  for layer in range(3):
    flat = lj.lora_init(jax.random.key(0), {"k": w[layer].reshape(4, 12)}, lj.LoraConfig(**cfg))
    np.testing.assert_allclose(np.asarray(lj.delta(p["k"]))[layer].reshape(4, 12),
                               lj.delta(flat["k"]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(p["k"].w[layer]).reshape(4, 12), flat["k"].w,
                               atol=2e-5)


def test_bf16_kernel_keeps_its_dtype():
  w = _w((16, 8), dtype=jnp.bfloat16)
  p = lj.lora_init(jax.random.key(0), {"k": w}, lj.LoraConfig(rank=2, targets="k",
                                                               init="pissa"))
  assert p["k"].w.dtype == p["k"].a.dtype == p["k"].b.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(lj.merge(p)["k"], np.float32),
                             np.asarray(w, np.float32), atol=0.05)


def test_to_lora_is_plain_rank_2r_on_the_original_base():
  w = {"k": _w((3, 10, 6)), "d": _w((10, 6), 2)}
  cfg = lj.LoraConfig(rank=2, alpha=3, targets="k|d", init="olora", layouts={"k": "sio"})
  p = lj.lora_init(jax.random.key(0), w, cfg)
  initial = lj.adapter(p)
  trained = {k: v.replace(a=v.a + 0.1, b=v.b - 0.2) for k, v in p.items()}
  plain = lj.to_lora(trained, initial)
  for k in w:
    assert plain[k].rank == 4 and plain[k].scale == trained[k].scale
    np.testing.assert_allclose(plain[k].w, w[k], atol=2e-5)  # the original kernel
    np.testing.assert_allclose(lj.merge(plain)[k], lj.merge(trained)[k], atol=2e-5)
  assert plain["k"].a.shape == (3, 10, 4) and plain["k"].b.shape == (3, 4, 6)


def test_to_lora_errors():
  w = {"k": _w((10, 6))}
  p = lj.lora_init(jax.random.key(0), w, lj.LoraConfig(rank=2, targets="k", init="pissa"))
  other = lj.adapter(lj.lora_init(jax.random.key(0), w, lj.LoraConfig(rank=3, targets="k")))
  with pytest.raises(ValueError, match=r"to_lora: k: the initial adapter has roles 'io', "
                                       r"scale 1.0, a \(10, 3\)"):
    lj.to_lora(p, other)
  with pytest.raises(ValueError, match=r"to_lora: paths of the initial adapter not in "
                                       r"params: \['q'\]"):
    lj.to_lora(p, {"q": lj.adapter(p)["k"]})
  with pytest.raises(TypeError, match="to_lora: initial must be lj.adapter"):
    lj.to_lora(p, None)


def test_quantized_kernel_is_refused_for_pissa():
  q = lj.quantize({"k": _w((64, 32))}, lj.QuantConfig(targets="k"))
  with pytest.raises(ValueError, match="lora_init: init='pissa' rewrites k as W - s·A@B, "
                                       "but it is quantized"):
    lj.lora_init(jax.random.key(0), q, lj.LoraConfig(rank=2, targets="k", init="pissa"))


@pytest.mark.parametrize("value,kind,message", [
    ("svd", ValueError, r"LoraConfig.init must be one of \('kaiming', 'gaussian', 'pissa', "
                        r"'pissa_niter_K', 'olora'\) \(K a positive int, e.g. "
                        r"'pissa_niter_4'\), got 'svd'"),
    ("pissa_niter_0", ValueError, "got 'pissa_niter_0'"),
    ("pissa_niter_K", ValueError, "got 'pissa_niter_K'"),
])
def test_bad_init(value, kind, message):
  with pytest.raises(kind, match=message):
    lj.LoraConfig(init=value)


@pytest.mark.parametrize("value,kind,message", [
    ("1", TypeError, "LoraConfig.layers_to_transform must be an int or a list of ints"),
    ([1, -1], ValueError, "layer indexes are >= 0, got -1"),
    ([], ValueError, "layers_to_transform is empty"),
    ([1.5], TypeError, "LoraConfig.layers_to_transform must be int, got float 1.5"),
])
def test_bad_layers_to_transform(value, kind, message):
  with pytest.raises(kind, match=message):
    lj.LoraConfig(layers_to_transform=value)


def test_layers_to_transform_normalised_and_recorded():
  cfg = lj.LoraConfig(layers_to_transform=[3, 1, 3])
  assert cfg.layers_to_transform == (1, 3)
  assert lj.LoraConfig(layers_to_transform=2).layers_to_transform == (2,)
  assert cfg.to_dict()["layers_to_transform"] == [1, 3]


def test_layers_by_path_index():
  params = {"layers_0": {"k": _w((4, 4))}, "layers_1": {"k": _w((4, 4))},
            "blocks": {"2": {"k": _w((4, 4))}}, "head": {"k": _w((4, 4))}}
  p = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=1, targets=".*k",
                                                            layers_to_transform=[1, 2]))
  assert sorted(lj.adapter(p)) == ["blocks/2/k", "layers_1/k"]
  with pytest.raises(ValueError, match=r"lora_init: layers_to_transform=\[7\] left no "
                                       r"target: none of the 4 selected kernels"):
    lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=1, targets=".*k",
                                                          layers_to_transform=[7]))


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_stacked_layers_outside_the_list_are_exact_no_ops_through_training(init):
  w = _w((4, 8, 6))
  cfg = lj.LoraConfig(rank=2, targets="k", layouts={"k": "sio"}, init=init, dropout=0.1,
                      layers_to_transform=[1, 2])
  p = lj.lora_init(jax.random.key(0), {"k": w}, cfg)
  np.testing.assert_array_equal(p["k"].w[np.array([0, 3])], w[np.array([0, 3])])
  x = _w((5, 8), 1)
  fwd = lj.lora(lambda q, x: jnp.einsum("i,lio->lo", x[0], q["k"]))
  f = lambda q, key: jnp.sum(jnp.tanh(fwd(q, x, lora_rng=key)) ** 2)
  tx = lj.optimizer(optax.adamw(1e-1, weight_decay=0.5), p, b_lr_ratio=8)
  state = tx.init(p)
  for i in range(3):
    updates, state = tx.update(jax.grad(f)(p, jax.random.key(i)), state, p)
    p = optax.apply_updates(p, updates)
  for layer in (0, 3):
    assert not np.any(np.asarray(p["k"].a[layer])) and not np.any(np.asarray(p["k"].b[layer]))
    np.testing.assert_array_equal(lj.merge(p)["k"][layer], w[layer])
  assert np.any(np.asarray(p["k"].b[1]))
  with pytest.raises(ValueError, match=r"layers_to_transform=\[1, 4\] but k stacks 4 "
                                       r"layers \(shape \(4, 8, 6\), roles 'sio'\)"):
    lj.lora_init(jax.random.key(0), {"k": w}, lj.LoraConfig(
        rank=2, targets="k", layouts={"k": "sio"}, layers_to_transform=[1, 4]))


def test_loraplus_scales_b_final_update_only():
  p = lj.lora_init(jax.random.key(0), {"k": _w((6, 4)), "bias": jnp.zeros(4)},
                   lj.LoraConfig(rank=2, targets="k", trainable="bias"))
  p = {"k": p["k"].replace(b=_w((2, 4), 3)), "bias": p["bias"]}
  g = jax.tree.map(lambda x: _w(x.shape, 7), p)
  plain, plus = lj.optimizer(optax.adam(1e-2), p), lj.optimizer(optax.adam(1e-2), p,
                                                                 b_lr_ratio=16)
  u0, _ = plain.update(g, plain.init(p), p)
  u1, _ = plus.update(g, plus.init(p), p)
  np.testing.assert_allclose(u1["k"].b, 16 * u0["k"].b, rtol=1e-6)  # lr, not the gradient
  np.testing.assert_array_equal(u1["k"].a, u0["k"].a)
  np.testing.assert_array_equal(u1["bias"].value, u0["bias"].value)
  assert not np.any(np.asarray(u1["k"].w))


@pytest.mark.parametrize("value", [0, -2.0, float("inf"), "16", True])
def test_bad_b_lr_ratio(value):
  p = lj.lora_init(jax.random.key(0), {"k": _w((6, 4))}, lj.LoraConfig(rank=2, targets="k"))
  with pytest.raises(ValueError, match="optimizer: b_lr_ratio must be a static finite "
                                       r"number > 0 \(LoRA\+"):
    lj.optimizer(optax.adam(1e-2), p, b_lr_ratio=value)


def test_checkpoint_records_init_and_layers_and_the_plain_adapter_loads_on_the_original(tmp_path):
  w = {"layers": {"k": _w((3, 8, 6))}}
  cfg = lj.LoraConfig(rank=2, targets=".*k", layouts={".*k": "sio"}, init="pissa",
                      layers_to_transform=[0, 2])
  p = lj.lora_init(jax.random.key(0), w, cfg)
  initial = lj.adapter(p)
  trained = {"layers": {"k": p["layers"]["k"].replace(b=p["layers"]["k"].b * 1.5)}}
  lj.save_adapter(tmp_path / "pissa", trained, config=cfg)
  lj.save_adapter(tmp_path / "initial", p, config=cfg)
  described = lj.read_description(tmp_path / "pissa")["config"]
  assert (described["init"], described["layers_to_transform"]) == ("pissa", [0, 2])
  # the residual base is rebuilt from the original one and the initial adapter
  init_back = lj.load_adapter(tmp_path / "initial", w)
  residual = {"layers": {"k": w["layers"]["k"] - lj.delta(init_back["layers"]["k"])}}
  np.testing.assert_allclose(residual["layers"]["k"], p["layers"]["k"].w, atol=1e-6)
  back = lj.load_adapter(tmp_path / "pissa", residual)
  np.testing.assert_allclose(lj.merge(back)["layers"]["k"], lj.merge(trained)["layers"]["k"],
                             atol=1e-5)
  # or by redoing the (deterministic) init from the recorded config
  redone = lj.base(lj.lora_init(jax.random.key(0), w, lj.LoraConfig(**described)))
  back = lj.load_adapter(tmp_path / "pissa", redone)
  np.testing.assert_allclose(lj.merge(back)["layers"]["k"], lj.merge(trained)["layers"]["k"],
                             atol=1e-5)
  # or save the plain rank-2r form, which loads straight onto the original base
  lj.save_adapter(tmp_path / "plain", lj.to_lora(trained, initial))
  plain = lj.load_adapter(tmp_path / "plain", w)
  np.testing.assert_allclose(lj.merge(plain)["layers"]["k"], lj.merge(trained)["layers"]["k"],
                             atol=1e-5)
