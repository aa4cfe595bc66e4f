"""A transformers checkpoint saved with a bitsandbytes 4-bit quantization_config
loads straight into QuantizedWeights (no dequantization)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.models import Llama, load_bnb_llama, load_hf_llama, save_hf_llama

import torch
import transformers
import bitsandbytes.functional as bnbf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("bnb")
  cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(cfg).save_pretrained(root / "plain")
  quant = transformers.BitsAndBytesConfig(
      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
      bnb_4bit_compute_dtype=torch.float32)
  model = transformers.LlamaForCausalLM.from_pretrained(
      root / "plain", quantization_config=quant, device_map="cpu")
  model.save_pretrained(root / "nf4")
  return root, model


def test_bnb_nf4_checkpoint_loads_as_quantized_weights(checkpoints, tmp_path):
  root, bnb_model = checkpoints
  cfg, params = load_bnb_llama(root / "nf4", scan_layers=True)
  q = params["layers"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(q, lj.QuantizedWeight) and q.roles == "sio" and q.double_quant
  assert isinstance(params["lm_head"]["kernel"], jax.Array)
  # the same codes lj.quantize makes from the original weights
  cfg0, plain = load_hf_llama(root / "plain", scan_layers=True)
  ours = lj.quantize(plain, lj.QuantConfig(targets=r".*proj/kernel",
                                           layouts={r"layers/.*": "sio"}))
  mine = ours["layers"]["mlp"]["down_proj"]["kernel"]
  np.testing.assert_array_equal(q.codes, mine.codes)
  np.testing.assert_array_equal(q.absmax, mine.absmax)
  # dequantized: bitsandbytes' own values
  lin = bnb_model.model.layers[1].mlp.down_proj
  want = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).numpy().T
  np.testing.assert_array_equal(np.asarray(q.dequantize()[1]), want)
  # a forward through lj.lora equals the dense model on the dequantized weights
  ids = jnp.array([[1, 5, 9, 3, 7]], jnp.int32)
  got = lj.lora(lambda p, x: Llama(cfg).apply({"params": p}, x))(params, ids)
  save_hf_llama(lj.dequantize(params), cfg, str(tmp_path / "dense"))
  dense = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense",
                                                        dtype=torch.float32)
  with torch.no_grad():
    ref = dense(torch.tensor(np.asarray(ids))).logits.numpy()
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_plain_checkpoint_is_refused(checkpoints):
  root, _ = checkpoints
  with pytest.raises(ValueError, match="no bitsandbytes 4-bit quantization_config.*"
                                       "use load_hf_llama"):
    load_bnb_llama(root / "plain")
