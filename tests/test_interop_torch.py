"""lora_jax.interop: torch / safetensors state dicts <-> Flax params."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import lora_jax as lj
from lora_jax import interop
from lora_jax.interop import ConversionError


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_import_does_not_import_torch():
  code = ("import lora_jax, lora_jax.interop, lora_jax.models, sys; "
          "assert 'torch' not in sys.modules, 'torch imported'; "
          "assert 'transformers' not in sys.modules, 'transformers imported'")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr


def test_conv2d_matches_torch():
  torch.manual_seed(0)
  conv = torch.nn.Conv2d(3, 5, kernel_size=(3, 2), stride=1, padding=0)
  x = np.random.default_rng(0).standard_normal((2, 3, 7, 6)).astype(np.float32)
  want = conv(torch.as_tensor(x)).detach().numpy()  # NCHW
  flax_conv = nn.Conv(5, (3, 2), padding="VALID")
  xh = jnp.asarray(x.transpose(0, 2, 3, 1))  # NHWC
  template = jax.eval_shape(flax_conv.init, jax.random.key(0), xh)["params"]
  rules = [(r"kernel", "weight"), (r"bias", "bias")]
  params = interop.unpack_state_dict(conv.state_dict(), template, rules)
  assert params["kernel"].shape == (3, 2, 3, 5)
  got = flax_conv.apply({"params": params}, xh)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-5)
  shapes = {k: tuple(v.shape) for k, v in conv.state_dict().items()}
  back = interop.pack_state_dict(params, rules, shapes=shapes)
  np.testing.assert_array_equal(back["weight"], conv.weight.detach().numpy())
  with pytest.raises(ConversionError, match="ambiguous"):
    interop.pack_state_dict(params, rules)  # a 4-D kernel needs the torch shape


def test_linear_into_dense_general_matches_torch():
  torch.manual_seed(1)
  d, h, hd = 12, 3, 4
  q_proj, o_proj = torch.nn.Linear(d, h * hd), torch.nn.Linear(h * hd, d)
  x = np.random.default_rng(1).standard_normal((2, 5, d)).astype(np.float32)
  want = o_proj(q_proj(torch.as_tensor(x))).detach().numpy()

  class Attnish(nn.Module):
    @nn.compact
    def __call__(self, x):
      q = nn.DenseGeneral((h, hd), name="q_proj")(x)
      return nn.DenseGeneral(d, axis=(-2, -1), name="o_proj")(q)

  model = Attnish()
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x))["params"]
  sd = {f"{m}.{p}": t for m, mod in (("q_proj", q_proj), ("o_proj", o_proj))
        for p, t in mod.state_dict().items()}
  rules = [(r"(\w+)/kernel", r"\1.weight"), (r"(\w+)/bias", r"\1.bias")]
  params = interop.unpack_state_dict(sd, template, rules)
  assert params["q_proj"]["kernel"].shape == (d, h, hd)
  assert params["q_proj"]["bias"].shape == (h, hd)
  assert params["o_proj"]["kernel"].shape == (h, hd, d)
  np.testing.assert_allclose(model.apply({"params": params}, jnp.asarray(x)), want, atol=1e-5)
  back = interop.pack_state_dict(params, rules, shapes={k: v.shape for k, v in sd.items()})
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v.detach().numpy(), err_msg=k)


def test_embedding_and_layernorm_match_torch():
  torch.manual_seed(2)
  emb, ln = torch.nn.Embedding(10, 6), torch.nn.LayerNorm(6, eps=1e-5)
  with torch.no_grad():
    ln.weight.normal_(1, 0.3)
    ln.bias.normal_(0, 0.3)
  ids = np.array([[1, 4, 9], [0, 2, 2]])
  want = ln(emb(torch.as_tensor(ids))).detach().numpy()

  class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
      return nn.LayerNorm(epsilon=1e-5, name="ln")(nn.Embed(10, 6, name="emb")(ids))

  template = jax.eval_shape(Net().init, jax.random.key(0), jnp.asarray(ids))["params"]
  sd = {"emb.weight": emb.weight, "ln.weight": ln.weight, "ln.bias": ln.bias}
  rules = [(r"emb/embedding", "emb.weight"), (r"ln/scale", "ln.weight"), (r"ln/bias", "ln.bias")]
  params = interop.unpack_state_dict(sd, template, rules)
  np.testing.assert_allclose(Net().apply({"params": params}, jnp.asarray(ids)), want, atol=1e-5)


def test_stacked_layers_gather_and_split():
  rng = np.random.default_rng(3)
  sd = {f"blocks.{i}.fc.weight": rng.standard_normal((4, 3)).astype(np.float32)
        for i in range(5)}
  sd.update({f"blocks.{i}.fc.bias": rng.standard_normal(4).astype(np.float32)
             for i in range(5)})
  template = {"blocks": {"fc": {"kernel": jax.ShapeDtypeStruct((5, 3, 4), jnp.float32),
                                "bias": jax.ShapeDtypeStruct((5, 4), jnp.float32)}}}
  rules = [(r"blocks/fc/(kernel)", "blocks.{layer}.fc.weight"),
           (r"blocks/fc/bias", "blocks.{layer}.fc.bias")]
  params = interop.unpack_state_dict(sd, template, rules)
  np.testing.assert_array_equal(params["blocks"]["fc"]["kernel"][2], sd["blocks.2.fc.weight"].T)
  back = interop.pack_state_dict(params, rules)
  assert back.keys() == sd.keys()
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  assert interop.torch_keys("blocks.{layer}.w", (2, 1)) == ["blocks.0.w", "blocks.1.w"]
  index = interop.torch_index(template, rules)
  assert index.keys() == sd.keys() and index["blocks.3.fc.bias"] == ("blocks/fc/bias", 3)


def test_strict_error_lists_every_problem_once():
  template = {"a": {"kernel": jax.ShapeDtypeStruct((3, 2), jnp.float32)},
              "b": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)},
              "s": {"kernel": jax.ShapeDtypeStruct((2, 4, 4), jnp.float32)},
              "orphan": jax.ShapeDtypeStruct((1,), jnp.float32)}
  rules = [(r"(a|b)/kernel", r"\1.weight"), (r"s/kernel", "s.{layer}.weight")]
  sd = {"a.weight": np.zeros((5, 3), np.float32),  # shape mismatch
        "s.0.weight": np.zeros((4, 4), np.float32),  # s.1 missing
        "extra.weight": np.zeros(2), "extra.bias": np.zeros(2)}  # unexpected
  with pytest.raises(ConversionError) as info:
    interop.unpack_state_dict(sd, template, rules)
  e = info.value
  assert e.unmapped == ["orphan"]
  assert e.missing == [("b/kernel", "b.weight"), ("s/kernel", "s.1.weight")]
  assert e.unexpected == ["extra.weight", "extra.bias"]
  assert e.mismatched == [("a/kernel", "a.weight", (5, 3), (3, 2))]
  msg = str(e)
  for part in ("orphan", "b/kernel <- b.weight", "s/kernel <- s.1.weight", "extra.bias",
               "a/kernel <- a.weight: torch (5, 3) does not convert to Flax (3, 2)"):
    assert part in msg, part
  # ignore= skips keys; strict=False keeps concrete template values and warns
  concrete = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"kernel": jnp.ones((2, 3))}}
  with pytest.warns(UserWarning, match="b/kernel"):
    out = interop.unpack_state_dict({"a.weight": np.zeros((2, 3))}, concrete,
                                    rules, strict=False)
  assert float(out["a"]["kernel"].sum()) == 0 and float(out["b"]["kernel"].sum()) == 6
  with pytest.raises(ConversionError, match="abstract"):
    interop.unpack_state_dict({}, template, rules, strict=False)
  out = interop.unpack_state_dict({"a.weight": np.zeros((2, 3)), "junk": np.zeros(1)},
                                  {"a": {"kernel": template["a"]["kernel"]}}, rules,
                                  ignore=[r"junk"])
  assert out["a"]["kernel"].shape == (3, 2)


def test_dtype_policy_and_bfloat16_tensors():
  w = torch.randn(4, 3, dtype=torch.bfloat16)
  assert interop.to_numpy(w).dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(interop.to_numpy(w).astype(np.float32), w.float().numpy())
  t = {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32)}
  unpack = lambda **kw: interop.unpack_state_dict({"w": w}, {"x": t}, [(r"x/kernel", "w")], **kw)
  assert unpack()["x"]["kernel"].dtype == jnp.float32  # template
  assert unpack(dtype="keep")["x"]["kernel"].dtype == jnp.bfloat16
  assert unpack(dtype=jnp.float16)["x"]["kernel"].dtype == jnp.float16
  with pytest.raises(ValueError, match="template"):
    unpack(dtype="nonsense")
  packed = interop.pack_state_dict({"x": {"kernel": jnp.ones((3, 4))}}, [(r"x/kernel", "w")],
                                   dtype=jnp.bfloat16)
  assert packed["w"].dtype == ml_dtypes.bfloat16 and packed["w"].shape == (4, 3)


def test_sharded_template_places_leaves():
  mesh = jax.make_mesh((4,), ("model",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
  t = {"fc": {"kernel": jax.ShapeDtypeStruct((3, 8), jnp.float32, sharding=sharding)}}
  p = interop.unpack_state_dict({"fc.weight": np.ones((8, 3))}, t, [(r"fc/kernel", "fc.weight")])
  assert p["fc"]["kernel"].sharding == sharding


def test_files_round_trip_sharded_and_pt(tmp_path):
  rng = np.random.default_rng(4)
  sd = {f"layer.{i}.weight": rng.standard_normal((16, 16)).astype(np.float32) for i in range(4)}
  files = interop.write_state_dict(sd, tmp_path / "sharded", max_shard_size="2KB",
                                   metadata={"note": "x"})
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  assert len(files) == 5 and len(set(index["weight_map"].values())) == 4
  back = interop.read_state_dict(tmp_path / "sharded")
  assert isinstance(back, interop.SafetensorsDict) and back.metadata["format"] == "pt"
  assert back.metadata["note"] == "x"
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  from safetensors.torch import load_file  # torch reads what we wrote
  np.testing.assert_array_equal(
      load_file(files[0])["layer.0.weight"].numpy(), sd["layer.0.weight"])
  single = interop.write_state_dict(sd, tmp_path / "one.safetensors")
  assert dict(interop.read_state_dict(single[0])).keys() == sd.keys()
  torch.save({k: torch.as_tensor(v) for k, v in sd.items()}, tmp_path / "w.pt")
  np.testing.assert_array_equal(interop.read_state_dict(tmp_path / "w.pt")["layer.3.weight"],
                                sd["layer.3.weight"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    interop.read_state_dict(tmp_path / "empty")
  with pytest.raises(ValueError, match="don't know how"):
    interop.read_state_dict(tmp_path / "sharded" / "model.safetensors.index.jsonx")


class _Evil:  # a pickled object: weights_only loading must refuse it
  def __reduce__(self):
    return (print, ("unpickled!",))


def test_pt_file_never_unpickles_code(tmp_path):
  torch.save({"w": torch.zeros(2), "evil": _Evil()}, tmp_path / "bad.pt")
  with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
    interop.read_state_dict(tmp_path / "bad.pt")


def test_pack_errors():
  lp = lj.lora_init(jax.random.key(0), {"fc": {"kernel": jnp.ones((4, 4))}},
                    lj.LoraConfig(rank=2))
  with pytest.raises(TypeError, match="merge"):
    interop.pack_state_dict(lp, [(r"fc/kernel", "fc.weight")])
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))},
            "c": jnp.ones(2)}
  with pytest.raises(ConversionError) as info:
    interop.pack_state_dict(params, [(r"(a|b)/kernel", "same.weight")])
  assert info.value.unmapped == ["c"] and "two Flax leaves" in str(info.value)
  out = interop.pack_state_dict(params, [(r"a/kernel", "a.weight")], strict=False)
  assert list(out) == ["a.weight"]
  with pytest.raises(ConversionError, match=r"cannot be a torch Linear weight of shape \(3, 3\)"):
    interop.pack_state_dict(params, [(r"a/kernel", "a.weight")], strict=False,
                            shapes={"a.weight": (3, 3)})


def test_save_and_load_params_round_trip(tmp_path):
  params = {"enc": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
  rules = [(r"enc/kernel", "encoder.weight"), (r"enc/bias", "encoder.bias")]
  interop.save_params(params, tmp_path, rules)
  lin = torch.nn.Linear(2, 3)
  from safetensors.torch import load_file
  lin.load_state_dict({k.split(".")[1]: v for k, v in load_file(
      tmp_path / "model.safetensors").items()})
  x = np.ones((1, 2), np.float32)
  np.testing.assert_allclose(lin(torch.as_tensor(x)).detach().numpy(),
                             x @ params["enc"]["kernel"] + params["enc"]["bias"][None])
  back = interop.load_params(tmp_path, _abstract(params), rules)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
