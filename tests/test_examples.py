"""The examples run (in --fast mode) and show what they claim.

Each example's ``main(argv)`` returns its key figures; these tests assert the
claim each example prints, on tiny sizes (a few seconds each).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402
import compare_finetuning  # noqa: E402
import llama_lora  # noqa: E402
import low_rank_shift  # noqa: E402
import nnx_lora  # noqa: E402
import quickstart  # noqa: E402
import sharded_training  # noqa: E402

FAST = ["--fast", "--quiet"]


@pytest.mark.parametrize("module", [quickstart, low_rank_shift, compare_finetuning],
                         ids=lambda m: m.__name__)
def test_help_exits_zero(module, capsys):
  with pytest.raises(SystemExit) as exc:
    module.main(["--help"])
  assert exc.value.code == 0
  assert "--fast" in capsys.readouterr().out


ALL = [quickstart, low_rank_shift, compare_finetuning, llama_lora, nnx_lora, sharded_training]


@pytest.mark.parametrize("module", ALL, ids=lambda m: m.__name__)
def test_every_flag_has_help_text(module, monkeypatch):
  made = []

  def spy(*args, **kwargs):
    made.append(_common.parser(*args, **kwargs))
    return made[-1]
  monkeypatch.setattr(module, "parser", spy)
  with pytest.raises(SystemExit):
    (module.parse if module is sharded_training else module.main)(["--help"])
  flags = [a for a in made[-1]._actions if a.option_strings]
  missing = [a.option_strings[0] for a in flags if not a.help]
  assert not missing, f"{module.__name__}: flags without help text: {missing}"


@pytest.mark.slow  # runs the example end to end
def test_sharded_training(tmp_path):
  # A subprocess: the simulated devices must be requested before JAX starts.
  code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import sharded_training as s; "
          "r = s.main(['--fast', '--quiet', '--out', sys.argv[2]]); "
          "print(json.dumps({k: r[k] for k in ('losses', 'acc_before', 'acc_after', "
          "'merged_acc', 'png', 'merged_q_spec')}))")
  proc = subprocess.run([sys.executable, "-c", code, str(EXAMPLES), str(tmp_path)],
                        capture_output=True, text=True, check=True, cwd=tmp_path,
                        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "mesh: 2 x 4 = 8 simulated CPU devices" in proc.stdout
  # The loss visibly falls and the merged model predicts like the adapted one.
  assert np.mean(r["losses"][-5:]) < np.mean(r["losses"][:5]) - 1.0
  assert r["acc_after"] > r["acc_before"] + 0.2
  assert abs(r["merged_acc"] - r["acc_after"]) < 0.02
  assert r["merged_q_spec"] == [None, None, "model"]
  assert os.path.getsize(r["png"]) > 0


@pytest.mark.slow  # runs the example end to end
def test_quickstart(tmp_path):
  r = quickstart.main(FAST + ["--out", str(tmp_path)])
  digit = r["digit"]
  # Fine-tuning on the weak digit alone lowers its test errors.
  assert r["errors_after"][digit] < r["errors_before"][digit]
  # Adapters off: exactly the original predictions, base params untouched.
  np.testing.assert_array_equal(r["logits_off"], r["logits_orig"])
  assert r["base_identical"]
  # Merged weights predict like the factored LoRA model.
  np.testing.assert_array_equal(r["logits_merged"].argmax(-1), r["logits_lora"].argmax(-1))
  np.testing.assert_allclose(r["logits_merged"], r["logits_lora"], rtol=1e-5, atol=1e-4)
  # The adapter reloaded from its Orbax checkpoint gives the same logits.
  np.testing.assert_array_equal(r["logits_reloaded"], r["logits_lora"])
  assert os.path.isdir(r["checkpoint"])
  # Rank 1 on the three Dense kernels of 64-128-256-10: (in + out) params each.
  assert r["summary"].trainable == (64 + 128) + (128 + 256) + (256 + 10)
  assert os.path.getsize(r["png"]) > 0


@pytest.mark.slow  # runs the example end to end
def test_low_rank_shift(tmp_path):
  r = low_rank_shift.main(FAST + ["--out", str(tmp_path)])
  # The stated tolerance: a rank-1 LoRA recovers ΔW ≈ 1 (the shift θ -> θ + 1)
  # with mean |ΔW - 1| < 0.05.
  assert r["delta"].shape == (101, 100)
  assert r["delta_err_mean"] < 0.05
  # Merging ΔW fixes the shifted task: the loss falls by over 100x.
  assert r["merged_loss"] < r["shifted_before"] / 100
  assert os.path.getsize(r["png"]) > 0


@pytest.mark.slow  # runs the example end to end
def test_compare_finetuning(tmp_path):
  r = compare_finetuning.main(FAST + ["--out", str(tmp_path)])
  res = r["results"]
  full, frozen, lora = res["full"], res["frozen"], res["lora"]
  # Stated margin: LoRA's best validation AUC is at least the frozen encoder's - 0.05.
  assert lora["aucs"].max() >= frozen["aucs"].max() - 0.05
  assert frozen["trainable"] < lora["trainable"] < full["trainable"]
  # Deterministic proxy (XLA's estimate, not a timing): a LoRA step needs less
  # memory than a full fine-tuning step.
  assert lora["memory_bytes"] < full["memory_bytes"]
  assert all(len(x["aucs"]) == 3 for x in res.values())
  assert os.path.getsize(r["png"]) > 0
