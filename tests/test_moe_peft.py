"""PEFT ``target_parameters`` adapters on the Mixtral experts: import and export, logits equal."""

import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.interop import peft as lj_peft
from lora_jax.models import Mixtral, MixtralConfig, load_hf_mixtral, mixtral_rules

import torch
import transformers
import peft

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


# --------------------------------------- pure pack / unpack of expert tensors

_RULES = [(r"moe/(w_in|w_out)", r"moe.experts.\1", "as_is")]


def _experts(roles_in="soi", dropout=0.0):
  import jax
  base = {"moe": {"w_in": np.zeros((4, 6, 3), np.float32),     # used as (E, out, in)
                  "w_out": np.zeros((4, 3, 5), np.float32)}}    # used as [E, in, out]
  cfg = lj.LoraConfig(rank=2, alpha=3, targets="moe/.*", dropout=dropout,
                      layouts={"moe/w_in": roles_in, "moe/w_out": "sio"})
  lp = lj.lora_init(jax.random.key(0), base, cfg)
  return base, _nonzero_b(lp)


def test_expert_factors_round_trip_in_both_axis_orders():
  import jax
  from jax import lax
  base, lp = _experts()
  config, tensors = lj_peft.pack_peft(lp, _RULES)
  assert config["target_parameters"] == ["w_in", "w_out"] and config["target_modules"] == []
  # w_in is declared (sorted here) first: inner wrapper, one .base_layer
  assert sorted(tensors) == [
      "base_model.model.moe.experts.base_layer.lora_A.weight",
      "base_model.model.moe.experts.base_layer.lora_B.weight",
      "base_model.model.moe.experts.lora_A.weight", "base_model.model.moe.experts.lora_B.weight"]
  dn = lax.RaggedDotDimensionNumbers((((1,), (2,)), ((), ())), (0,), (0,))
  sizes = jnp.array([1, 2, 0, 3], jnp.int32)

  def model(p):
    h = lax.ragged_dot_general(jnp.ones((6, 3)), p["moe"]["w_in"], sizes, dn)
    return lax.ragged_dot(h[:, :3], p["moe"]["w_out"], sizes)
  back = lj_peft.unpack_peft(config, tensors, base, _RULES, trace=model)
  for name in ("w_in", "w_out"):
    got, want = back["moe"][name], lp["moe"][name]
    assert got.roles == want.roles
    np.testing.assert_allclose(got.a, want.a, atol=1e-6)
    np.testing.assert_allclose(got.b * got.scale, want.b * want.scale, atol=1e-6)
  np.testing.assert_allclose(lj.lora(model, strict=True)(back), model(lj.merge(lp)), atol=1e-5)
  # without trace= an [E, in, out] tensor is read as HF's (E, out, in): refused, not misread
  with pytest.raises(ValueError, match=r"moe/w_out <- .*do not fit the expert tensor \(4, 3, 5\) "
                                       r"\(roles 'soi'\)"):
    lj_peft.unpack_peft(config, tensors, base, _RULES)
  del jax


def test_expert_export_and_import_errors():
  base, lp = _experts(dropout=0.1)
  with pytest.raises(ValueError, match=r"moe/w_in: dropout 0.1; PEFT's ParamWrapper"):
    lj_peft.pack_peft(lp, _RULES)
  base, lp = _experts(roles_in="ios")
  with pytest.raises(ValueError, match=r"moe/w_in: roles 'ios'; PEFT adapts a 3-D parameter"):
    lj_peft.pack_peft(lp, _RULES)
  base, lp = _experts()
  config, tensors = lj_peft.pack_peft(lp, _RULES)
  del tensors["base_model.model.moe.experts.lora_B.weight"]
  with pytest.raises(ValueError, match=r"moe/w_out <- base_model.model.moe.experts.lora_B.weight "
                                       r"\(targeted by target_parameters\)"):
    lj_peft.unpack_peft(config, tensors, base, _RULES)
  config, tensors = lj_peft.pack_peft(lp, _RULES)
  with pytest.raises(ValueError, match=r"rank 2 per expert, but the config gives "
                                       r"moe.experts.w_in rank 4"):
    lj_peft.unpack_peft(dict(config, r=4, rank_pattern={"w_out": 2}), tensors, base, _RULES)


def test_unpack_with_trace_on_a_plain_linear():
  """``unpack_peft(..., trace=)`` used to raise UnboundLocalError (a local ``layout``
  shadowed the layout module for the whole function)."""
  base = {"fc": {"kernel": np.zeros((3, 2), np.float32)}}
  cfg = {"r": 1, "lora_alpha": 2, "target_modules": ["fc"]}
  t = {"base_model.model.fc.lora_A.weight": np.ones((1, 3), np.float32),
       "base_model.model.fc.lora_B.weight": np.ones((2, 1), np.float32)}
  lw = lj_peft.unpack_peft(cfg, t, base, [(r"fc/kernel", "fc.weight")],
                           trace=lambda p: jnp.ones((1, 3)) @ p["fc"]["kernel"])["fc"]["kernel"]
  assert lw.roles == "io" and lw.a.shape == (3, 1)


def test_dry_run_names_the_expert_tensors():
  base, lp = _experts()
  config, tensors = lj_peft.pack_peft(lp, _RULES)
  report = str(lj_peft.unpack_peft(config, tensors, base, _RULES, dry_run=True))
  assert "moe/w_in <- moe.experts.w_in (rank 2, scale 1.5)" in report
  assert "moe/w_out <- base_model.model.moe.experts.lora_A.weight: lora_A" in report  # no trace=
  # ignore= skips expert tensors too: w_out neither loaded nor reported missing
  report = str(lj_peft.unpack_peft(config, tensors, base, _RULES, dry_run=True,
                                   ignore=[r"moe\.experts"]))
  assert "moe/w_in <-" in report and "moe/w_out" not in report
