"""Interop hardening (issue 9): HF configs, layouts, fused weights, bad files, PEFT edges."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import lora_jax as lj
from hf_tiny import HF_KW, IDS, hf_logits, hf_model
from lora_jax import interop
from lora_jax.interop import ConversionError, Rule
from lora_jax.interop import peft as lj_peft
from lora_jax.models import (Llama, LlamaConfig, init_params, llama_name_map, load_hf_llama,
                             save_hf_llama)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _randomize(model, seed=0):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("ln_1.weight") or name.endswith(
          "ln_2.weight") or name.endswith("ln_f.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0, 0.15)
  return model.eval()


# --- 1. HF configs: sliding window implemented, the rest refused by name -------

def _mistral(window):
  kw = {k: v for k, v in HF_KW.items() if k != "rope_theta"}
  cfg = transformers.MistralConfig(**kw, sliding_window=window,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0})
  return _randomize(transformers.MistralForCausalLM._from_config(
      cfg, attn_implementation="eager"))


@pytest.mark.parametrize("window", [3, None])
def test_mistral_sliding_window_matches_transformers(tmp_path, window):
  model = _mistral(window)
  with torch.no_grad():
    want = model(torch.as_tensor(IDS)).logits.numpy()
  cfg = LlamaConfig.from_hf(model.config)
  assert cfg.sliding_window == window
  _, params = load_hf_llama(model.state_dict(), cfg)
  got = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(IDS)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # and back: save_hf_llama writes a Mistral that transformers loads as one
  save_hf_llama(params, cfg, tmp_path)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
  assert back.config.model_type == ("mistral" if window else "llama")
  with torch.no_grad():
    np.testing.assert_allclose(back(torch.as_tensor(IDS)).logits.numpy(), want, atol=1e-4)


@pytest.mark.parametrize("change,field", [
    (dict(model_type="qwen2"), "model_type='qwen2'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0}),
     "rope_type='linear'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1.0,
                           "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    (dict(attention_dropout=0.1), "attention_dropout=0.1"),
    (dict(sliding_window=4), "sliding_window=4 with model_type='llama'"),
    (dict(model_type="mistral", attention_bias=True), "attention_bias=True"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types="),
])
def test_from_hf_refuses_unimplemented_fields(change, field):
  d = dict(transformers.LlamaConfig(**HF_KW).to_dict(), **change)
  with pytest.raises(NotImplementedError, match="does not implement") as e:
    LlamaConfig.from_hf(d)
  assert field in str(e.value)


def test_from_hf_honours_implemented_fields():
  d = transformers.LlamaConfig(**HF_KW, head_dim=16, attention_bias=True, mlp_bias=True,
                               tie_word_embeddings=True).to_dict()
  cfg = LlamaConfig.from_hf(d)
  assert (cfg.head_size, cfg.attention_bias, cfg.mlp_bias, cfg.tie_word_embeddings) == (
      16, True, True, True)


# --- 2. GPT-2 Conv1D: per-rule layouts, both directions, PEFT fan_in_fan_out ---



GPT2_IDS = np.array([[3, 17, 5, 60, 2, 9, 41, 0], [1, 1, 8, 33, 12, 63, 7, 22]])
GPT2_COMMON = [
    (r"(wte|wpe)/embedding", r"transformer.\1.weight"),
    (r"ln_f/scale", "transformer.ln_f.weight"), (r"ln_f/bias", "transformer.ln_f.bias"),
    (r"h_(\d+)/(ln_1|ln_2)/scale", r"transformer.h.\1.\2.weight"),
    (r"h_(\d+)/(ln_1|ln_2)/bias", r"transformer.h.\1.\2.bias"),
    (r"h_(\d+)/(attn|mlp)/(c_\w+)/bias", r"transformer.h.\1.\2.\3.bias"),
]


def _gpt2_rules(layout="conv1d"):
  """GPT-2's name map; every c_* kernel is a Conv1D, stored (in, out)."""
  rules = list(GPT2_COMMON)
  kernel = (r"h_(\d+)/(attn|mlp)/(c_\w+)/kernel", r"transformer.h.\1.\2.\3.weight")
  return rules + [kernel + ((layout,) if layout else ())]


def _gpt2_split_rules():
  """c_attn's fused (in, 3E) Conv1D weight as separate query/key/value leaves."""
  rules = _gpt2_rules()
  for i, name in enumerate(("query", "key", "value")):
    rules += [Rule(rf"h_(\d+)/attn/{name}/kernel", r"transformer.h.\1.attn.c_attn.weight",
                   "conv1d", (i, 3)),
              Rule(rf"h_(\d+)/attn/{name}/bias", r"transformer.h.\1.attn.c_attn.bias",
                   "as_is", (i, 3))]
  return rules


def _gpt2(n_embd=16):
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=n_embd, n_layer=2,
                                n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  return _randomize(transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation="eager"))


def _gpt2_template(model, split=False):
  sd = model.state_dict()
  t = {}
  for k, v in sd.items():
    parts = k.removeprefix("transformer.").split(".")
    if parts[0] == "lm_head":
      continue
    leaf = {"weight": "kernel" if parts[-2].startswith("c_") else "embedding",
            "bias": "bias"}[parts[-1]]
    if parts[-2].startswith("ln"):
      leaf = "scale" if parts[-1] == "weight" else "bias"
    path = ([f"h_{parts[1]}"] + parts[2:-1]) if parts[0] == "h" else parts[:-1]
    shape = tuple(v.shape)
    names = [path[-1]]
    if split and path[-1] == "c_attn":
      names, shape = ["query", "key", "value"], shape[:-1] + (shape[-1] // 3,)
    for n in names:
      node = t
      for p in path[:-1] + [n]:
        node = node.setdefault(p, {})
      node[leaf] = jax.ShapeDtypeStruct(shape, np.float32)
  return t


def _row(v, x):
  return v.reshape((1,) * (x.ndim - 1) + (-1,))  # strict rank promotion


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-5) * _row(p["scale"], x) + _row(p["bias"], x)


def _dense(x, p):
  y = x @ p["kernel"]
  return y + _row(p["bias"], y)


def gpt2_forward(params, ids, n_head=2):
  """GPT-2 (tied head, gelu_new) as a plain function of Flax-style params."""
  t = ids.shape[1]
  x = params["wte"]["embedding"][ids] + params["wpe"]["embedding"][jnp.arange(t)][None]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for i in range(len([k for k in params if k.startswith("h_")])):
    h = params[f"h_{i}"]
    a = _ln(x, h["ln_1"])
    if "c_attn" in h["attn"]:
      q, k, v = jnp.split(_dense(a, h["attn"]["c_attn"]), 3, axis=-1)
    else:
      q, k, v = (_dense(a, h["attn"][n]) for n in ("query", "key", "value"))
    heads = lambda z: z.reshape(z.shape[:2] + (n_head, -1))
    q, k, v = heads(q), heads(k), heads(v)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(mask[None, None], s, -1e9), axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", p, v).reshape(x.shape)
    x = x + _dense(o, h["attn"]["c_proj"])
    m = jax.nn.gelu(_dense(_ln(x, h["ln_2"]), h["mlp"]["c_fc"]), approximate=True)
    x = x + _dense(m, h["mlp"]["c_proj"])
  return _ln(x, params["ln_f"]) @ params["wte"]["embedding"].T


def _torch_logits(model, ids=GPT2_IDS):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.numpy()


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split_qkv"])
def test_gpt2_conv1d_layout_matches_transformers(split):
  model = _gpt2()
  sd = model.state_dict()
  rules = _gpt2_split_rules() if split else _gpt2_rules()
  params = interop.load_params(sd, _gpt2_template(model, split), rules,
                               ignore=[r"lm_head\.weight"])
  want = _torch_logits(model)
  assert np.abs(want).max() > 1.0
  got = np.asarray(jax.jit(gpt2_forward)(params, jnp.asarray(GPT2_IDS)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # and back: the same tensors, bit for bit (fused parts concatenated)
  back = interop.pack_state_dict(params, rules)
  assert sorted(back) == sorted(k for k in sd if k != "lm_head.weight")
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)


def test_gpt2_square_conv1d_without_layout_is_wrong_and_nonsquare_names_the_fix():
  model = _gpt2()
  sd = model.state_dict()
  # non-square c_attn (16, 48) / c_fc: the error says Conv1D and the layout to use
  with pytest.raises(ConversionError) as e:
    interop.load_params(sd, _gpt2_template(model), _gpt2_rules(layout=None),
                        ignore=[r"lm_head\.weight"])
  msg = str(e.value)
  assert "h_0/attn/c_attn/kernel <- transformer.h.0.attn.c_attn.weight" in msg
  assert "GPT-2 Conv1D weight? give its name-map rule the layout 'conv1d'" in msg
  # a Linear weight given layout conv1d: the error says it fits transposed
  t = {"fc": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32)}}
  with pytest.raises(ConversionError, match="fits transposed.*layout 'transposed'"):
    interop.unpack_state_dict({"fc.weight": np.ones((2, 3))}, t, [("fc/kernel", "fc.weight",
                                                                    "conv1d")])


def test_layout_rule_validation():
  with pytest.raises(TypeError, match="layout 'conv2d' is not one of"):
    interop.as_name_map([("a", "b", "conv2d")])
  with pytest.raises(TypeError, match=r"part must be \(i, n\)"):
    interop.as_name_map([("a", "b", "auto", (3, 3))])


def _peft_gpt2(tmp_path):
  model = _gpt2()
  cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"],
                        fan_in_fan_out=True, init_lora_weights=False)
  pm = peft.get_peft_model(model, cfg).eval()
  pm.save_pretrained(tmp_path / "peft")
  return pm, _torch_logits(pm)


def test_gpt2_peft_conv1d_adapter_import_export(tmp_path):
  pm, want = _peft_gpt2(tmp_path)
  base_sd = pm.get_base_model().state_dict()
  plain = {k.replace(".base_layer", ""): v for k, v in base_sd.items() if "lora_" not in k}
  model = _gpt2()
  params = interop.load_params(plain, _gpt2_template(model), _gpt2_rules(),
                               ignore=[r"lm_head\.weight"])
  lp = interop.load_peft_adapter(tmp_path / "peft", params, _gpt2_rules())
  assert isinstance(lp["h_1"]["attn"]["c_attn"]["kernel"], lj.LoraWeight)
  got = np.asarray(jax.jit(lj.lora(gpt2_forward))(lp, jnp.asarray(GPT2_IDS)))
  base = np.asarray(gpt2_forward(params, jnp.asarray(GPT2_IDS)))
  assert np.abs(want - base).max() > 0.1  # the adapter matters
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # export: PEFT reads our adapter onto a fresh GPT-2 and computes the same
  interop.save_peft_adapter(tmp_path / "ours", lp, _gpt2_rules())
  cfg = peft.LoraConfig.from_pretrained(tmp_path / "ours")
  assert cfg.fan_in_fan_out is True
  again = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "ours").eval()
  np.testing.assert_allclose(_torch_logits(again), want, atol=1e-4, rtol=1e-4)


def test_gpt2_peft_adapter_on_a_split_fused_weight_is_refused(tmp_path):
  _peft_gpt2(tmp_path)
  model = _gpt2()
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _gpt2_template(model, split=True))
  with pytest.raises(ConversionError, match=r"transformer.h.0.attn.c_attn: has LoRA tensors, "
                                            r"but its weight is fused and split over Flax leaves"):
    interop.load_peft_adapter(tmp_path / "peft", params, _gpt2_split_rules())


def test_peft_fan_in_fan_out_on_a_linear_layout_is_refused(tmp_path):
  pm, _ = _peft_gpt2(tmp_path)
  model = _gpt2()
  plain = {k.replace(".base_layer", ""): v for k, v in pm.get_base_model().state_dict().items()
           if "lora_" not in k}
  params = interop.load_params(plain, _gpt2_template(model), _gpt2_rules(),
                               ignore=[r"lm_head\.weight"])
  with pytest.raises(ValueError, match="fan_in_fan_out=True.*layout 'conv1d'"):
    interop.load_peft_adapter(tmp_path / "peft", params, _gpt2_rules("transposed"))


# --- 6. fused torch weights: nn.MultiheadAttention in_proj <-> Flax q/k/v --------

MHA_RULES = [Rule(f"{n}/{leaf}", f"in_proj_{t}", part=(i, 3))
             for i, n in enumerate(("query", "key", "value"))
             for leaf, t in (("kernel", "weight"), ("bias", "bias"))]
MHA_RULES += [(r"out/kernel", "out_proj.weight"), (r"out/bias", "out_proj.bias")]


def test_multihead_attention_in_proj_split_and_concat():
  torch.manual_seed(0)
  mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
  with torch.no_grad():
    for p in mha.parameters():
      p.normal_(0, 0.3)
  x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
  with torch.no_grad():
    want = mha(*(torch.as_tensor(x),) * 3, need_weights=False)[0].numpy()
  module = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, out_features=16)
  template = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  sd = mha.state_dict()
  params = interop.load_params(sd, template, MHA_RULES)
  assert params["query"]["kernel"].shape == (16, 4, 4)
  got = np.asarray(module.apply({"params": params}, x))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # save: q/k/v concatenated back into in_proj_weight / in_proj_bias
  shapes = {k: v.shape for k, v in sd.items()}
  back = interop.pack_state_dict(params, MHA_RULES, shapes=shapes)
  assert sorted(back) == sorted(sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)


def test_fused_parts_errors():
  template = {"query": {"kernel": jax.ShapeDtypeStruct((4, 4), np.float32)}}
  rules = [Rule("query/kernel", "in_proj_weight", part=(0, 3))]
  with pytest.raises(ConversionError, match="does not split into 3 equal slices"):
    interop.unpack_state_dict({"in_proj_weight": np.ones((10, 4))}, template, rules)
  with pytest.raises(ConversionError, match=r"lacks part\(s\) \[1, 2\]"):
    interop.pack_state_dict({"query": {"kernel": np.ones((4, 4))}}, rules)


# --- 3. damaged files and invalid adapter configs name the file (and field) ------




def _written(tmp_path):
  return interop.write_state_dict({"w": np.ones((64, 64), np.float32)}, tmp_path)[0]


@pytest.mark.parametrize("damage", ["truncated", "header", "garbage", "empty"])
def test_damaged_safetensors_name_the_file(tmp_path, damage):
  f = _written(tmp_path)
  raw = open(f, "rb").read()
  data = {"truncated": raw[:len(raw) // 2], "header": raw[:20],
          "garbage": b"\xff" * 100, "empty": b""}[damage]
  open(f, "wb").write(data)
  with pytest.raises(ValueError, match="is not a valid safetensors file") as e:
    sd = interop.read_state_dict(tmp_path)
    [sd[k] for k in sd]  # noqa: B018
  assert f in str(e.value) and "truncated or damaged" in str(e.value)


def test_bad_shard_index_names_the_file(tmp_path):
  interop.write_state_dict({f"w{i}": np.ones(256, np.float32) for i in range(3)}, tmp_path,
                           max_shard_size=2048)
  index = tmp_path / "model.safetensors.index.json"
  index.write_text("{not json")
  with pytest.raises(ValueError, match=rf"{index} is not valid JSON \(line 1, column 2"):
    interop.read_state_dict(tmp_path)
  index.write_text('{"weights": {}}')
  with pytest.raises(ValueError, match=rf"{index} has no 'weight_map'"):
    interop.read_state_dict(tmp_path)
  index.write_text('{"weight_map": {"w0": "gone.safetensors"}}')
  with pytest.raises(FileNotFoundError, match="gone.safetensors does not exist"):
    interop.read_state_dict(tmp_path)


def _tiny_adapter(tmp_path):
  p = lj.lora_init(jax.random.key(0), {"fc": {"kernel": np.ones((3, 2), np.float32)}},
                   lj.LoraConfig(rank=1, targets=".*kernel"))
  lj_peft.save_peft_adapter(tmp_path, p, [("fc/kernel", "fc.weight")])
  return lj.base(p), tmp_path / "adapter_config.json"


@pytest.mark.parametrize("edit,expected", [
    (lambda c: "{oops", r"is not valid JSON \(line 1, column 2"),
    (lambda c: json.dumps([1, 2]), "must be a JSON object; found list"),
    (lambda c: json.dumps(dict(c, r="1")), r"field 'r' must be a positive integer; found '1'"),
    (lambda c: json.dumps(dict(c, lora_alpha=[2])), "field 'lora_alpha' must be a finite number"),
    (lambda c: json.dumps(dict(c, target_modules=3)), "field 'target_modules' must be a regex"),
    (lambda c: json.dumps(dict(c, rank_pattern={"fc": -1})), "field 'rank_pattern' must be"),
    (lambda c: json.dumps(dict(c, lora_dropout=1.5)), r"field 'lora_dropout' must be a number in"),
    (lambda c: json.dumps({k: v for k, v in c.items() if k != "target_modules"}),
     "field 'target_modules' is missing"),
])
def test_invalid_adapter_config_names_file_and_field(tmp_path, edit, expected):
  base, cfg_file = _tiny_adapter(tmp_path)
  cfg_file.write_text(edit(json.loads(cfg_file.read_text())))
  with pytest.raises(ValueError, match=expected) as e:
    lj_peft.load_peft_adapter(tmp_path, base, [("fc/kernel", "fc.weight")])
  assert str(cfg_file) in str(e.value)


def test_in_memory_peft_config_with_sets_is_valid():
  # PEFT's LoraConfig.to_dict() keeps target_modules as a set (JSON has lists)
  from lora_jax._src.interop.peft_format import validate_config
  validate_config({"r": 4, "target_modules": {"q_proj", "v_proj"},
                   "layers_to_transform": (0, 1)})
  with pytest.raises(ValueError, match="field 'target_modules' must be"):
    validate_config({"r": 4, "target_modules": {"q_proj", 3}})


def test_damaged_adapter_weights_name_the_file(tmp_path):
  base, _ = _tiny_adapter(tmp_path)
  w = tmp_path / "adapter_model.safetensors"
  w.write_bytes(w.read_bytes()[:30])
  with pytest.raises(ValueError, match=f"{w} is not a valid safetensors file"):
    lj_peft.load_peft_adapter(tmp_path, base, [("fc/kernel", "fc.weight")])


def test_hf_config_json_errors_name_the_file(tmp_path):
  cfg = LlamaConfig.tiny(num_hidden_layers=1)
  save_hf_llama(init_params(cfg), cfg, tmp_path)
  d = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in d.items()
                                                    if k != "hidden_size"}))
  with pytest.raises(ValueError, match=r"config.json: LlamaConfig.from_hf: invalid config "
                                       r"fields:\n  hidden_size: missing"):
    load_hf_llama(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(dict(d, model_type="gemma")))
  with pytest.raises(NotImplementedError, match="(?s)config.json: .*model_type='gemma'"):
    load_hf_llama(tmp_path)


# --- 4/5. load_peft_adapter: ignore=, dry_run=, PEFT's saved embedding base layers --



def _peft_llama(directory, targets, **kw):
  """A PEFT LoRA on a tiny Llama, saved with PEFT's default (save_embedding_layers="auto")."""
  model = hf_model()
  base_sd = {k: v.clone() for k, v in model.state_dict().items()}
  pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                  init_lora_weights=False, **kw))
  with pytest.warns(UserWarning, match="save_embedding_layers"):
    pm.save_pretrained(directory)
  return base_sd, hf_logits(pm.eval())


def _llama_lora_logits(cfg, lp):
  return np.asarray(jax.jit(lj.lora(Llama(cfg).apply))({"params": lp}, jnp.asarray(IDS)))


def test_peft_default_save_with_embedding_base_layers_loads(tmp_path):
  base_sd, want = _peft_llama(tmp_path, ["embed_tokens", "q_proj", "lm_head"])
  written = sorted(k for k in safetensors_keys(tmp_path) if "base_layer" in k)
  assert written == ["base_model.model.lm_head.base_layer.weight",
                     "base_model.model.model.embed_tokens.base_layer.weight"]
  cfg, params = load_hf_llama(base_sd, LlamaConfig.from_hf(transformers.LlamaConfig(**HF_KW)))
  lp = lj_peft.load_peft_adapter(tmp_path, params, llama_name_map())
  assert isinstance(lp["embed_tokens"]["embedding"], lj.LoraWeight)
  assert np.abs(want - _llama_lora_logits(cfg, params)).max() > 0.1
  np.testing.assert_allclose(_llama_lora_logits(cfg, lp), want, atol=1e-4, rtol=1e-4)
  report = lj_peft.load_peft_adapter(tmp_path, params, llama_name_map(), dry_run=True)
  assert report.ok and len(report.loaded) == 4
  assert ("base_model.model.model.embed_tokens.base_layer.weight (equals the base weight)"
          in report.skipped)


def safetensors_keys(directory):
  return list(interop.read_state_dict(directory / "adapter_model.safetensors"))


def test_peft_embedding_base_layer_that_differs_is_an_error(tmp_path):
  base_sd, _ = _peft_llama(tmp_path, ["embed_tokens"])
  base_sd["model.embed_tokens.weight"] = base_sd["model.embed_tokens.weight"].clone()
  base_sd["model.embed_tokens.weight"][3, 5] += 0.25
  cfg, params = load_hf_llama(base_sd, LlamaConfig.from_hf(transformers.LlamaConfig(**HF_KW)))
  key = "base_model.model.model.embed_tokens.base_layer.weight"
  with pytest.raises(ConversionError, match=rf"{key}: PEFT saved this module's base weight "
                                            r"and it differs .* \(max \|difference\| 0.25\)"):
    lj_peft.load_peft_adapter(tmp_path, params, llama_name_map())
  # knowingly keep our base: ignore= that key
  lp = lj_peft.load_peft_adapter(tmp_path, params, llama_name_map(), ignore=[key])
  assert isinstance(lp["embed_tokens"]["embedding"], lj.LoraWeight)


def test_ignore_and_dry_run(tmp_path):
  base_sd, _ = _peft_llama(tmp_path, ["embed_tokens", "q_proj", "v_proj"])
  cfg, params = load_hf_llama(base_sd, LlamaConfig.from_hf(transformers.LlamaConfig(**HF_KW)))
  # an extra tensor nothing takes: the error points to ignore=, which now exists
  f = tmp_path / "adapter_model.safetensors"
  tensors = dict(interop.read_state_dict(f))
  tensors["base_model.model.model.extra.scale"] = np.ones(3, np.float32)
  interop.write_state_dict(tensors, f)
  with pytest.raises(ConversionError, match=r"(?s)unexpected torch keys.*pass ignore=\[regex\]"
                                            r".*base_model.model.model.extra.scale"):
    lj_peft.load_peft_adapter(tmp_path, params, llama_name_map())
  report = lj_peft.load_peft_adapter(tmp_path, params, llama_name_map(), dry_run=True)
  assert not report.ok and report.unexpected == ["base_model.model.model.extra.scale"]
  assert "would NOT load" in str(report) and len(report.loaded) == 5
  # ignore by key and by module name: v_proj adapters skipped, not reported missing
  ignore = [r".*\.extra\.scale", r"model\.layers\.\d+\.self_attn\.v_proj"]
  report = lj_peft.load_peft_adapter(tmp_path, params, llama_name_map(), ignore=ignore,
                                     dry_run=True)
  assert report.ok and len(report.loaded) == 3 and not report.missing
  assert "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight" in report.skipped
  lp = lj_peft.load_peft_adapter(tmp_path, params, llama_name_map(), ignore=ignore)
  assert not isinstance(lp["layers_0"]["self_attn"]["v_proj"]["kernel"], lj.LoraWeight)
  assert isinstance(lp["layers_0"]["self_attn"]["q_proj"]["kernel"], lj.LoraWeight)


def test_missing_optional_package_names_the_extra(tmp_path):
  # a subprocess in which safetensors and torch cannot be imported
  code = textwrap.dedent(f"""
      import sys
      class Block:
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("safetensors", "torch"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
      sys.meta_path.insert(0, Block())
      from lora_jax import interop
      try:
        interop.read_state_dict({str(tmp_path / 'model.safetensors')!r})
      except ModuleNotFoundError as e:
        print(e)
      """)
  (tmp_path / "model.safetensors").write_bytes(b"x")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
  assert "needs the safetensors package, which is not installed" in out.stdout, out.stderr
  assert "lora_jax[torch]" in out.stdout
