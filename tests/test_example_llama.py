"""examples/llama_lora.py: the loss falls, a re-run resumes from the Orbax
checkpoint and continues from it, and the exported PEFT adapter gives the
same logits in transformers + peft as in lora_jax."""

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from lora_jax.models import Llama, load_hf_llama

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import llama_lora  # noqa: E402


def test_help_exits_zero(capsys):
  with pytest.raises(SystemExit) as exc:
    llama_lora.main(["--help"])
  assert exc.value.code == 0
  out = capsys.readouterr().out
  assert "--fast" in out and "--hf-dir" in out and "byte-level" in out


def step_losses(checkpoints, base_dir, step, seq_len, next_step):
  """Losses of the adapter saved at ``step`` and of the base on ``next_step``'s batch."""
  config, params = load_hf_llama(base_dir, scan_layers=True)
  lparams = lj.load_adapter(checkpoints, params, step=step)
  _, text_b = llama_lora.halves(llama_lora.read_text(llama_lora.TEXT))
  tokens = llama_lora.ByteTokenizer().encode(text_b)
  batch = jnp.asarray(llama_lora.batch_at(tokens, next_step, 0, 1, 8, seq_len))
  apply = lambda p, x: Llama(config).apply({"params": p}, x)
  loss = lambda logits: float(optax.softmax_cross_entropy_with_integer_labels(
      logits, batch[:, 1:]).mean())
  return loss(lj.lora(apply)(lparams, batch[:, :-1])), loss(apply(params, batch[:, :-1]))


def peft_logits(base_dir, peft_dir, ids):
  import peft  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(model, peft_dir).eval()
  with torch.no_grad():
    return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.slow  # runs the example end to end
def test_train_resume_export(tmp_path):
  out = str(tmp_path / "run")
  first = llama_lora.main(["--fast", "--quiet", "--out", out, "--steps", "20"])
  assert first["resumed_step"] is None and len(first["losses"]) == 20
  assert first["steps_kept"] == [10, 20]

  second = llama_lora.main(["--fast", "--quiet", "--out", out, "--steps", "40"])
  # It resumed from the saved step and trained the remaining 20 steps.
  assert second["resumed_step"] == 20 and second["final_step"] == 40
  assert len(second["losses"]) == 40
  np.testing.assert_array_equal(second["losses"][:20], first["losses"])  # history restored
  assert second["optimizer_count"] == 40  # adam's state restored (fresh: 20)
  # Continued from the saved adapter: step 21's loss is the step-20 adapter's
  # loss on step 21's batch (a fresh B = 0 adapter would give the base's).
  want, fresh = step_losses(second["checkpoints"], second["base_dir"], 20, second["seq_len"], 21)
  np.testing.assert_allclose(second["losses"][20], want, rtol=1e-5)
  assert abs(want - fresh) > 1e-2
  # The checkpoint directory keeps at most max_to_keep steps (3): 20, 30, 40.
  steps = sorted(int(n) for n in os.listdir(second["checkpoints"]) if n.isdigit())
  assert steps == [20, 30, 40] == second["steps_kept"]
  assert len(steps) <= second["max_to_keep"]

  # LoRA learned the second half, and the base weights never changed.
  _, base_b = second["eval"]["base"]
  _, lora_b = second["eval"]["lora"]
  assert lora_b < base_b - 0.1
  assert second["base_identical"]
  assert np.mean(second["losses"][-10:]) < np.mean(second["losses"][:10])
  assert np.mean(second["pretrain_losses"][-10:]) < np.mean(second["pretrain_losses"][:10]) - 1
  assert os.path.getsize(second["png"]) > 0

  # PEFT export: transformers + peft on the same base give lora_jax's logits.
  assert second["peft_dir"] is not None, "lora_jax.interop.peft.save_peft_adapter is missing"
  ids = np.random.default_rng(0).integers(0, 256, (2, 12))
  config = second["config"]
  want = jax.jit(lj.lora(lambda p, x: Llama(config).apply({"params": p}, x)))(
      second["lparams"], jnp.asarray(ids))
  assert float(jnp.abs(lj.merge(second["lparams"])["layers"]["mlp"]["up_proj"]["kernel"]
                       - lj.base(second["lparams"])["layers"]["mlp"]["up_proj"]["kernel"]).max()) > 0
  got = peft_logits(second["base_dir"], second["peft_dir"], ids)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)


@pytest.mark.slow  # runs the example end to end
def test_interrupted_run_resumes(tmp_path, monkeypatch, capsys):
  """Ctrl-C midway, then the same command: it resumes from the last checkpoint."""
  out = str(tmp_path / "run")
  argv = ["--fast", "--quiet", "--out", out, "--steps", "30"]
  real_batch_at = llama_lora.batch_at

  def interrupt_at_25(tokens, step, seed, phase, *args):
    if (phase, step) == (1, 25):  # LoRA phase (0: the base's pretraining)
      raise KeyboardInterrupt
    return real_batch_at(tokens, step, seed, phase, *args)
  monkeypatch.setattr(llama_lora, "batch_at", interrupt_at_25)
  with pytest.raises(SystemExit) as exc:
    llama_lora.main(argv)
  assert "interrupted at step 24" in str(exc.value)
  assert "latest checkpoint is step 20" in str(exc.value)
  assert "Run the same command again" in str(exc.value)

  monkeypatch.setattr(llama_lora, "batch_at", real_batch_at)
  again = llama_lora.main(argv)
  assert again["resumed_step"] == 20 and again["final_step"] == 30
  assert len(again["losses"]) == 30

  # A finished run re-run as is: says how to train on, and trains nothing.
  capsys.readouterr()
  done = llama_lora.main(argv)
  assert len(done["losses"]) == 30
  assert "pass a larger --steps (e.g. --steps 60)" in capsys.readouterr().out


def test_missing_safetensors_says_which_extra(monkeypatch, tmp_path):
  real_find_spec = llama_lora.importlib.util.find_spec
  monkeypatch.setattr(llama_lora.importlib.util, "find_spec",
                      lambda name, *a: None if name == "safetensors" else real_find_spec(name, *a))
  with pytest.raises(SystemExit) as exc:
    llama_lora.main(["--fast", "--quiet", "--out", str(tmp_path)])
  assert 'pip install -e ".[llama-example]"' in str(exc.value)
