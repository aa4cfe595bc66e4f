"""The Flax Llama against transformers' LlamaForCausalLM, both directions, and LoRA on it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import lora_jax as lj
from hf_tiny import HF_KW, IDS, hf_logits, hf_model
from lora_jax.interop import ConversionError
from lora_jax.models import (Llama, LlamaConfig, generate, init_params,
                             load_hf_llama, save_hf_llama, to_hf_state_dict)

CASES = [(False, False), (True, True), (False, True), (True, False)]  # (scan, tied)


def flax_logits(cfg, params, ids=IDS):
  return np.asarray(jax.jit(Llama(cfg).apply)({"params": params}, jnp.asarray(ids)))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf(request):
  model = hf_model(request.param)
  return model, hf_logits(model)


@pytest.mark.parametrize("scan,tied", CASES)
def test_logits_match_transformers(scan, tied):
  model = hf_model(tied)
  cfg = LlamaConfig.from_hf(model.config, scan_layers=scan)
  assert (cfg.num_key_value_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (2, 500.0, tied)
  _, params = load_hf_llama(model.state_dict(), cfg)  # torch tensors, lm_head listed when tied
  if scan:
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 32, 16)
  else:
    assert params["layers_1"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
  assert ("lm_head" in params) == (not tied)
  want = hf_logits(model)
  assert np.abs(want).max() > 1.0  # not a trivially small comparison
  np.testing.assert_allclose(flax_logits(cfg, params), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_load_from_save_pretrained_dir(tmp_path, hf, shard):
  model, want = hf
  kw = {} if shard is None else {"max_shard_size": shard}
  model.save_pretrained(tmp_path, **kw)
  index = os.path.exists(tmp_path / "model.safetensors.index.json")
  assert index == (shard is not None)
  cfg, params = load_hf_llama(tmp_path, scan_layers=True)  # config from config.json
  assert cfg.scan_layers and cfg.tie_word_embeddings == model.config.tie_word_embeddings
  np.testing.assert_allclose(flax_logits(cfg, params), want, atol=1e-4, rtol=1e-4)


def _random_params(cfg, seed=1):
  """Init params with kernels at std 0.15 and norm scales around 1."""
  rng = np.random.default_rng(seed)
  def draw(path, x):
    if "scale" in jax.tree_util.keystr(path):
      return (1 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    return (0.15 * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, init_params(cfg, abstract=True))


@pytest.mark.parametrize("scan,tied", [(True, False), (False, True)])
def test_flax_to_transformers_from_pretrained(tmp_path, scan, tied):
  cfg = LlamaConfig.tiny(**HF_KW, scan_layers=scan,
                         tie_word_embeddings=tied)
  params = _random_params(cfg)
  files = save_hf_llama(params, cfg, tmp_path, max_shard_size="16KB" if scan else None)
  assert any(f.endswith("config.json") for f in files)
  model = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager").eval()
  assert model.config.num_key_value_heads == 2
  want = flax_logits(cfg, params)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(hf_logits(model), want, atol=1e-4, rtol=1e-4)
  sd = to_hf_state_dict(params, cfg)
  assert ("lm_head.weight" in sd) == (not tied)
  assert sd["model.layers.1.self_attn.v_proj.weight"].shape == (16, 32)


def test_generate_matches_transformers_greedy(hf):
  model, _ = hf
  cfg, params = load_hf_llama(model.state_dict(), LlamaConfig.from_hf(model.config))
  prompt = IDS[:, :4]
  apply = lambda p, ids: Llama(cfg).apply({"params": p}, ids)
  eos = model.config.eos_token_id  # 2: emitted by row 1, which then pads with 0 (as HF does)
  gen = jax.jit(generate, static_argnums=(0, 3), static_argnames=("eos_id",))
  ours = gen(apply, params, jnp.asarray(prompt), 5, eos_id=eos)
  with torch.no_grad():
    theirs = model.generate(torch.as_tensor(prompt), max_new_tokens=5, do_sample=False,
                            eos_token_id=eos, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_generate_sampling():  # eos handling: test_generate_matches_transformers_greedy
  cfg = LlamaConfig.tiny(num_hidden_layers=1)
  params = init_params(cfg)
  apply = lambda p, ids: Llama(cfg).apply({"params": p}, ids)
  gen = jax.jit(generate, static_argnums=(0, 3), static_argnames=("temperature", "top_k"))
  prompt = jnp.array([[1, 2, 3], [4, 5, 6]])
  sample = lambda seed, **kw: gen(apply, params, prompt, 4, key=jax.random.key(seed),
                                  temperature=1.0, top_k=5, **kw)
  a, b, c = sample(0), sample(0), sample(1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(a[:, :3], prompt)
  with pytest.raises(ValueError, match="key"):
    generate(apply, params, prompt, 2, temperature=0.7)


@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_lora_on_llama_equals_merged(scan):
  cfg = LlamaConfig.tiny(scan_layers=scan)
  model = Llama(cfg)
  ids = jnp.asarray(IDS % cfg.vocab_size)
  params = init_params(cfg)
  apply = lambda p, x: model.apply({"params": p}, x)
  config = lj.LoraConfig(rank=4, alpha=8,
                         targets=r".*(q|k|v|o|gate|up|down)_proj/kernel")
  lp = lj.lora_init(jax.random.key(1), params, config, trace=lambda p: apply(p, ids))
  nodes = lj.adapter(lp)
  assert len(nodes) == (7 if scan else 14)
  roles = {lw.roles for lw in nodes.values()}
  assert roles == ({"sio"} if scan else {"io"})
  if scan:
    q = lp["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.a.shape == (2, 32, 4) and q.b.shape == (2, 4, 32)
  rng = np.random.default_rng(2)
  nonzero_b = lambda n: n.replace(b=rng.normal(0, 0.5, n.b.shape).astype(np.float32))
  lp = jax.tree_util.tree_map(
      lambda n: nonzero_b(n) if isinstance(n, lj.LoraWeight) else n,
      lp, is_leaf=lambda n: isinstance(n, lj.LoraWeight))
  got = jax.jit(lj.lora(apply))(lp, ids)
  want, base = jax.jit(lambda p: (apply(lj.merge(p), ids), apply(lj.base(p), ids)))(lp)
  assert float(jnp.abs(want - base).max()) > 1e-2  # the adapters do something
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_config_from_hf_and_errors():
  hf_cfg = transformers.LlamaConfig(**HF_KW)
  cfg = LlamaConfig.from_hf(hf_cfg)
  assert cfg == LlamaConfig.from_hf(hf_cfg.to_dict())
  assert (cfg.head_size, cfg.rms_norm_eps, cfg.intermediate_size) == (8, 1e-5, 48)
  back = transformers.LlamaConfig(**cfg.to_hf_dict())
  assert back.num_key_value_heads == 2 and back.rope_parameters["rope_theta"] == 500.0
  scaled = dict(hf_cfg.to_dict(), rope_parameters={"rope_type": "llama3", "rope_theta": 1.0})
  with pytest.raises(NotImplementedError, match="llama3"):
    LlamaConfig.from_hf(scaled)
  with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
    LlamaConfig.tiny(num_key_value_heads=3)
  with pytest.raises(ValueError, match="config="):
    load_hf_llama({})


def test_load_strict_lists_problems():
  model = hf_model(False)
  sd = dict(model.state_dict())
  del sd["model.layers.0.mlp.up_proj.weight"]
  sd["model.layers.1.self_attn.q_proj.weight"] = sd["model.layers.1.self_attn.q_proj.weight"][:8]
  sd["model.extra.weight"] = torch.zeros(2)
  with pytest.raises(ConversionError) as e:
    load_hf_llama(sd, LlamaConfig.from_hf(model.config))
  msg = str(e.value)
  assert "layers_0/mlp/up_proj/kernel <- model.layers.0.mlp.up_proj.weight" in msg
  assert "model.extra.weight" in msg
  assert "torch (8, 32) does not convert to Flax (32, 32)" in msg
