"""Interop hardening (issue 9): HF configs, layouts, fused weights, bad files, PEFT edges."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from hf_tiny import HF_KW, IDS
from lora_jax.models import Llama, LlamaConfig, load_hf_llama, save_hf_llama


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
