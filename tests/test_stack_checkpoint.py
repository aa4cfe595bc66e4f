"""Stacks of adapters on disk: Orbax checkpoints, PEFT multi-adapter directories."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import lora_jax as lj
from hf_tiny import HF_KW, IDS, hf_logits, hf_model
from layer_cases import case, randomize_b
from lora_jax.interop import peft as lj_peft
from lora_jax.models import Llama, LlamaConfig, llama_name_map, load_hf_llama

NAME_MAP = llama_name_map()


def _stack():
  fn, params, args, config, trace = case("nn_scan")
  ads = [lj.adapter(randomize_b(lj.lora_init(jax.random.key(k), params,
                                             config.__class__(rank=r, alpha=3.0,
                                                              targets=config.targets),
                                             trace=trace), seed=k))
         for k, r in enumerate((1, 3))]
  return fn, params, args, ads, lj.stack_adapters(ads, names=["math", "code"])


def _same(x, y):
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(x) == jax.tree.structure(y)


def test_a_stack_saves_and_loads_self_described(tmp_path):
  fn, params, args, ads, stack = _stack()
  p = lj.attach(params, stack)
  path = lj.save_adapter(tmp_path / "s", p)
  info = json.loads((tmp_path / "s" / "lora_jax_stack.json").read_text())
  assert info["names"] == ["math", "code"]
  ranks = {n: {q: v["rank"] for q, v in a.items()} for n, a in info["adapters"].items()}
  assert set(ranks["math"].values()) == {1} and set(ranks["code"].values()) == {3}
  back = lj.load_adapter(path, params)
  _same(back, p)
  ids = jnp.asarray([1, 0, -1, 1, 0, 1][:args[0].shape[0]])
  np.testing.assert_array_equal(lj.lora(fn)(back, *args, adapter_ids=ids),
                                lj.lora(fn)(p, *args, adapter_ids=ids))
  # each member is an ordinary adapter checkpoint, loadable on its own
  one = lj.load_adapter(os.path.join(path, "1"), params)
  _same(lj.adapter(one), ads[1])


def test_an_edited_stack_is_refused(tmp_path):
  _, params, _, _, stack = _stack()
  path = lj.save_adapter(tmp_path / "s", lj.attach(params, stack))
  f = tmp_path / "s" / "lora_jax_stack.json"
  info = json.loads(f.read_text())
  info["names"] = ["math", "math"]
  f.write_text(json.dumps(info))
  with pytest.raises(ValueError, match=r"lora_jax_stack.json: not a lora_jax stack "
                     r"description: names is \['math', 'math'\]"):
    lj.load_adapter(path, params)
  info["names"], info["members"] = ["math", "code"], ["1", "0"]  # swapped members
  f.write_text(json.dumps(info))
  with pytest.raises(ValueError, match=r"member 'math' holds ranks / scales .* the "
                     "member directory was replaced or edited"):
    lj.load_adapter(path, params)
  with pytest.raises(FileExistsError, match="already exists"):
    lj.save_adapter(path, lj.attach(params, stack))
  with pytest.raises(ValueError, match="without step= or a CheckpointManager"):
    lj.save_adapter(tmp_path / "t", lj.attach(params, stack), step=3)


# ------------------------------------------------------------------- PEFT

def _peft_two(directory):
  """A tiny Llama with two PEFT adapters ('default', 'second'), saved together."""
  model = hf_model()
  base_sd = {k: v.clone() for k, v in model.state_dict().items()}
  pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj"]))
  pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=3, use_rslora=True,
                                           target_modules=["q_proj", "v_proj"]))
  torch.manual_seed(3)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        torch.nn.init.normal_(p, 0.0, 0.3)
  pm.save_pretrained(directory)
  logits = {}
  for name in ("default", "second"):
    pm.set_adapter(name)
    logits[name] = hf_logits(pm.eval())
  return base_sd, logits


def test_peft_multi_adapter_directory_imports_into_a_stack(tmp_path):
  base_sd, want = _peft_two(tmp_path)
  assert os.path.isfile(tmp_path / "second" / "adapter_config.json")  # PEFT's layout
  cfg, params = load_hf_llama(base_sd, LlamaConfig.from_hf(transformers.LlamaConfig(**HF_KW)))
  p = lj_peft.load_peft_stack(tmp_path, params, NAME_MAP)
  q = lj.unstack_adapters(p)
  assert list(q) == ["default", "second"]
  run = jax.jit(lj.lora(Llama(cfg).apply))
  ids = jnp.asarray([1, 0], jnp.int32)  # row 0: 'second', row 1: 'default'
  got = np.asarray(run({"params": p}, jnp.asarray(IDS), adapter_ids=ids))
  assert np.abs(want["default"] - want["second"]).max() > 0.1
  np.testing.assert_allclose(got[0], want["second"][0], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got[1], want["default"][1], atol=1e-4, rtol=1e-4)

  # each member exports to PEFT on its own and PEFT reads it back
  out = tmp_path / "out"
  lj_peft.save_peft_stack(out, p, NAME_MAP)
  pm = peft.PeftModel.from_pretrained(_fresh_base(base_sd), out / "second").eval()
  np.testing.assert_allclose(hf_logits(pm), want["second"], atol=1e-4, rtol=1e-4)


def _fresh_base(base_sd):
  model = hf_model()
  model.load_state_dict(base_sd)
  return model


def test_peft_stack_errors(tmp_path):
  (tmp_path / "x").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no PEFT adapter"):
    lj_peft.load_peft_stack(tmp_path, {}, NAME_MAP)
