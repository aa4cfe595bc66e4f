"""PiSSA / OLoRA inits, LoRA+ and layers_to_transform compared with PEFT itself."""

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
from lora_jax.interop import peft as lj_peft
from lora_jax.models import Llama, LlamaConfig, llama_name_map, load_hf_llama

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAME_MAP = llama_name_map()
TARGETS = r".*(q|k|v|o|gate|up|down)_proj/kernel"


def _spectrum_weight(out_f, in_f, seed=0):
  """A torch (out, in) weight with a clear spectral gap after the 4th singular value
  (8, 6, 4, 3, then 0.3 .. 0.01): randomized SVDs then agree with the exact one."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(out_f, out_f)))
  v, _ = np.linalg.qr(rng.normal(size=(in_f, in_f)))
  k = min(out_f, in_f)
  s = np.concatenate([[8.0, 6.0, 4.0, 3.0], np.geomspace(0.3, 0.01, k - 4)])
  return (u[:, :k] * s) @ v[:, :k].T


class _Fc(torch.nn.Module):
  def __init__(self, w):
    super().__init__()
    self.fc = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
      self.fc.weight.copy_(torch.as_tensor(w, dtype=torch.float32))

  def forward(self, x):
    return self.fc(x)


def _peft_init(w, init, r=4, alpha=8):
  """PEFT's lora_A, lora_B, residual weight (torch layouts) for weight ``w``."""
  torch.manual_seed(0)
  pm = peft.get_peft_model(_Fc(w), peft.LoraConfig(
      r=r, lora_alpha=alpha, target_modules=["fc"], init_lora_weights=init))
  layer = pm.base_model.model.fc
  return (layer.lora_A["default"].weight.detach().numpy(),
          layer.lora_B["default"].weight.detach().numpy(),
          layer.base_layer.weight.detach().numpy())


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_8"])
def test_init_equals_peft_on_the_same_weight(init):
  w = _spectrum_weight(24, 40).astype(np.float32)  # torch (out, in); lora_jax kernel is w.T
  A, B, res = _peft_init(w, init)
  s = 8 / 4
  lp = lj.lora_init(jax.random.key(0), {"k": jnp.asarray(w.T)},
                    lj.LoraConfig(rank=4, alpha=8, targets="k", init=init))
  lw = lp["k"]
  # the adapter's ΔW0 and the residual base (singular vectors' signs may differ)
  np.testing.assert_allclose(np.asarray(lj.delta(lw)), s * (B @ A).T, atol=2e-5)
  np.testing.assert_allclose(np.asarray(lw.w), res.T, atol=2e-5)
  # the factors themselves, up to one sign per rank component
  signs = np.sign(np.sum(np.asarray(lw.a) * A.T, axis=0))
  np.testing.assert_allclose(np.asarray(lw.a) * signs[None, :], A.T, atol=5e-5)
  np.testing.assert_allclose(np.asarray(lw.b) * signs[:, None], B.T, atol=5e-5)
  # the model's output is unchanged: W_res + s·A0@B0 = W
  np.testing.assert_allclose(np.asarray(lj.merge(lp)["k"]), w.T, atol=2e-6)


def _base(base_sd, scan):
  return load_hf_llama(base_sd, LlamaConfig.from_hf(transformers.LlamaConfig(**HF_KW),
                                                    scan_layers=scan))


def _logits(cfg, lparams):
  return np.asarray(jax.jit(lj.lora(Llama(cfg).apply))({"params": lparams}, jnp.asarray(IDS)))


def _train(cfg, lp, steps=3, **kw):
  ids = jnp.asarray(IDS)

  def loss(p):
    logits = lj.lora(Llama(cfg).apply)({"params": p}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  tx = lj.optimizer(optax.adamw(2e-2, weight_decay=0.1), lp, **kw)
  state = tx.init(lp)

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  for _ in range(steps):
    lp, state = step(lp, state)
  return lp


@pytest.mark.parametrize("init,scan", [("pissa", True), ("olora", False)])
def test_pissa_olora_export_as_plain_lora_loads_in_peft(tmp_path, init, scan):
  model = hf_model()
  base_sd = {k: v.clone() for k, v in model.state_dict().items()}
  cfg, params = _base(base_sd, scan)
  config = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS, init=init,
                         layouts={r"layers/.*": "sio"} if scan else None)
  lp = lj.lora_init(jax.random.key(0), params, config)
  initial = lj.adapter(lp)
  np.testing.assert_allclose(_logits(cfg, lp), _logits(cfg, params), atol=1e-4)
  lp = _train(cfg, lp)
  want = _logits(cfg, lp)
  assert np.abs(want - _logits(cfg, params)).max() > 0.05  # training changed something

  lj_peft.save_peft_adapter(tmp_path, lp, NAME_MAP, initial=initial)
  written = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (8, 16, True)
  pm = peft.PeftModel.from_pretrained(model, tmp_path).eval()  # the ORIGINAL base
  np.testing.assert_allclose(hf_logits(pm), want, atol=1e-4, rtol=1e-4)
  # and back: plain rank-2r LoRA on the original base, same logits
  back = lj_peft.load_peft_adapter(tmp_path, params, NAME_MAP)
  np.testing.assert_allclose(_logits(cfg, back), want, atol=1e-4, rtol=1e-4)


def test_loraplus_step_equals_peft_param_groups():
  """One Adam step: lj.optimizer(b_lr_ratio=16) == PEFT's create_loraplus_optimizer."""
  from peft.optimizers import create_loraplus_optimizer
  w = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)
  pm = peft.get_peft_model(_Fc(w), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc"]))
  layer = pm.base_model.model.fc
  with torch.no_grad():
    layer.lora_B["default"].weight.normal_(0, 0.5)
  A0 = layer.lora_A["default"].weight.detach().numpy().copy()
  B0 = layer.lora_B["default"].weight.detach().numpy().copy()
  x = np.random.default_rng(1).normal(size=(5, 10)).astype(np.float32)
  opt = create_loraplus_optimizer(pm, torch.optim.Adam, lr=1e-2, loraplus_lr_ratio=16)
  for _ in range(2):
    opt.zero_grad()
    (pm(torch.as_tensor(x)) ** 2).sum().backward()
    opt.step()
  want_a = layer.lora_A["default"].weight.detach().numpy().T
  want_b = layer.lora_B["default"].weight.detach().numpy().T

  lp = {"k": lj.LoraWeight(jnp.asarray(w.T), jnp.asarray(A0.T), jnp.asarray(B0.T),
                           scale=2.0, roles="io")}
  loss = lambda p: jnp.sum(lj.lora(lambda q, x: x @ q["k"])(p, jnp.asarray(x)) ** 2)
  tx = lj.optimizer(optax.adam(1e-2, eps=1e-8), lp, b_lr_ratio=16)
  state = tx.init(lp)
  for _ in range(2):
    updates, state = tx.update(jax.grad(loss)(lp), state, lp)
    lp = optax.apply_updates(lp, updates)
  # float32 Adam on two frameworks: 1e-5 is far below the 0.16 a wrong B rate would make
  np.testing.assert_allclose(np.asarray(lp["k"].a), want_a, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lp["k"].b), want_b, atol=1e-5)
  assert np.abs(want_b - B0.T).max() > 0.1  # 16 x lr: B moved far


def _peft_modules(model) -> set[str]:
  return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}


@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_layers_to_transform_selects_what_peft_selects(tmp_path, scan):
  model = hf_model()
  base_sd = {k: v.clone() for k, v in model.state_dict().items()}
  cfg, params = _base(base_sd, scan)
  config = lj.LoraConfig(rank=4, alpha=8, targets=TARGETS, layers_to_transform=[1],
                         layouts={r"layers/.*": "sio"} if scan else None)
  lp = _train(cfg, lj.lora_init(jax.random.key(0), params, config), b_lr_ratio=4)
  if scan:  # layer 0 of every stack: exact no-op, still zero after AdamW steps
    for x in lj.adapter(lp).values():
      assert not np.any(np.asarray(x.a[0])) and not np.any(np.asarray(x.b[0]))
      assert np.any(np.asarray(x.b[1]))
  else:
    assert all(p.startswith("layers_1/") for p in lj.adapter(lp))
  want = _logits(cfg, lp)

  lj_peft.save_peft_adapter(tmp_path, lp, NAME_MAP)
  written = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (written["target_modules"], written["layers_to_transform"]) == (sorted(PROJ), [1])
  pm = peft.PeftModel.from_pretrained(model, tmp_path).eval()
  ref = peft.get_peft_model(hf_model(), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=PROJ, layers_to_transform=[1]))
  assert _peft_modules(pm) == _peft_modules(ref) and len(_peft_modules(ref)) == 7
  np.testing.assert_allclose(hf_logits(pm), want, atol=1e-4, rtol=1e-4)

  back = lj_peft.load_peft_adapter(tmp_path, params, NAME_MAP)
  np.testing.assert_allclose(_logits(cfg, back), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scan", [False, True], ids=["layers_i", "scanned"])
def test_peft_layers_to_transform_adapter_loads(tmp_path, scan):
  model = hf_model()
  base_sd = {k: v.clone() for k, v in model.state_dict().items()}
  pm = peft.get_peft_model(model, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=PROJ, layers_to_transform=[0]))
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        torch.nn.init.normal_(p, 0.0, 0.3)
  pm.save_pretrained(tmp_path)
  cfg, params = _base(base_sd, scan)
  lp = lj_peft.load_peft_adapter(tmp_path, params, NAME_MAP)
  np.testing.assert_allclose(_logits(cfg, lp), hf_logits(pm.eval()), atol=1e-4, rtol=1e-4)
  assert json.loads((tmp_path / "adapter_config.json").read_text())["layers_to_transform"] == [0]


@pytest.mark.parametrize("init,scan", [("pissa", False), ("olora", True)])
def test_unconverted_peft_pissa_olora_adapter_loads(tmp_path, init, scan):
  """PEFT saves a PiSSA / OLoRA adapter as it is and, on loading, redoes the init
  on the base (W - s·A0@B0) before loading A, B; lora_jax does the same."""
  model = hf_model()
  base_sd = {k: v.clone() for k, v in model.state_dict().items()}
  pm = peft.get_peft_model(model, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=PROJ, init_lora_weights=init,
      layers_to_transform=[1] if scan else None))
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.add_(0.05 * torch.randn_like(p))  # "trained"
  pm.save_pretrained(tmp_path)
  loaded = peft.PeftModel.from_pretrained(hf_model(), tmp_path).eval()
  want = hf_logits(loaded)
  np.testing.assert_allclose(hf_logits(pm.eval()), want, atol=1e-4)  # PEFT's own round trip
  cfg, params = _base(base_sd, scan)
  lp = lj_peft.load_peft_adapter(tmp_path, params, NAME_MAP)
  np.testing.assert_allclose(_logits(cfg, lp), want, atol=1e-4, rtol=1e-4)
