"""DoRA against Hugging Face PEFT (use_dora=True) on a tiny LlamaForCausalLM:
PEFT's adapter loads with equal logits; lora_jax's DoRA adapter exports and
PEFT's model built from it gives equal logits."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import lora_jax as lj
from hf_tiny import HF_KW, hf_logits, hf_model
from lora_jax.interop import peft as lj_peft
from lora_jax.models import Llama, LlamaConfig, llama_name_map, load_hf_llama

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAME_MAP = llama_name_map()


def _logits(cfg, lparams):
  from hf_tiny import IDS
  return np.asarray(jax.jit(lj.lora(Llama(cfg).apply))({"params": lparams}, jnp.asarray(IDS)))


def _base(scan):
  return load_hf_llama(hf_model().state_dict(), LlamaConfig.from_hf(
      transformers.LlamaConfig(**HF_KW), scan_layers=scan))


@pytest.fixture(scope="module")
def peft_dora(tmp_path_factory):
  directory = tmp_path_factory.mktemp("peft_dora")
  model = hf_model()
  pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ,
                                                  use_dora=True))
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
      if "lora_magnitude_vector" in name:  # m away from ‖W‖_c
        p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=g))
  pm.save_pretrained(directory)
  return directory, hf_logits(pm.eval())


@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_peft_dora_adapter_loads_with_equal_logits(peft_dora, scan):
  directory, want = peft_dora
  cfg, params = _base(scan)
  lp = lj_peft.load_peft_adapter(directory, params, NAME_MAP)
  nodes = lj.adapter(lp)
  assert all(x.dora for x in nodes.values())
  assert np.abs(want - _logits(cfg, params)).max() > 0.5  # the adapter matters
  np.testing.assert_allclose(_logits(cfg, lp), want, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(_logits(cfg, lj.merge(lp)), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_lora_jax_dora_exports_to_peft(tmp_path, scan):
  cfg, params = _base(scan)
  lp = lj.lora_init(jax.random.key(1), params, lj.LoraConfig(
      rank=4, alpha=8, targets=r".*(q|k|v|o|gate|up|down)_proj/kernel", dora=True,
      layouts={".*": "sio"} if scan else None))
  leaves, treedef = jax.tree.flatten(lj.adapter(lp))
  keys = jax.random.split(jax.random.key(2), len(leaves))
  moved = jax.tree.unflatten(treedef, [x * (1 + 0.2 * jax.random.uniform(k, x.shape))
                                       + 0.1 * jax.random.normal(k, x.shape)
                                       for k, x in zip(keys, leaves)])
  lp = lj.attach(lj.base(lp), moved)
  lj_peft.save_peft_adapter(tmp_path, lp, NAME_MAP)
  pm = peft.PeftModel.from_pretrained(hf_model(), tmp_path).eval()
  assert pm.peft_config["default"].use_dora
  np.testing.assert_allclose(hf_logits(pm), _logits(cfg, lp), atol=1e-4, rtol=1e-4)
