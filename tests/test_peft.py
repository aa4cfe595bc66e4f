"""lora_jax.interop.peft against Hugging Face PEFT itself, both directions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import lora_jax as lj
from hf_tiny import HF_KW, IDS, hf_logits, hf_model
from lora_jax.interop import ConversionError
from lora_jax.interop import peft as lj_peft
from lora_jax.models import (Llama, LlamaConfig, llama_name_map, load_hf_llama,
                             to_hf_state_dict)

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAME_MAP = llama_name_map()


def lora_logits(cfg, lparams, ids=IDS):
  return np.asarray(jax.jit(lj.lora(Llama(cfg).apply))({"params": lparams}, jnp.asarray(ids)))


def peft_adapter(directory, **config):
  """Save a PEFT adapter with random non-zero B; returns (base state dict, logits)."""
  model = hf_model()
  base_sd = {k: v.clone() for k, v in model.state_dict().items()}
  pm = peft.get_peft_model(model, peft.LoraConfig(**config))
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        torch.nn.init.normal_(p, 0.0, 0.3)
  pm.save_pretrained(directory)
  return base_sd, hf_logits(pm.eval())  # eval: new dropout modules start in train mode


@pytest.fixture(scope="module")
def made_by_peft(tmp_path_factory):
  directory = tmp_path_factory.mktemp("peft_adapter")
  base_sd, want = peft_adapter(
      directory, r=4, lora_alpha=8, target_modules=PROJ,
      rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 8},
      alpha_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 5})
  return directory, base_sd, want


def _base_params(base_sd, scan):
  return load_hf_llama(base_sd, LlamaConfig.from_hf(transformers.LlamaConfig(**HF_KW),
                                                    scan_layers=scan))


@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_peft_adapter_loads_into_lora_jax(made_by_peft, scan):
  directory, base_sd, want = made_by_peft
  cfg, params = _base_params(base_sd, scan)
  lp = lj_peft.load_peft_adapter(directory, params, NAME_MAP)
  nodes = lj.adapter(lp)
  assert len(nodes) == (7 if scan else 14)
  if scan:  # per-layer ranks 4 / 2 -> one stacked rank 4 (zero-padded)
    q = lp["layers"]["self_attn"]["q_proj"]["kernel"]
    assert (q.roles, q.a.shape, q.b.shape) == ("sio", (2, 32, 4), (2, 4, 32))
    np.testing.assert_array_equal(q.a[1, :, 2:], 0)
  else:
    assert lp["layers_1"]["self_attn"]["q_proj"]["kernel"].rank == 2
    assert lp["layers_0"]["mlp"]["down_proj"]["kernel"].a.shape == (48, 8)
    assert lp["layers_0"]["self_attn"]["v_proj"]["kernel"].scale == 3 / 4
    assert lp["layers_0"]["mlp"]["up_proj"]["kernel"].scale == 5 / 4
    assert lp["layers_1"]["mlp"]["up_proj"]["kernel"].scale == 8 / 4
  base_logits = lora_logits(cfg, params)
  assert np.abs(want - base_logits).max() > 0.5  # the adapter matters
  np.testing.assert_allclose(lora_logits(cfg, lp), want, atol=1e-4, rtol=1e-4)


def test_keys_without_prefix_or_with_adapter_name(made_by_peft):
  directory, base_sd, want = made_by_peft
  config, tensors = lj_peft.read_peft_adapter(directory)
  cfg, params = _base_params(base_sd, False)
  for rename in (lambda k: k.removeprefix("base_model.model."),
                 lambda k: k.replace(".lora_A.", ".lora_A.default.").replace(
                     ".lora_B.", ".lora_B.default.")):
    lp = lj_peft.unpack_peft(config, {rename(k): tensors[k] for k in tensors},
                             params, NAME_MAP)
    np.testing.assert_allclose(lora_logits(cfg, lp), want, atol=1e-4, rtol=1e-4)


def _train(cfg, lp, steps=3):
  model = Llama(cfg)
  ids = jnp.asarray(IDS)

  def loss(p):
    logits = lj.lora(model.apply)({"params": p}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  tx = lj.optimizer(optax.adam(3e-2), lp)
  state = tx.init(lp)

  @jax.jit
  def step(p, state):
    g = jax.grad(loss)(p)
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state

  for _ in range(steps):
    lp, state = step(lp, state)
  return lp


@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_lora_jax_adapter_loads_in_peft(tmp_path, scan):
  model = hf_model()
  base_sd = {k: v.clone() for k, v in model.state_dict().items()}
  cfg, params = _base_params(base_sd, scan)
  config = lj.LoraConfig(
      rank=4, alpha=8, targets=r".*(q|k|v|o|gate|up|down)_proj/kernel|embed_tokens/embedding",
      rank_pattern={r".*down_proj/kernel": 2}, alpha_pattern={r".*v_proj/kernel": 2},
      trainable=r"lm_head/kernel|norm/scale")
  lp = lj.lora_init(jax.random.key(0), params, config,
                    trace=lambda p: Llama(cfg).apply({"params": p}, jnp.asarray(IDS)))
  lp = _train(cfg, lp)
  files = lj_peft.save_peft_adapter(tmp_path, lp, NAME_MAP, "tiny-llama", task_type="CAUSAL_LM")
  assert sorted(f.rsplit("/", 1)[1] for f in files) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]
  written = json.loads((tmp_path / "adapter_config.json").read_text())
  assert written["target_modules"] == sorted(PROJ + ["embed_tokens"])
  assert (written["r"], written["lora_alpha"]) == (4, 8)
  assert written["rank_pattern"] == {"down_proj": 2}
  assert written["alpha_pattern"] == {"v_proj": 2}  # alpha = scale * r
  assert written["modules_to_save"] == ["lm_head", "model.norm"]
  from safetensors import safe_open
  with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
    assert f.metadata() == {"format": "pt"}
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in f.keys()
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in f.keys()

  pm = peft.PeftModel.from_pretrained(model, tmp_path).eval()
  want = lora_logits(cfg, lp)
  assert np.abs(want - lora_logits(cfg, params)).max() > 0.05  # training changed something
  np.testing.assert_allclose(hf_logits(pm), want, atol=1e-4, rtol=1e-4)

  merged = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
  ours = to_hf_state_dict(lj.merge(lp), cfg)
  assert set(merged) == set(ours)
  for k in ours:
    np.testing.assert_allclose(merged[k], ours[k], atol=1e-5, rtol=1e-5, err_msg=k)

  back = lj_peft.load_peft_adapter(tmp_path, params, NAME_MAP)  # and back again
  for (path, x), (_, y) in zip(lj.adapter(lp).items(), lj.adapter(back).items()):
    if isinstance(x, lj.LoraWeight):
      assert (x.roles, x.scale) == (y.roles, y.scale), path
      np.testing.assert_array_equal(x.a, y.a)
      np.testing.assert_array_equal(x.b, y.b)
    else:
      np.testing.assert_array_equal(x.value, y.value)


def test_rslora_round_trip(tmp_path):
  base_sd, want = peft_adapter(tmp_path / "peft", r=4, lora_alpha=6, use_rslora=True,
                               target_modules=["q_proj", "down_proj"], lora_dropout=0.1)
  cfg, params = _base_params(base_sd, True)
  lp = lj_peft.load_peft_adapter(tmp_path / "peft", params, NAME_MAP)
  q = lp["layers"]["self_attn"]["q_proj"]["kernel"]
  assert (q.scale, q.dropout) == (6 / 2, 0.1)  # alpha / sqrt(r)
  np.testing.assert_allclose(lora_logits(cfg, lp), want, atol=1e-4, rtol=1e-4)

  lj_peft.save_peft_adapter(tmp_path / "ours", lp, NAME_MAP, use_rslora=True)
  written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
  assert (written["use_rslora"], written["lora_alpha"], written["lora_dropout"]) == (True, 6, 0.1)
  assert written["target_modules"] == ["down_proj", "q_proj"]
  pm = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "ours").eval()
  np.testing.assert_allclose(hf_logits(pm), want, atol=1e-4, rtol=1e-4)


def test_pattern_rules_match_peft():
  from peft.tuners.tuners_utils import check_target_module_exists
  from peft.utils.other import get_pattern_key
  modules = [f"model.layers.{i}.{m}" for i in (0, 1, 11)
             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")] + ["lm_head"]
  patterns = {"layers.1.self_attn.q_proj": 2, "down_proj": 8, r".*\.1\d\..*": 3, "q_proj": 5}
  for m in modules:
    want = patterns.get(get_pattern_key(patterns.keys(), m), -1)
    assert lj_peft.pattern_value(patterns, m, -1) == want, m
  configs = [
      dict(target_modules=["q_proj", "mlp.down_proj"]),
      dict(target_modules=r".*layers\.1\..*proj"),
      dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 11]),
      dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0, layers_pattern="layers"),
      dict(target_modules=["q_proj", "v_proj", "lm_head"], exclude_modules=["v_proj"],
           modules_to_save=["lm_head"]),
  ]
  for kw in configs:
    pc = peft.LoraConfig(**kw)
    for m in modules:
      assert lj_peft.is_targeted(kw, m) == bool(check_target_module_exists(pc, m)), (kw, m)


def test_errors_are_collected(made_by_peft):
  directory, base_sd, _ = made_by_peft
  config, tensors = lj_peft.read_peft_adapter(directory)
  tensors = dict(tensors)
  _, params = _base_params(base_sd, False)
  p = "base_model.model.model.layers."
  del tensors[p + "0.self_attn.k_proj.lora_B.weight"]                      # missing
  del tensors[p + "1.mlp.up_proj.lora_A.weight"], tensors[p + "1.mlp.up_proj.lora_B.weight"]
  tensors[p + "0.self_attn.q_proj.lora_A.weight"] = tensors[                 # shape
      p + "0.self_attn.q_proj.lora_A.weight"][:, :16]
  tensors[p + "0.mlp.gate_proj.lora_A.weight"] = np.zeros((3, 32), np.float32)  # rank
  tensors[p + "0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(32, np.float32)
  tensors[p + "0.vision.fc.lora_A.weight"] = np.ones((4, 32), np.float32)
  with pytest.raises(ConversionError) as e:
    lj_peft.unpack_peft(config, tensors, params, NAME_MAP)
  msg = str(e.value)
  assert "layers_0/self_attn/k_proj/kernel <- model.layers.0.self_attn.k_proj.lora_B" in msg
  assert "model.layers.1.mlp.up_proj.lora_A / lora_B (targeted by target_modules)" in msg
  assert "lora_A (4, 16) / lora_B (32, 4) (in=16, out=32) do not fit the kernel of shape (32, 32)" in msg
  assert "gate_proj.lora_A.weight: rank 3, but the config gives" in msg
  assert p + "0.self_attn.q_proj.lora_magnitude_vector" in msg
  assert p + "0.vision.fc.lora_A.weight" in msg

  narrowed = dict(config, target_modules=[m for m in PROJ if m != "o_proj"])
  _, clean = lj_peft.read_peft_adapter(directory)
  with pytest.raises(ConversionError, match=r"model.layers.0.self_attn.o_proj: has LoRA "
                     r"tensors but target_modules=.* does not select it"):
    lj_peft.unpack_peft(narrowed, clean, params, NAME_MAP)


@pytest.mark.parametrize("change,message", [
    (dict(use_dora=True), r"lora_magnitude_vector \(use_dora=True\)"),  # none in the file
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(lora_bias=True), "lora_bias=True"),
    (dict(layer_replication=[[0, 2]]), "layer_replication"),
    (dict(target_parameters=["experts.gate_up_proj"]), "target_parameters"),
    (dict(peft_type="LOHA"), "peft_type='LOHA'"),
    (dict(init_lora_weights="pissa_niter_4"), "modified base model"),  # random: not redone
    (dict(init_lora_weights="corda"), "modified base model"),
])
def test_unsupported_features_are_refused(made_by_peft, change, message):
  directory, base_sd, _ = made_by_peft
  config, tensors = lj_peft.read_peft_adapter(directory)
  _, params = _base_params(base_sd, False)
  with pytest.raises(ValueError, match=message):
    lj_peft.unpack_peft(dict(config, **change), tensors, params, NAME_MAP)


def test_dense_general_and_conv_round_trip():
  """3-D DenseGeneral (roles ioo / iio) and conv kernels: factors survive pack/unpack."""
  params = {"q": {"kernel": np.zeros((6, 2, 3), np.float32)},
            "o": {"kernel": np.zeros((2, 3, 6), np.float32)},
            "conv": {"kernel": np.zeros((3, 3, 2, 5), np.float32)}}
  rules = [(r"(q|o|conv)/kernel", r"\1.weight")]
  lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(
      rank=2, targets=".*kernel", layouts={"q/kernel": "ioo", "o/kernel": "iio",
                                           "conv/kernel": "iiio"}))
  lp = jax.tree.map(lambda x: x.replace(b=x.b + 1.0) if isinstance(x, lj.LoraWeight) else x,
                    lp, is_leaf=lambda x: isinstance(x, lj.LoraWeight))
  shapes = {"o.weight": (6, 6), "conv.weight": (5, 2, 3, 3)}
  config, tensors = lj_peft.pack_peft(lp, rules, shapes=shapes)
  assert tensors["base_model.model.q.lora_B.weight"].shape == (6, 2)
  assert tensors["base_model.model.conv.lora_A.weight"].shape == (2, 2, 3, 3)
  assert tensors["base_model.model.conv.lora_B.weight"].shape == (5, 2, 1, 1)
  back = lj_peft.unpack_peft(config, tensors, params, rules)
  for k in params:
    x, y = lp[k]["kernel"], back[k]["kernel"]
    assert x.roles == y.roles
    np.testing.assert_array_equal(lj.delta(x), lj.delta(y))
  with pytest.raises(ConversionError, match="pass shapes="):
    lj_peft.pack_peft(lp, rules)  # (heads, hd, out) may be a conv: ambiguous
  torch_conv = torch.nn.Conv2d(2, 5, 3, bias=False)  # PEFT's conv delta is ours
  pc = peft.get_peft_model(torch.nn.Sequential(torch_conv), peft.LoraConfig(
      r=2, lora_alpha=2, target_modules=["0"]))
  sd = {k.replace("0.lora_", "conv.lora_").replace(".default", ""): v.detach()
        for k, v in pc.state_dict().items() if "lora_" in k}
  sd["base_model.model.conv.lora_B.weight"] = torch.randn(5, 2, 1, 1)
  lw = lj_peft.unpack_peft({"r": 2, "lora_alpha": 2, "target_modules": ["conv"]},
                           sd, {"conv": params["conv"]}, rules)["conv"]["kernel"]
  pc.base_model.model[0].lora_B["default"].weight.data = sd["base_model.model.conv.lora_B.weight"]
  torch_delta = pc.base_model.model[0].get_delta_weight("default").detach().numpy()  # (O, I, kh, kw)
  np.testing.assert_allclose(lj.delta(lw), torch_delta.transpose(2, 3, 1, 0), atol=1e-6)


def test_save_errors(tmp_path):
  params = {"fc": {"kernel": np.zeros((3, 2), np.float32)}, "gc": {"kernel": np.zeros((3, 2), np.float32)}}
  lp = lj.lora_init(jax.random.key(0), params, lj.LoraConfig(rank=1, targets=".*kernel"))
  with pytest.raises(ConversionError, match="gc/kernel: the name map gives no torch key"):
    lj_peft.save_peft_adapter(tmp_path, lp, [(r"fc/kernel", "fc.weight")])
  with pytest.raises(ConversionError, match="is not a module's .weight"):
    lj_peft.save_peft_adapter(tmp_path, lp, [(r"(fc|gc)/kernel", r"\1.w")])
  with pytest.raises(ValueError, match="hold no LoraWeight"):
    lj_peft.save_peft_adapter(tmp_path, params, [(r"(fc|gc)/kernel", r"\1.weight")])


def test_import_does_not_import_torch():
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  code = ("import lora_jax.interop.peft, sys; from lora_jax.interop import load_peft_adapter; "
          "assert not {'torch', 'peft', 'safetensors'} & set(sys.modules), 'imported'")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert res.returncode == 0, res.stderr
