"""PEFT ``target_parameters`` adapters on the Mixtral experts: import and export, logits equal."""

import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.interop import peft as lj_peft
from lora_jax.models import Mixtral, MixtralConfig, load_hf_mixtral, mixtral_rules

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = MixtralConfig.tiny()
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _hf():
  hf = {k: v for k, v in CFG.to_hf_dict().items()
        if k not in ("architectures", "model_type", "torch_dtype")}
  torch.manual_seed(0)
  return transformers.MixtralForCausalLM(transformers.MixtralConfig(
      **hf, initializer_range=0.2, attn_implementation="eager")).eval()


def _logits_torch(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def _apply(p, ids):
  return Mixtral(CFG).apply({"params": p}, ids)


IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9))


@pytest.mark.parametrize("targets", [EXPERTS, ["down_proj"]])
def test_peft_expert_adapter_imports_with_equal_logits(tmp_path, targets):
  base = _hf()
  params = load_hf_mixtral(base.state_dict(), CFG)
  torch.manual_seed(1)
  model = peft.get_peft_model(base, peft.LoraConfig(
      r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=targets,
      init_lora_weights=False))  # non-zero B: the adapter changes the logits
  model.eval()
  want = _logits_torch(model, IDS)
  model.save_pretrained(tmp_path)
  lp = lj_peft.load_peft_adapter(tmp_path, params, mixtral_rules())
  gu = lp["layers_0"]["mlp"]["experts"]["down_proj"]
  assert gu.roles == "soi" and gu.a.shape == (4, 48, 2) and gu.b.shape == (4, 2, 32)
  got = np.asarray(lj.lora(_apply, strict=True)(lp, jnp.asarray(IDS)))
  assert np.abs(want - _logits_torch(_hf(), IDS)).max() > 1e-3
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_expert_adapter_exports_to_peft_with_equal_logits(tmp_path):
  base = _hf()
  params = load_hf_mixtral(base.state_dict(), CFG)
  lp = lj.lora_init(__import__("jax").random.key(0), params,
                    lj.LoraConfig(rank=3, alpha=5, targets=r".*(experts/.*|q_proj/kernel)"),
                    trace=lambda p: _apply(p, jnp.asarray(IDS)))
  lp = _nonzero_b(lp)
  want = np.asarray(lj.lora(_apply, strict=True)(lp, jnp.asarray(IDS)))
  lj_peft.save_peft_adapter(tmp_path, lp, mixtral_rules())
  model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
  np.testing.assert_allclose(_logits_torch(model, IDS), want, atol=1e-4, rtol=0)
  back = lj_peft.load_peft_adapter(tmp_path, params, mixtral_rules())
  for name in ("gate_up_proj", "down_proj"):
    np.testing.assert_allclose(back["layers_1"]["mlp"]["experts"][name].b,
                               lp["layers_1"]["mlp"]["experts"][name].b, atol=1e-6)


def _nonzero_b(lp):
  import jax
  return jax.tree.map(
      lambda x: x.replace(b=0.1 * jax.random.normal(jax.random.key(7), x.b.shape))
      if isinstance(x, lj.LoraWeight) else x, lp, is_leaf=lambda x: isinstance(x, lj.LoraWeight))


def test_target_parameters_matching_nothing_is_refused(tmp_path):
  cfg = {"r": 2, "lora_alpha": 2, "target_modules": [], "target_parameters": ["experts.w9"]}
  with pytest.raises(ValueError, match="target_parameters entry 'experts.w9' matches no 3-D"):
    lj_peft.unpack_peft(cfg, {}, load_hf_mixtral(_hf().state_dict(), CFG), mixtral_rules())
