"""A tiny random Hugging Face Llama, built offline from a config, for interop tests."""

import numpy as np
import torch
import transformers

HF_KW = dict(vocab_size=64, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             rms_norm_eps=1e-5, rope_theta=500.0, max_position_embeddings=64)
IDS = np.array([[3, 17, 5, 60, 2, 9, 41, 0], [1, 1, 8, 33, 12, 63, 7, 22]])


def hf_model(tied: bool = False, seed: int = 0):
  """A random LlamaForCausalLM with weights large enough to matter."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**HF_KW, tie_word_embeddings=tied)
  model = transformers.LlamaForCausalLM._from_config(
      cfg, attn_implementation="eager").eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0, 0.15)
  return model


def hf_logits(model, ids=IDS):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.numpy()
