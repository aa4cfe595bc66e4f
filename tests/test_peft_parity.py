"""lora_jax trains the same model as PEFT: one tiny HF Llama, one initial
adapter, 20 AdamW steps on the same batches, per-step losses equal, and the
trained adapter exported from lora_jax loads in PEFT with equal logits."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch
import torch.nn.functional as F

import lora_jax as lj
from hf_tiny import HF_KW, IDS, hf_logits, hf_model
from lora_jax.interop import peft as lj_peft
from lora_jax.models import Llama, LlamaConfig, llama_name_map, load_hf_llama

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, LR, WD = 20, 1e-2, 1e-2


def _batches():
  """Each step two of four fixed sequences: something to learn in 20 steps."""
  rng = np.random.default_rng(0)
  rows = rng.integers(0, HF_KW["vocab_size"], (4, 9))
  return np.stack([rows[rng.choice(4, 2, replace=False)] for _ in range(STEPS)])


def _peft_losses(pm, batches):
  opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR,
                          betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
  losses = []
  for ids in batches:
    ids = torch.as_tensor(ids)
    logits = pm(input_ids=ids[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))
  return losses


def _lora_jax_losses(cfg, lp, batches):
  apply = lj.lora(Llama(cfg).apply)

  def loss(p, ids):
    logits = apply({"params": p}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  trainable, frozen = lj.split(lp)
  tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD)
  opt_state, step, losses = tx.init(trainable), lj.train_step(loss, tx), []
  for ids in batches:
    trainable, opt_state, value = step(trainable, opt_state, frozen, jnp.asarray(ids))
    losses.append(float(value))
  return lj.combine(trainable, frozen), losses


def test_twenty_steps_match_peft_and_the_export_loads_in_peft(tmp_path):
  model = hf_model()
  base_sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  torch.manual_seed(1)
  pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=PROJ, lora_dropout=0.0))
  with torch.no_grad():  # a non-zero B, so A's gradients matter from step one
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.05)
  pm.save_pretrained(tmp_path / "init")
  pm.train()

  cfg, params = load_hf_llama(base_sd, LlamaConfig.from_hf(model.config, scan_layers=True))
  lp = lj_peft.load_peft_adapter(tmp_path / "init", params, llama_name_map(cfg))
  batches = _batches()
  want = _peft_losses(pm, batches)
  lp, got = _lora_jax_losses(cfg, lp, batches)
  assert want[-1] < want[0] - 0.5  # training did something
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  lj_peft.save_peft_adapter(tmp_path / "ours", lp, llama_name_map(cfg), "tiny-llama",
                            task_type="CAUSAL_LM")
  loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
  ours = np.asarray(jax.jit(lj.lora(Llama(cfg).apply))({"params": lp}, jnp.asarray(IDS)))
  np.testing.assert_allclose(hf_logits(loaded), ours, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(hf_logits(pm.eval()), ours, atol=1e-3, rtol=1e-3)  # trained alike
