"""A QLoRA adapter exports to PEFT and loads on the same (dequantized) base."""

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from lora_jax.models import Llama, LlamaConfig, init_params, llama_name_map, save_hf_llama

import torch
import peft
import transformers
from lora_jax.interop.peft import save_peft_adapter  # noqa: E402

TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"


def test_qlora_adapter_loads_in_peft_on_the_dequantized_base_with_equal_logits(tmp_path):
  cfg = LlamaConfig.tiny(scan_layers=True, hidden_size=64, intermediate_size=128)
  model = Llama(cfg)
  ids = jnp.array([[1, 5, 9, 3, 7, 2]], jnp.int32)
  apply = lambda p, x: model.apply({"params": p}, x)
  trace = lambda p: apply(p, ids)
  params = init_params(cfg, jax.random.key(0))
  q = lj.quantize(params, lj.QuantConfig(targets=TARGETS), trace=trace)
  lp = lj.lora_init(jax.random.key(1), q, lj.LoraConfig(rank=4, alpha=8, targets=TARGETS),
                    trace=trace)
  lp = jax.tree.map(lambda x: x.replace(b=jax.random.normal(jax.random.key(2), x.b.shape) * 0.1)
                    if isinstance(x, lj.LoraWeight) else x, lp,
                    is_leaf=lambda x: isinstance(x, lj.LoraWeight))
  base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
  save_hf_llama(lj.dequantize(q), cfg, str(base_dir))     # the weights it trained against
  save_peft_adapter(str(adapter_dir), lp, llama_name_map(cfg),
                    base_model_name_or_path=str(base_dir))
  tensors = __import__("safetensors.numpy", fromlist=["load_file"]).load_file(
      str(adapter_dir / "adapter_model.safetensors"))
  assert tensors and all("lora_" in k for k in tensors)   # A/B only, no base weights
  hf = transformers.LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
  hf = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
  with torch.no_grad():
    want = hf(torch.tensor(np.asarray(ids))).logits.numpy()
  got = np.asarray(jax.jit(lj.lora(apply))(lp, ids))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
