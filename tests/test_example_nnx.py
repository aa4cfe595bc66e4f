"""examples/nnx_lora.py: LoRA on an NNX model with dropout RNG state trains
(with dropout active), merges, and round-trips through an Orbax checkpoint."""

import os
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import nnx_lora  # noqa: E402


def test_help_has_text_for_every_flag(capsys):
  with pytest.raises(SystemExit) as exc:
    nnx_lora.main(["--help"])
  assert exc.value.code == 0
  out = capsys.readouterr().out
  assert "--fast" in out and "--dropout" in out and "RngState" not in out


@pytest.mark.slow  # runs the example end to end
def test_nnx_lora_with_dropout(tmp_path):
  r = nnx_lora.main(["--fast", "--quiet", "--out", str(tmp_path)])
  (_, pre_upright, pre_mirror), (_, _, lora_mirror) = r["rows"]
  # The adaptation task: LoRA lifts the mirrored-digit accuracy well above
  # the pretrained model's.
  assert lora_mirror > pre_mirror + 0.2
  assert pre_upright > pre_mirror
  # Dropout was active: the dropout stream advanced once per LoRA step.
  assert r["rng_count_after"] - r["rng_count_before"] == len(r["lora_losses"])
  assert np.mean(r["lora_losses"][-10:]) < np.mean(r["lora_losses"][:10])
  # Adapters off: the pretrained model exactly; merged and reloaded agree.
  np.testing.assert_array_equal(r["logits_off"], r["logits_orig"])
  np.testing.assert_allclose(r["logits_merged"], r["logits_lora"], rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(r["logits_reloaded"], r["logits_lora"])
  assert os.path.isdir(r["checkpoint"])
  assert os.path.getsize(r["png"]) > 0
